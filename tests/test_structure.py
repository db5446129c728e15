"""The structure the code promises: imports flow one way, each product is computed once,
each rule lives in one place, and the tables fit 80 columns."""

import ast
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from rich.console import Console
from rich.table import Table
from rich.text import Text

from helpers import with_gates
from models import deep_mlp, plain_cnn
from ressurgeon import SkipConfig, TraceOptions, add_skips, fold, gate_report, gradient_flow, inspect_model
from ressurgeon.analysis.dominators import DominatorTree
from ressurgeon import _structure as structure
from ressurgeon.cli import render
from ressurgeon.registry import OPS, OpInfo, Role, Trait, register_op

PACKAGE = Path(__file__).resolve().parents[1] / "ressurgeon"

# The stages and their modules are written once, in ressurgeon/_structure.py; README's
# "How it works" table is generated from the same description.
STAGES = [(stage.name, set(stage.modules)) for stage in structure.STAGES]
RANK = structure.rank()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """ressurgeon modules that ``path`` imports (relative imports resolved)."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1] if node.level > 1 else package
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            for alias in node.names:  # ``from . import render`` names a module
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if (PACKAGE / Path(*sub.split("."))).with_suffix(".py").exists()
                          else target)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ressurgeon."):
            found.add(node.module.removeprefix("ressurgeon."))
    return {m for m in found if m}


def _library_files():
    return [p for p in PACKAGE.rglob("*.py") if "cli" not in p.parts
            and p.name not in ("__main__.py",) and p != PACKAGE / "__init__.py"]


def test_every_library_module_has_a_stage():
    assert {_module_name(p) for p in _library_files()} == set(RANK)


def test_no_module_imports_a_later_stage():
    wrong = []
    for path in _library_files():
        me = _module_name(path)
        for other in _imports(path, top_level_only=False):
            if other in RANK and RANK[other] > RANK[me]:
                wrong.append(f"{me} ({STAGES[RANK[me]][0]}) imports {other} "
                             f"({STAGES[RANK[other]][0]})")
    assert not wrong, wrong


def _assert_no_cycle(top_level_only: bool) -> None:
    graph = {_module_name(p): _imports(p, top_level_only=top_level_only) & set(RANK)
             for p in _library_files()}
    for compat in structure.STAGES[-1].modules:  # an alias is the moved module itself
        graph.pop(compat, None)
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(path + [nxt])}"
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_module_level_imports_have_no_cycle():
    _assert_no_cycle(top_level_only=True)


def test_imports_have_no_cycle_inside_functions_either():
    """A function-level import closes a circle as surely as a module-level one."""
    _assert_no_cycle(top_level_only=False)


def test_the_cli_imports_only_the_public_api():
    """The command line parses, calls the public API and renders: it reaches no internals."""
    import ressurgeon

    public = set(ressurgeon._EXPORTS) | {"__version__"}
    wrong = []
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level >= 2):
                continue
            module = node.module or ""
            if module.split(".")[0] in ("config", "errors", "catalog"):
                continue  # the torch-free configs, errors and the family names the flags read
            for alias in node.names:
                if module or alias.name not in public:
                    wrong.append(f"{path.name}:{node.lineno} from ..{module} import {alias.name}")
    assert not wrong, wrong


def test_readme_shows_the_layout_from_the_one_description():
    readme = (PACKAGE.parent / "README.md").read_text()
    assert structure.readme_table() in readme, (
        "README's layout table is stale; paste `python -m ressurgeon._structure`:\n"
        + structure.readme_table())


def test_help_and_version_import_no_torch():
    code = ("import sys\nfrom ressurgeon.cli import main\nsys.argv = ['ressurgeon', '{arg}']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    for arg in ("--help", "--version"):
        done = subprocess.run([sys.executable, "-c", code.format(arg=arg)], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr


# -- each product computed once ---------------------------------------------------------------

@pytest.fixture
def analyses(monkeypatch):
    """Counts graph analyses (one dominator tree each)."""
    calls = []
    real = DominatorTree.__init__

    def counting(self, graph, *args, **kwargs):
        calls.append(graph)
        real(self, graph, *args, **kwargs)

    monkeypatch.setattr(DominatorTree, "__init__", counting)
    return calls


def test_one_analysis_per_add_skips_and_per_inspect(analyses):
    x = torch.randn(2, 3, 16, 16)
    result = add_skips(plain_cnn().eval(), (x,))
    assert result.skips and len(analyses) == 1
    inspect_model(plain_cnn().eval(), (x,))
    assert len(analyses) == 2


def test_one_trace_per_gradient_flow(monkeypatch):
    import ressurgeon.diagnose as diagnose

    traces = []
    real = diagnose.trace_model
    monkeypatch.setattr(diagnose, "trace_model", lambda *a, **k: traces.append(1) or real(*a, **k))
    report = gradient_flow(deep_mlp(6), (torch.randn(8, 32),))
    assert report.skips > 0 and len(traces) == 1


# -- each rule in one place ---------------------------------------------------------------------

class Smooth(nn.Module):
    """A ReLU the registry does not know (kept opaque: fx calls it, it does not trace inside)."""

    def forward(self, x):
        return torch.relu(x)


def _gated_mlp():
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [nn.Linear(16, 16), Smooth()]
    model = nn.Sequential(*layers, nn.Linear(16, 4)).eval()
    x = torch.randn(8, 16)
    result = add_skips(model, (x,), SkipConfig(span=2, init="preserve"),
                       trace=TraceOptions(leaf_modules=("Smooth",)))
    with_gates(result, [0.5, 0.75])
    return result, x


def test_a_registered_activation_lets_fold_absorb_a_gate_across_it():
    result, x = _gated_mlp()
    unknown = fold(result.module, (x,))
    assert {s.outcome for s in unknown.skips} == {"kept"}
    register_op(Smooth, OpInfo(Role.ACTIVATION, traits={Trait.POSITIVE_HOMOGENEOUS}))
    try:
        result, x = _gated_mlp()
        known = fold(result.module, (x,))
    finally:
        OPS.pop(Smooth)
    assert {s.outcome for s in known.skips} == {"absorbed"}
    assert known.max_abs_diff <= known.tolerance


def test_the_shortcut_owns_its_formula_and_the_reports_read_it():
    x = torch.randn(4, 32)
    for init, formula in (("preserve", "h + a*S(x)"), ("rezero", "S(x) + a*h")):
        result = add_skips(deep_mlp(6), (x,), SkipConfig(init=init))
        gates = gate_report(result.module).gates
        assert {g.formula for g in gates} == {formula}
        assert formula in render.gates_legend(gate_report(result.module))


# -- tables at 80 columns -----------------------------------------------------------------------

def _cells(table: Table) -> list[str]:
    out = []
    for column in table.columns:
        for cell in column._cells:
            text = cell.plain if isinstance(cell, Text) else str(cell)
            out.extend(part for part in [text.strip()] if part)
    return out


def _render(table: Table) -> list[str]:
    console = Console(width=80, file=io.StringIO(), color_system=None, legacy_windows=False)
    console.print(table)
    return console.file.getvalue().splitlines()


def _assert_fits(table: Table) -> None:
    lines = _render(table)
    assert all(len(line) <= 80 for line in lines)
    assert not any("…" in line for line in lines), "\n".join(lines)
    for cell in _cells(table):
        assert any(cell in line for line in lines), f"{cell!r} is cut or wrapped:\n" + \
            "\n".join(lines)


def _tables():
    x = torch.randn(2, 3, 32, 32)
    model = plain_cnn().eval()
    result = add_skips(model, (x,), SkipConfig(span=2, init="preserve"))
    found = inspect_model(model, (x,), SkipConfig(span=2))
    mlp, v = deep_mlp(8), torch.randn(4, 32)
    gated = add_skips(mlp, (v,))
    with_gates(gated, [-0.5] * len(gated.skips))  # negative gates into ReLUs: kept, with reasons
    folded = fold(gated.module, (v,))
    flow = gradient_flow(deep_mlp(12), (torch.randn(16, 32),))
    yield "skips", render.skips_table(result.skips)
    yield "spans", render.spans_table(found.spans)
    yield "layers", render.layers_table(found.layers)
    yield "fold", render.fold_table(folded)[0]
    yield "gates", render.gates_table(gate_report(result.module))
    yield "flow", render.flow_table(flow, width=80)


def test_every_table_fits_80_columns_without_cutting_a_value():
    names = []
    for name, table in _tables():
        names.append(name)
        _assert_fits(table)
    assert names == ["skips", "spans", "layers", "fold", "gates", "flow"]


def test_long_texts_go_into_notes_under_the_table():
    x = torch.randn(4, 32)
    result = add_skips(deep_mlp(8), (x,))
    with_gates(result, [-0.5] * len(result.skips))
    table, notes = render.fold_table(fold(result.module, (x,)))
    assert notes and all(re.match(r"  \[\d\] ", n) for n in notes)
    assert any("[1]" in line for line in _render(table))
