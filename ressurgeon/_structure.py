"""The intended structure, written once: the stages, what each does, and its modules.

``tests/test_structure.py`` checks the code against this table (every library
module has a stage; no module imports a later stage, at module level or inside
a function; no import cycle) and README's "How it works" table is generated
from it (``python -m ressurgeon._structure`` prints it; the test compares).
A module may import modules of its own stage or an earlier one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    what: str
    modules: tuple[str, ...]   # module names relative to the package
    files: str                 # where a reader finds it (README's third column)


STAGES: tuple[Stage, ...] = (
    Stage("base", "errors, configs, the family catalog, fx and IO helpers, the op registry, "
          "the verdict on two ends, the join classes",
          ("_structure", "errors", "catalog", "config", "_torch", "_io", "_fx", "registry", "verdicts",
           "plans", "_names", "shortcuts", "shortcuts.base", "shortcuts._graph", "shortcuts.add",
           "shortcuts.highway", "shortcuts.concat", "recurrent"),
          "`catalog.py`, `config.py`, `verdicts.py`, `shortcuts/` (one join a file), `_fx.py`, "
          "`registry.py`"),
    Stage("capture", "a file or a module -> a traced GraphModule with shapes",
          ("load.common", "load.allowlist", "load.expressions", "load.program", "load.validate",
           "load.guard", "load.nn_pickle", "load.checkpoint", "load.safetensors", "load.archive",
           "capture", "capture.bounds", "capture.lift", "capture.exported", "capture.inplace", "capture.modes",
           "capture.shapes", "load.weights", "load.pt2", "load.torchscript", "load.hf", "load.record", "load",
           "capture.trace", "capture.submodule", "inputs"),
          "`load/` (one reader per format: `pt2`, `torchscript`, `weights`, `hf`, `safetensors`; "
          "`checkpoint` (training checkpoints), `archive` checks, `validate` (the allowlist before torch reads a `.pt2`), `guard`, "
          "`record`: what every reader returns), "
          "`capture/` (`trace`, `exported`, `bounds`, `modes`, `shapes`, `inplace`, `submodule`), `inputs.py`"),
    Stage("analysis", "read-only graph analysis: dominators, layers, blocks; the patterns "
          "that propose pairs",
          ("analysis", "analysis.dominators", "analysis.blocks", "analysis.layers",
           "analysis.zeros", "skips.select", "skips.patterns", "skips.mirror"),
          "`analysis/`, `skips/select.py`, `skips/patterns.py` (chain), `skips/mirror.py`"),
    Stage("plan", "the chosen spans as an editable JSON plan", ("skips.plan",),
          "`skips/plan.py`"),
    Stage("rewrite", "insert the planned joins", ("skips.rewrite",), "`skips/rewrite.py`"),
    Stage("verify", "parity, gradients, one comparison primitive", ("verify",), "`verify.py`"),
    Stage("pass", "add_skips: capture -> analyse -> select -> plan -> rewrite -> verify",
          ("skips", "skips.surgery"), "`skips/surgery.py`"),
    Stage("deploy", "save, ONNX, fold",
          ("source.calls", "source.graph", "source.render", "source.tensors", "source", "save",
           "export", "onnx_export", "fold", "fold.joins", "fold.layers",
           "fold.merge", "fold.rescale", "fold.zeros", "fold.rewired"),
          "`save.py`, `source/` (`--save-code`: `calls`, `graph`, `render`, `tensors`), `onnx_export.py`, `fold/`"),
    Stage("deepen", "grow a network with new residual blocks that start as the identity",
          ("deepen", "deepen.stream", "deepen.positions", "deepen.plan", "deepen.insert",
           "deepen.hf", "deepen.decide", "deepen.layer_config", "deepen.write", "deepen.folder"),
          "`deepen/`"),
    Stage("rewire", "a richer residual stream on a model that has one: DWA, hyper-connections",
          ("rewire", "rewire.base", "rewire.blocks", "rewire.dwa", "rewire.hyper",
           "rewire.adapter"),
          "`rewire/` (one kind a file: `dwa`, `hyper`)"),
    Stage("diagnostics", "gradient flow, gates, plots, training recipes",
          ("gates", "diagnose", "plot", "training"),
          "`diagnose.py`, `gates.py`, `plot.py`, `training.py`"),
    Stage("compat", "old import paths kept for one release (each is the moved module itself)",
          ("trace", "shapes", "inplace", "exported", "surgery", "spans", "plan", "rewrite", "hf",
           "_nn_pickle", "_refuse_code", "safetensors_io"),
          "`trace.py`, `spans.py`, ... (aliases)"),
)


def rank() -> dict[str, int]:
    """{module: index of its stage}."""
    return {module: i for i, stage in enumerate(STAGES) for module in stage.modules}


def readme_table() -> str:
    """README's "How it works" layout table, generated from ``STAGES``."""
    rows = ["| stage | what | where |", "|---|---|---|"]
    rows += [f"| {s.name} | {s.what} | {s.files} |" for s in STAGES]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(readme_table(), end="")
