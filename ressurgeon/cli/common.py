"""What every command shares: options, the error-to-exit-code mapping, input handling."""

from __future__ import annotations

import ast
import contextlib
import json
import re
import sys
import traceback
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ..config import SkipConfig
from ..errors import ConfigError, RessurgeonError, brief

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

FIELDS = {f.name: f for f in fields(SkipConfig)}
DEFAULTS = SkipConfig()


def cfg_help(name: str) -> str:
    meta = FIELDS[name].metadata
    choices = meta.get("choices")
    return meta["help"] + (f" (one of: {', '.join(choices)})" if choices else "")


# SkipConfig fields as flags: the help text comes from the dataclass field itself.
SpanOpt = Annotated[int, typer.Option("--span", help=cfg_help("span"))]
KindOpt = Annotated[str, typer.Option("--kind", help=cfg_help("kind"))]
InitOpt = Annotated[str, typer.Option("--init", help=cfg_help("init"))]
PlacementOpt = Annotated[str, typer.Option("--placement", help=cfg_help("placement"))]
IncludeOpt = Annotated[Optional[list[str]], typer.Option(
    "--include", metavar="PATTERN", help=cfg_help("include"), show_default=False)]
ExcludeOpt = Annotated[Optional[list[str]], typer.Option(
    "--exclude", metavar="PATTERN", help=cfg_help("exclude"), show_default=False)]
MaxSkipsOpt = Annotated[Optional[int], typer.Option(
    "--max-skips", help=cfg_help("max_skips"), show_default=False)]

# Options shared by several commands (typer builds flags from these annotations).
ModelArg = Annotated[Path, typer.Argument(help="Model file: .pt2 archive, .pt/.pth state_dict "
                                          "(with --arch), .safetensors (with --arch), a pickled "
                                          "module of torch.nn classes, or any other pickled "
                                          "module or TorchScript file (with --trust-pickle).",
                                          show_default=False)]
InputShapeOpt = Annotated[Optional[list[str]], typer.Option(
    "--input-shape", "-i", metavar="SHAPE", help="Example input shape, e.g. 1,3,224,224; repeat for models "
    "with several inputs. Defaults to the shapes stored in a .pt2 archive.",
    show_default=False)]
ArchOpt = Annotated[Optional[str], typer.Option(
    "--arch", help="module:callable that builds the architecture for a weights file "
    "(imported from the current folder or PYTHONPATH).", show_default=False)]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-pickle", help="Allow loading that runs code from the file: a pickle of classes "
    "other than torch.nn's, a .pt2 that holds pickles, a TorchScript file. Only for files you "
    "made yourself.")]
DtypeOpt = Annotated[str, typer.Option(
    "--dtype", help="Model and input dtype: float32, float16, bfloat16 or float64.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")]
LeafOpt = Annotated[Optional[list[str]], typer.Option(
    "--leaf", metavar="PATTERN", help="Glob on module names or class names that tracing keeps opaque "
    "(repeatable).", show_default=False)]
FakeOpt = Annotated[bool, typer.Option(
    "--fake", help="Record shapes with FakeTensors (no activation memory, no arithmetic) for "
    "large models; the parity check still runs the real model, so pair it with --no-verify "
    "where the model cannot run here.")]
ConcreteOpt = Annotated[Optional[list[str]], typer.Option(
    "--concrete", metavar="NAME=VALUE", help="Fix a non-tensor forward argument while tracing, "
    "e.g. --concrete features_only=True (value as a Python literal; repeatable).",
    show_default=False)]
PlotOpt = Annotated[Optional[Path], typer.Option(
    "--plot", metavar="FILE.png", help="Draw the surgery diagram (layers left to right, "
    "shortcuts as arcs); needs matplotlib: pip install 'ressurgeon[plot]'.",
    show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable report on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes on stderr.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]


@contextlib.contextmanager
def handle_errors(debug: bool):
    """The one place that turns exceptions into a message and an exit code."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except RessurgeonError as exc:
        if debug:
            traceback.print_exc()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    except Exception as exc:
        if debug:
            traceback.print_exc()
        typer.echo(f"internal error: {type(exc).__name__}: {brief(exc)} (this is a ressurgeon "
                   "bug; run again with --debug and report the traceback)", err=True)
        raise typer.Exit(1) from None


class Progress:
    """A spinner on stderr for steps that take a moment; silent with --quiet or --json."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    @contextlib.contextmanager
    def step(self, text: str):
        if self.quiet:
            yield
            return
        with err.status(text):
            yield

    def note(self, text: str) -> None:
        if not self.quiet:
            err.print(text, markup=False, highlight=False)


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,32,32' (or 1x3x32x32) -> (1, 3, 32, 32)."""
    parts = re.split(r"[,x]", text.replace(" ", "").strip("()[]"))
    shape = tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else ()
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(f"--input-shape {text!r} is not a shape; write positive integers "
                          "separated by commas, e.g. --input-shape 1,3,224,224")
    return shape


def parse_concrete(items: list[str] | None) -> dict | None:
    """['features_only=True'] -> {'features_only': True}; values are Python literals."""
    if not items:
        return None
    values = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.isidentifier():
            raise ConfigError(f"--concrete {item!r} must look like NAME=VALUE, "
                              "e.g. --concrete features_only=True")
        try:
            values[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ConfigError(f"--concrete {item!r}: {text!r} is not a Python literal "
                              "(a number, True/False/None, a string in quotes)") from None
    return values


def parse_dtype(name: str):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}
    if name not in table:
        raise ConfigError(f"--dtype {name!r} is not supported; use float32, float16, "
                          "bfloat16 or float64")
    return table[name]


def parse_device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; "
                          "use --device cpu")
    return device


