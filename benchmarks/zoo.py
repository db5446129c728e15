"""The pass on real architectures: torchvision (and timm, when installed) with weights=None.

For each model: trace, find spans, insert shortcuts (span 2, preserve), check
parity against the original, export to ONNX and run it in ONNX Runtime.
Prints a markdown table: model, graph nodes, layers, existing residuals found,
candidate spans, shortcuts inserted, parity, ONNX ok, seconds.

torchvision is a multi-GB install beside its torch pin, so this lives outside
the default test run (``tests/test_zoo.py`` runs the same list under
``pytest -m zoo``):

    python3 -m venv /work/zoo-venv
    /work/zoo-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/zoo-venv/bin/pip install -e . onnx onnxscript onnxruntime pytest timm
    /work/zoo-venv/bin/python benchmarks/zoo.py
    /work/zoo-venv/bin/python benchmarks/zoo.py --tasks   # segmentation and detection

The column "gates left after fold" sets every gate to a trained-like value
(0.3-0.7, as fine-tuning leaves them; zero gates would simply be removed) and
counts the gates ``fold`` must keep as a Mul, with the op that blocked each.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for benchmarks/
from collections import Counter  # noqa: E402

from benchmarks._models import gates_left_after_fold, set_trained_gates  # noqa: E402
from ressurgeon import SkipConfig, add_skips  # noqa: E402
from ressurgeon.spans import analyze_graph  # noqa: E402

# (library, model name, input shape, builder kwargs): small inputs, weights=None.
TORCHVISION = [
    ("alexnet", (1, 3, 64, 64), {}),
    ("vgg11_bn", (1, 3, 32, 32), {}),
    ("resnet18", (1, 3, 64, 64), {}),
    ("resnet50", (1, 3, 64, 64), {}),
    ("resnext50_32x4d", (1, 3, 64, 64), {}),
    ("googlenet", (1, 3, 64, 64), {"aux_logits": False, "init_weights": False}),
    ("inception_v3", (1, 3, 96, 96), {"aux_logits": False, "init_weights": False}),
    ("densenet121", (1, 3, 64, 64), {}),
    ("squeezenet1_0", (1, 3, 64, 64), {}),
    ("shufflenet_v2_x0_5", (1, 3, 64, 64), {}),
    ("mobilenet_v2", (1, 3, 64, 64), {}),
    ("mobilenet_v3_small", (1, 3, 64, 64), {}),
    ("mnasnet0_5", (1, 3, 64, 64), {}),
    ("efficientnet_b0", (1, 3, 64, 64), {}),
    ("regnet_y_400mf", (1, 3, 64, 64), {}),
    ("convnext_tiny", (1, 3, 64, 64), {}),
    ("swin_t", (1, 3, 64, 64), {}),
    ("vit_b_16", (1, 3, 64, 64), {"image_size": 64}),
    ("maxvit_t", (1, 3, 224, 224), {}),
    ("video.r3d_18", (1, 3, 4, 32, 32), {}),
]

TIMM = [
    ("resnet18", (1, 3, 64, 64), {}),
    ("efficientnet_b0", (1, 3, 64, 64), {}),
    ("convnext_atto", (1, 3, 64, 64), {}),
    ("vit_tiny_patch16_224", (1, 3, 64, 64), {"img_size": 64}),
    ("mixer_s16_224", (1, 3, 64, 64), {"img_size": 64}),
    ("mobilevit_xxs", (1, 3, 64, 64), {}),
]

# Dense prediction (issue 24), a table of their own (``--tasks``): (name, input shape,
# builder kwargs, the submodule to rewrite or None). Segmentation models trace whole and
# upsample once, so they are a parity check for the mirror pattern, not a target; torch.fx
# cannot trace a detection model whole, so its backbone is rewritten and spliced back.
TASKS = [
    ("segmentation.fcn_resnet50", (1, 3, 64, 64),
     {"weights_backbone": None, "num_classes": 3}, None),
    ("segmentation.deeplabv3_mobilenet_v3_large", (1, 3, 64, 64),
     {"weights_backbone": None, "num_classes": 3}, None),
    ("segmentation.lraspp_mobilenet_v3_large", (1, 3, 64, 64),
     {"weights_backbone": None, "num_classes": 3}, None),
    ("detection.fasterrcnn_mobilenet_v3_large_fpn", (1, 3, 128, 128),
     {"weights_backbone": None, "num_classes": 3}, "backbone"),
    ("detection.retinanet_resnet50_fpn", (1, 3, 128, 128),  # untrained scores sit near its
     {"weights_backbone": None, "num_classes": 3, "score_thresh": 0.001}, "backbone"),  # prior 0.01
]

# Left out on purpose, each with the reason.
EXCLUDED = {
    "torchvision optical flow (raft)":
        "outputs a list of flow iterations from a recurrent update loop with a correlation "
        "volume; not among the dense-prediction models above",
    "torchvision quantized models": "int8 kernels; shortcuts belong in the float model before quantizing",
    "vit_h_14, regnet_y_128gf, efficientnet_v2_l, vgg19_bn":
        "same structure as a smaller sibling listed above, several GB of float32 weights",
    "timm (any model not listed)": "a sample of timm's families; every model is one line to add",
}


@dataclass
class Row:
    library: str
    model: str
    nodes: int = 0
    layers: int = 0
    residuals: int = 0
    candidates: int = 0
    skips: int = 0
    parity: float | None = None
    onnx: str = "-"
    kept: str = "-"            # gates fold keeps as a Mul (trained-like gates), with why
    seconds: float = 0.0
    error: str = ""

    def markdown(self) -> str:
        parity = "-" if self.parity is None else f"{self.parity:.1e}" if self.parity else "0"
        cells = [f"{self.library}.{self.model}", self.nodes, self.layers, self.residuals,
                 self.candidates, self.skips, parity, self.onnx, self.kept, f"{self.seconds:.1f}"]
        line = "| " + " | ".join(str(c) for c in cells) + " |"
        return line + (f" {self.error}" if self.error else "")


HEADER = ("| model | nodes | layers | existing residuals | candidates | skips inserted | "
          "parity (max abs) | ONNX ok | gates left after fold | s |\n"
          "|---|---:|---:|---:|---:|---:|---:|---|---|---:|")


def build(library: str, name: str, kwargs: dict):
    """The model, weights=None, eval mode, seeded."""
    torch.manual_seed(0)
    if library == "torchvision":
        import torchvision.models as tvm

        owner, _, short = name.rpartition(".")
        namespace = getattr(tvm, owner) if owner else tvm
        return getattr(namespace, short)(weights=None, **kwargs).eval()
    import timm

    return timm.create_model(name, pretrained=False, **kwargs).eval()


def export_onnx_checked(module, inputs, folder: Path) -> str:
    """'yes' when the file passes the checker and ONNX Runtime matches PyTorch."""
    try:
        from ressurgeon.onnx_export import export_onnx
    except ImportError:  # the project's exporter is newer than this checkout: plain torch.onnx
        export_onnx = None
    path = folder / "model.onnx"
    if export_onnx is not None:
        report = export_onnx(module, path, inputs)
        return "yes" if report.parity_checked else "written"
    torch.onnx.export(module.eval(), inputs, str(path), dynamo=True)
    return "written"


def run_one(library: str, name: str, shape: tuple, kwargs: dict, onnx: bool = True) -> Row:
    """add_skips (span 2, preserve) and, optionally, ONNX export on one model."""
    row = Row(library, name)
    start = time.perf_counter()
    try:
        model = build(library, name, kwargs)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        result = add_skips(model, (x,), SkipConfig(span=2))
        analysis = analyze_graph(result.module)
        row.nodes = len(result.module.graph.nodes) - len(result.skips)  # as traced
        row.layers = len(analysis.layers)
        row.residuals = len(result.residuals)
        row.candidates = len(result.spans)
        row.skips = len(result.skips)
        row.parity = result.parity.max_abs_diff
        if result.skips:  # with gates as fine-tuning leaves them: 0.3-0.7, never zero
            count, reasons = gates_left_after_fold(set_trained_gates(result.module), (x,))
            row.kept = f"{count}" + (f" ({_why(reasons)})" if count else "")
        if onnx:
            with tempfile.TemporaryDirectory() as folder:
                row.onnx = export_onnx_checked(result.module, (x,), Path(folder))
    except Exception as exc:  # the table reports every failure and goes on
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        if row.onnx == "-" and row.skips:
            row.onnx = "no"
    row.seconds = time.perf_counter() - start
    return row


@dataclass
class TaskRow:
    """One segmentation or detection model: add_skips (span 2, preserve), mirror pairs."""

    model: str
    module: str = "-"          # the submodule rewritten and spliced back, or "-" for the whole
    nodes: int = 0             # of the traced graph (the submodule's with ``module``)
    layers: int = 0
    residuals: int = 0
    candidates: int = 0
    skips: int = 0
    mirror: str = "-"          # mirror pairs chosen of candidates, and why none qualifies
    parity: float | None = None
    outputs: str = "-"         # output tensors compared (detections: boxes compared)
    kept_class: str = "-"      # whether the result is still the model's own class
    seconds: float = 0.0
    error: str = ""

    def markdown(self) -> str:
        parity = "-" if self.parity is None else f"{self.parity:.1e}" if self.parity else "0"
        cells = [f"torchvision.{self.model}", self.module, self.nodes, self.layers,
                 self.residuals, self.candidates, self.skips, self.mirror, parity,
                 self.outputs, self.kept_class, f"{self.seconds:.1f}"]
        line = "| " + " | ".join(str(c) for c in cells) + " |"
        return line + (f" {self.error}" if self.error else "")


TASK_HEADER = ("| model | module | nodes | layers | existing residuals | candidates | "
               "skips inserted | mirror pairs | parity (max abs) | outputs compared | "
               "own class | s |\n"
               "|---|---|---:|---:|---:|---:|---:|---|---:|---|---|---:|")


def run_task(name: str, shape: tuple, kwargs: dict, module: str | None) -> TaskRow:
    """add_skips (span 2, preserve) on a segmentation model, or on a detection model's backbone.

    The whole result runs against the original (``parity``); segmentation models
    also get ``find_spans(pattern="mirror")``, whose reasons say why no pair qualifies.
    """
    from ressurgeon import find_spans

    row = TaskRow(name, module or "-")
    start = time.perf_counter()
    try:
        model = build("torchvision", name, kwargs)
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
        result = add_skips(model, (x,), SkipConfig(span=2, module=module))
        traced = result.module.get_submodule(module) if module else result.module
        row.nodes = len(traced.graph.nodes) - len(result.skips)  # as traced
        row.layers = len(analyze_graph(traced).layers)
        row.residuals = len(result.residuals)
        row.candidates = len(result.spans)
        row.skips = len(result.skips)
        row.parity = result.parity.max_abs_diff
        if module:  # the whole model traced is a GraphModule; a spliced one keeps its class
            row.kept_class = "yes" if type(result.module) is type(model) else "no"
        with torch.no_grad():
            out = model(x)
        if isinstance(out, list):  # detection: one dict of boxes, scores, labels per image
            row.outputs = f"{sum(len(d['boxes']) for d in out)} boxes"
        else:
            row.outputs = f"{result.parity.outputs} tensor(s)"
        if module is None:
            spans = find_spans(model, (x,), SkipConfig(pattern="mirror"))
            reasons = Counter(str(s.reason) for s in spans if not s.chosen)
            chosen = sum(s.chosen for s in spans)
            row.mirror = f"{chosen} of {len(spans)}" + (
                f" ({', '.join(f'{n} {r}' for r, n in sorted(reasons.items()))})"
                if reasons else "")
    except Exception as exc:  # the table reports every failure and goes on
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    row.seconds = time.perf_counter() - start
    return row


def _why(reasons: list[str]) -> str:
    """The kept gates' reasons, shortened to the op that blocked each and counted."""
    short = Counter(r.split(" (")[0].replace("its scale would reach ", "")
                    .replace(", which needs the true values", "") for r in reasons)
    return "; ".join(f"{n}x {text}" if n > 1 else text for text, n in short.most_common())