def check_output(model: Path, output: Path | None, flag: str = "-o", *,
                 folder: bool = False) -> None:
    """Refuse, before any work, an output that would overwrite the input or cannot be written."""
    if output is None:
        return
    if output.exists() and model.exists() and output.resolve() == model.resolve():
        raise ConfigError(f"{flag} {output} is the input file; ressurgeon never overwrites its "
                          "input: choose another output name")
    if folder and model.exists() and output.resolve() in model.resolve().parents:
        raise ConfigError(f"{flag} {output} holds the input model; choose a new folder")
    if folder and output.is_dir() and not _replaceable(output):
        raise ConfigError(f"{flag} {output} already exists and is not a folder ressurgeon "
                          "wrote; choose a new folder (ressurgeon only replaces its own)")
    if not folder and output.is_dir():
        raise ConfigError(f"{flag} {output} is a folder; give a file name")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"output folder {parent} does not exist; create it first")


def _replaceable(folder: Path) -> bool:
    from ..export import CODE_MARKER

    return (folder / CODE_MARKER).exists() or not any(folder.iterdir())


def check_distinct(inputs: list[Path | None], outputs: dict[str, Path | None]) -> None:
    """No two outputs share a path, and none is one of the inputs (a --plan file, say)."""
    seen: dict[Path, str] = {}
    sources = {p.resolve() for p in inputs if p is not None}
    for flag, path in outputs.items():
        if path is None:
            continue
        key = path.resolve()
        if key in sources:
            raise ConfigError(f"{flag} {path} is one of the inputs; ressurgeon never overwrites "
                              "its input: choose another name")
        if key in seen:
            raise ConfigError(f"{seen[key]} and {flag} both name {path}; give each output its "
                              "own file")
        seen[key] = flag


def prepare(model_path: Path, shapes: list[str] | None, arch: str | None, trust: bool,
             dtype: str, device: str, progress: Progress, plan_shapes=()):
    """Load the model and build seeded example inputs on the requested dtype and device."""
    import torch

    from ..load import from_torchscript, load_model

    dt, dev = parse_dtype(dtype), parse_device(device)
    with progress.step(f"loading {model_path}"):
        model = load_model(model_path, arch=arch, trust_pickle=trust)
    script = isinstance(model, torch.jit.ScriptModule)  # needs inputs before it can be traced
    parsed = [parse_shape(s) for s in shapes] if shapes else list(plan_shapes) or (
        [] if script else stored_shapes(model))
    if not parsed:
        raise ConfigError(f"cannot tell the input shape of {model_path}; pass --input-shape, "
                          "e.g. --input-shape 1,3,224,224")
    model = model.to(device=dev, dtype=dt)
    gen = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(s, generator=gen).to(device=dev, dtype=dt) for s in parsed)
    if script:
        with progress.step("converting TorchScript to a graph"):
            model = from_torchscript(model, inputs)
    return model, inputs


def stored_shapes(model) -> list[tuple[int, ...]]:
    """Input shapes a torch.export archive recorded (symbolic sizes take their hint)."""
    graph = getattr(model, "graph", None)
    if graph is None:
        return []
    shapes = []
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if val is None or not hasattr(val, "shape"):
            return []
        dims = []
        for d in val.shape:
            try:
                dims.append(int(d))
            except Exception:
                hint = getattr(getattr(d, "node", None), "hint", None)
                dims.append(int(hint) if hint is not None else 1)
        shapes.append(tuple(dims))
    return shapes


def default_output(model: Path) -> Path:
    return model.with_name(f"{model.stem}.skips.pt2")


def emit_json(data: dict) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