def zoo(libraries: tuple[str, ...] = ("torchvision", "timm")) -> list[tuple[str, str, tuple, dict]]:
    """Every (library, model, shape, kwargs) whose library is importable."""
    entries = []
    for library, table in (("torchvision", TORCHVISION), ("timm", TIMM)):
        if library not in libraries:
            continue
        try:
            __import__(library)
        except ImportError:
            continue
        entries += [(library, name, shape, kwargs) for name, shape, kwargs in table]
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="model names to run (default: all)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX export column")
    parser.add_argument("--tasks", action="store_true",
                        help="the segmentation and detection table (TASKS) instead")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # exporters log progress; the table is the output
    warnings.simplefilter("ignore")
    if args.tasks:
        try:
            import torchvision
        except ImportError:
            sys.exit("torchvision is not importable; see the module docstring")
        print(f"<!-- torch {torch.__version__}, torchvision {torchvision.__version__}; "
              f"{platform.machine()}, {torch.get_num_threads()} threads -->")
        print(TASK_HEADER)
        for entry in TASKS:
            if not args.only or entry[0].rpartition(".")[2] in args.only:
                with contextlib.redirect_stderr(io.StringIO()):
                    row = run_task(*entry)
                print(row.markdown(), flush=True)
        return
    entries = [e for e in zoo() if not args.only or e[1] in args.only]
    if not entries:
        sys.exit("neither torchvision nor timm is importable; see the module docstring")
    versions = [f"torch {torch.__version__}"]
    for lib in ("torchvision", "timm", "onnxruntime"):
        with contextlib.suppress(ImportError):
            versions.append(f"{lib} {__import__(lib).__version__}")
    print(f"<!-- {', '.join(versions)}; {platform.machine()}, "
          f"{torch.get_num_threads()} threads -->")
    print(HEADER)
    for entry in entries:
        with contextlib.redirect_stderr(io.StringIO()):
            row = run_one(*entry, onnx=not args.no_onnx)
        print(row.markdown(), flush=True)


if __name__ == "__main__":
    main()
