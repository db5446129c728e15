"""What every command shares: options, one session (output + error mapping), input handling.

A command body runs inside ``with session(as_json=..., quiet=..., debug=...) as out:``.
The session owns the three flags: ``out.step`` shows a spinner on stderr,
``out.note`` a line on stderr (both silent with --quiet or --json),
``out.emit(data, render)`` prints JSON on stdout with --json and calls
``render()`` otherwise, and every exception becomes one line and an exit code.

Nothing here imports torch at module level: ``ressurgeon --help`` stays fast.
"""

from __future__ import annotations

import ast
import contextlib
import json
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ..catalog import JOINS, PATTERNS
from ..config import Init, Kind, Placement, SkipConfig, TraceOptions
from ..errors import ConfigError, RessurgeonError, VerificationError, brief

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

FIELDS = {f.name: f for f in fields(SkipConfig)}
DEFAULTS = SkipConfig()


def cfg_help(name: str) -> str:
    return FIELDS[name].metadata["help"]


def _choice(flag: str, enum) -> typer.models.OptionInfo:
    """A flag whose values are an enum's: listed in --help, completed by the shell, and
    checked by SkipConfig (so a bad value is a one-line error naming the choices)."""
    values = [getattr(m, "value", m) for m in enum]  # an enum, or a catalog table's names
    return typer.Option(flag, metavar="|".join(values), show_default=True,
                        help=cfg_help(flag.lstrip("-")),
                        autocompletion=lambda incomplete: [v for v in values
                                                           if v.startswith(incomplete)])


# SkipConfig fields as flags: the help text comes from the dataclass field itself,
# the choices from its enum.
SpanOpt = Annotated[int, typer.Option("--span", help=cfg_help("span"))]
KindOpt = Annotated[str, _choice("--kind", Kind)]
InitOpt = Annotated[str, _choice("--init", Init)]
JoinOpt = Annotated[str, _choice("--join", JOINS)]
PatternOpt = Annotated[str, _choice("--pattern", PATTERNS)]
PlacementOpt = Annotated[str, _choice("--placement", Placement)]
IncludeOpt = Annotated[Optional[list[str]], typer.Option(
    "--include", metavar="PATTERN", help=cfg_help("include"), show_default=False)]
ExcludeOpt = Annotated[Optional[list[str]], typer.Option(
    "--exclude", metavar="PATTERN", help=cfg_help("exclude"), show_default=False)]
MaxSkipsOpt = Annotated[Optional[int], typer.Option(
    "--max-skips", help=cfg_help("max_skips"), show_default=False)]
ModuleOpt = Annotated[Optional[str], typer.Option(
    "--module", metavar="NAME", help=cfg_help("module"), show_default=False)]

# Options shared by several commands (typer builds flags from these annotations).
ModelArg = Annotated[Path, typer.Argument(help="Model file: .pt2 archive, .pt/.pth state_dict "
                                          "(with --arch), .safetensors (with --arch), a pickled "
                                          "module of torch.nn classes, or any other pickled "
                                          "module or TorchScript file (with --trust-pickle); or "
                                          "a Hugging Face save_pretrained folder (config.json + "
                                          "model.safetensors; needs transformers).",
                                          show_default=False)]
InputShapeOpt = Annotated[Optional[list[str]], typer.Option(
    "--input-shape", "-i", metavar="SHAPE[:DTYPE]", help="Example input shape, e.g. 1,3,224,224; "
    "add a dtype for integer inputs, e.g. 2,8:int64 for token ids; repeat for models with "
    "several inputs. Defaults to the shapes and dtypes stored in a .pt2 archive, or for a "
    "Hugging Face folder to its config's (1,16:int64 token ids, or 1,C,H,W images).",
    show_default=False)]
VocabOpt = Annotated[Optional[int], typer.Option(
    "--vocab", metavar="N", help="Integer example inputs are drawn from [0, N); default: a "
    "Hugging Face model's input embedding, else the smallest nn.Embedding of the model (else "
    "2).", show_default=False)]
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
    "--leaf", metavar="PATTERN", help="Glob on module names or class names that tracing keeps "
    "opaque (repeatable).", show_default=False)]
FakeOpt = Annotated[bool, typer.Option(
    "--fake", help="Record shapes with FakeTensors (no activation memory, no arithmetic) for "
    "large models; the parity check still runs the real model, so pair it with --no-verify "
    "where the model cannot run here.")]
ConcreteOpt = Annotated[Optional[list[str]], typer.Option(
    "--concrete", metavar="NAME=VALUE", help="Fix a non-tensor forward argument while tracing, "
    "e.g. --concrete features_only=True (value as a Python literal; repeatable).",
    show_default=False)]
DynamicOpt = Annotated[Optional[list[str]], typer.Option(
    "--dynamic", metavar="[INPUT:]DIM", help="Keep this dim symbolic when torch.export captures "
    "or saves the model, e.g. --dynamic 1 for the sequence dim of every input, --dynamic 0:1 "
    "for input 0 only (repeatable). The batch (dim 0) is dynamic already.", show_default=False)]
PlanOutOpt = Annotated[Optional[Path], typer.Option(
    "--plan-out", help="Write the plan as JSON, to edit and apply again with --plan.",
    show_default=False)]
PlotOpt = Annotated[Optional[Path], typer.Option(
    "--plot", metavar="FILE.png", help="Also draw a figure (.png, .svg or .pdf); needs "
    "matplotlib: pip install 'ressurgeon\\[plot]'.", show_default=False)]
WideOpt = Annotated[bool, typer.Option(
    "--wide", help="Show every column (full shapes, module names, reasons) even if the "
    "table gets wider than 80 columns.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable report on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes on stderr.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]

# Options shared by every command that writes ONNX.
OnnxOpt = Annotated[Optional[Path], typer.Option(
    "--onnx", metavar="OUT.onnx", help="Also write the model as ONNX (dynamo exporter, checked "
    "with onnx.checker and, when onnxruntime is installed, against PyTorch at two batch sizes).",
    show_default=False)]
OpsetOpt = Annotated[Optional[int], typer.Option(
    "--opset", help="ONNX opset version (default: the exporter's own, 18+).", show_default=False)]
Fp16Opt = Annotated[bool, typer.Option(
    "--fp16", help="Convert the model to float16 before the ONNX export (parity is measured "
    "against the float32 model).")]
StaticBatchOpt = Annotated[bool, typer.Option(
    "--static-batch", help="Fix the ONNX batch size to the example's instead of a symbolic "
    "'batch' dimension.")]
NoCheckOpt = Annotated[bool, typer.Option(
    "--no-check", help="Skip the ONNX Runtime parity run (the checker still runs).")]


class Output:
    """Where a command's results and messages go: JSON or a table on stdout, notes on stderr."""

    def __init__(self, *, as_json: bool, quiet: bool):
        self.as_json = as_json
        self.quiet = quiet or as_json

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        """A spinner on stderr while the block runs."""
        if self.quiet:
            yield
            return
        with err.status(text):
            yield

    def note(self, text: str) -> None:
        if not self.quiet:
            err.print(text, markup=False, highlight=False)

    def line(self, text: str) -> None:
        """A plain line of the result on stdout (not with --json)."""
        if not self.as_json:
            console.print(text, markup=False, highlight=False)

    def emit(self, data: dict, render: Callable[[], None] | None = None) -> None:
        """The result: ``data`` as JSON on stdout with --json, else ``render()``."""
        if self.as_json:
            sys.stdout.write(json.dumps(data, indent=2, default=_json_default) + "\n")
        elif render is not None:
            render()

    def table(self, table) -> None:
        if not self.as_json:
            console.print(table)


def _json_default(value):
    if isinstance(value, tuple):
        return list(value)
    return str(value)


@contextlib.contextmanager
def session(*, as_json: bool = False, quiet: bool = False, debug: bool = False) -> Iterator[Output]:
    """The one place that turns exceptions into a message and an exit code.

    Exit codes: 2 bad input or usage (any ``RessurgeonError``), 3 a requested
    verification failed (``VerificationError``), 130 interrupted, 1 a fault of
    ressurgeon's own (with --debug, the traceback).
    """
    try:
        yield Output(as_json=as_json, quiet=quiet)
    except (typer.Exit, typer.Abort):
        raise
    except RessurgeonError as exc:
        if debug:
            traceback.print_exc()
        typer.echo(f"error: {_one_line(exc)}", err=True)
        raise typer.Exit(3 if isinstance(exc, VerificationError) else 2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    except Exception as exc:
        if debug:
            traceback.print_exc()
        typer.echo(f"internal error: {type(exc).__name__}: {brief(exc)} (this is a ressurgeon "
                   "bug; run again with --debug and report the traceback)", err=True)
        raise typer.Exit(1) from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def config_from_flags(*, span: int = DEFAULTS.span, kind=DEFAULTS.kind, init=DEFAULTS.init,
                      join=DEFAULTS.join, pattern=DEFAULTS.pattern,
                      placement=DEFAULTS.placement,
                      include: list[str] | None = None, exclude: list[str] | None = None,
                      max_skips: int | None = None, module: str | None = None) -> SkipConfig:
    """The SkipConfig the shared flags describe (validated: ConfigError names the flag's field)."""
    return SkipConfig(span=span, kind=kind, init=init, join=join, pattern=pattern,
                      placement=placement, include=tuple(include or ()),
                      exclude=tuple(exclude or ()), max_skips=max_skips, module=module)


def trace_from_flags(*, leaf: list[str] | None = None, concrete: list[str] | None = None,
                     fake: bool = False, dynamic: list[str] | None = None) -> TraceOptions:
    return TraceOptions(leaf_modules=tuple(leaf or ()), concrete_args=parse_concrete(concrete),
                        fake=fake, dynamic=parse_dynamic(dynamic))


def parse_dynamic(items: list[str] | None) -> tuple[tuple[int | None, int], ...]:
    """['1', '0:2'] -> ((None, 1), (0, 2))."""
    pairs = []
    for item in items or ():
        match = re.fullmatch(r"(?:([0-9]{1,3}):)?(-?[0-9]{1,3})", item.strip())
        if match is None:
            raise ConfigError(f"--dynamic {item!r} must be DIM or INPUT:DIM, e.g. --dynamic 1 "
                              "(every input's dim 1) or --dynamic 0:1")
        pairs.append((None if match[1] is None else int(match[1]), int(match[2])))
    return tuple(pairs)


MAX_DIM = 2 ** 31 - 1
# Example inputs only need to be representative; past this they would take more
# memory than any shape check needs (the model's activations take far more still).
MAX_INPUT_BYTES = 2 ** 30


INPUT_DTYPES = {"int64": "int64", "long": "int64", "int32": "int32", "int": "int32",
                "bool": "bool", "float32": "float32", "float16": "float16",
                "bfloat16": "bfloat16", "float64": "float64"}


def parse_input(text: str) -> tuple[tuple[int, ...], str | None]:
    """'2,8:int64' -> ((2, 8), 'int64'); '1,3,32,32' -> ((1, 3, 32, 32), None)."""
    shape_text, sep, dtype = text.partition(":")
    if sep and dtype.strip() not in INPUT_DTYPES:
        raise ConfigError(f"--input-shape {text!r}: {dtype!r} is not a dtype; use one of "
                          f"{', '.join(sorted(set(INPUT_DTYPES.values())))}, e.g. 2,8:int64")
    return parse_shape(shape_text), INPUT_DTYPES[dtype.strip()] if sep else None


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,32,32' (or 1x3x32x32) -> (1, 3, 32, 32)."""
    parts = re.split(r"[,x]", text.replace(" ", "").strip("()[]"))
    ascii_digits = all(re.fullmatch(r"[0-9]{1,12}", p) for p in parts)
    shape = tuple(int(p) for p in parts) if ascii_digits else ()
    if not shape or any(not 1 <= d <= MAX_DIM for d in shape):
        raise ConfigError(f"--input-shape {text!r} is not a shape; write positive integers "
                          "separated by commas, e.g. --input-shape 1,3,224,224")
    return shape


def check_input_memory(shapes: list[tuple[int, ...]], dtype, flag: str = "--input-shape") -> None:
    """Refuse example inputs too large to build (they are only examples)."""
    import math

    import torch

    size = sum(math.prod(s) for s in shapes) * max(8, torch.empty((), dtype=dtype).element_size())
    if size > MAX_INPUT_BYTES:
        shown = " ".join(",".join(map(str, s)) for s in shapes)
        raise ConfigError(f"{flag} {shown} would take {size / 2 ** 30:.1f} GiB of example input "
                          f"(at most {MAX_INPUT_BYTES / 2 ** 30:.0f} GiB): give a smaller "
                          "example (a batch of 1-2 and a small size show the same layers), or "
                          "plan with shapes only: --fake --no-verify -o OUT.pt")


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
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name} does not exist: this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps was asked for but MPS is not available here; "
                          "use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name}: ressurgeon runs models on cpu, cuda or mps; for "
                          "shapes without memory use --fake")
    return device


def _resolved(path: Path, flag: str) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        raise ConfigError(f"{flag} {path}: {getattr(exc, 'strerror', None) or exc}") from None


def check_paths(inputs: list[Path | None], outputs: dict[str, Path | None],
                code_folder: Path | None = None) -> None:
    """Check every input and output path of a run against each other, before any work.

    No output is an input (ressurgeon never overwrites its input), a folder, or
    another output; each output's folder exists and takes a new file; the
    --save-code folder is new or one ressurgeon wrote, and holds no other input
    or output of the run (its old files may be replaced).
    """
    from .._io import check_code_folder, check_writable

    sources = {_resolved(p, "input"): p for p in inputs if p is not None}
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        key = _resolved(path, flag)
        if key in sources:
            raise ConfigError(f"{flag} {path} is one of the inputs; ressurgeon never overwrites "
                              "its input: choose another output name")
        if key in seen:
            raise ConfigError(f"{seen[key]} and {flag} both name {path}; give each output its "
                              "own file")
        try:
            if path.is_dir():
                raise ConfigError(f"{flag} {path} is a folder; give a file name")
            check_writable(path)
        except OSError as exc:
            raise ConfigError(f"{flag} {str(path)[:80]}: {exc.strerror or exc}") from None
        seen[key] = flag
    if code_folder is None:
        return
    folder = _resolved(code_folder, "--save-code")
    for key, label in [*((k, f"the input {p}") for k, p in sources.items()),
                       *((k, f"{f} {outputs[f]}") for k, f in seen.items())]:
        if key == folder or folder in key.parents:
            raise ConfigError(f"--save-code {code_folder} holds {label}; give the source code a "
                              "folder of its own")
    try:
        check_code_folder(code_folder)
        check_writable(code_folder)
    except OSError as exc:
        raise ConfigError(f"--save-code {str(code_folder)[:80]}: {exc.strerror or exc}") from None


def check_plot_extra(plot: Path | None) -> None:
    """--plot needs matplotlib: say so before any work, not after writing the model."""
    if plot is None:
        return
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("--plot needs matplotlib: pip install 'ressurgeon[plot]'")


def load_with_inputs(model_path: Path, shapes: list[str] | None, arch: str | None, trust: bool,
                     dtype: str, device: str, out: Output, plan_shapes=(), *,
                     shapes_only: bool = False, vocab: int | None = None):
    """Load the model and build seeded example inputs on the requested dtype and device.

    A TorchScript archive (only with --trust-pickle) becomes a graph here, once
    example inputs exist. ``shapes_only`` (``--fake --no-verify``): the inputs are
    ``meta`` tensors, which hold no memory; ``real_inputs`` makes real ones where
    a writer needs them.
    """
    import torch

    from ..load import from_torchscript, load_model

    dt, dev = parse_dtype(dtype), parse_device(device)
    with out.step(f"loading {model_path}"):
        model = load_model(model_path, arch=arch, trust_pickle=trust)
    if isinstance(model, torch.jit.ScriptModule):  # needs inputs before it can become a graph
        script_inputs = example_inputs(model, shapes, model_path, None, None, plan_shapes,
                                       vocab=vocab)
        with out.step("converting TorchScript to a graph"):
            model = from_torchscript(model, script_inputs)
    model = model.to(device=dev, dtype=dt)
    return model, example_inputs(model, shapes, model_path, dt, "meta" if shapes_only else dev,
                                 plan_shapes, vocab=vocab)


def example_inputs(model, shapes: list[str] | None, model_path: Path, dtype=None, device=None,
                   plan_shapes=(), *, vocab: int | None = None) -> tuple:
    """Seeded random inputs of the given shapes and dtypes (or those a plan or a .pt2 recorded).

    Floating inputs take ``dtype`` (the model's); integer inputs (token ids) are
    drawn from [0, vocab), vocab defaulting to a Hugging Face model's input
    embedding, else the model's smallest embedding. Without shapes, a Hugging
    Face model's come from its config (``hf.example_specs``).
    """
    import torch

    from ..hf import example_specs, vocab_size
    from ..capture.shapes import positional_inputs

    if shapes:
        specs = [parse_input(s) for s in shapes]
    else:
        specs = ([(tuple(s), None) for s in plan_shapes] or stored_inputs(model)
                 or example_specs(model))
    if not specs:
        raise ConfigError(f"cannot tell the input shape of {model_path}; pass --input-shape, "
                          "e.g. --input-shape 1,3,224,224 (or 2,8:int64 for token ids), one "
                          f"per input{positional_inputs(model, 2)}")
    if vocab is not None and vocab < 1:
        raise ConfigError(f"--vocab {vocab} must be at least 1")
    dtypes = [getattr(torch, name) if name else (dtype or torch.float32) for _, name in specs]
    if str(device) == "meta":
        return tuple(torch.empty(s, dtype=d, device="meta") for (s, _), d in zip(specs, dtypes))
    check_input_memory([s for s, _ in specs], dtype or torch.float32)
    gen = torch.Generator().manual_seed(0)
    high = vocab or vocab_size(model) or embedding_size(model) or 2
    made = []
    for (shape, _), dt in zip(specs, dtypes):
        if dt.is_floating_point:
            made.append(torch.randn(shape, generator=gen).to(device=device, dtype=dt))
        else:
            top = 2 if dt is torch.bool else high
            made.append(torch.randint(0, top, shape, generator=gen).to(device=device, dtype=dt))
    return tuple(made)


def embedding_size(model) -> int | None:
    """The smallest number of embeddings of any nn.Embedding (or aten.embedding weight) in it."""
    import torch
    from torch import fx

    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    graph = getattr(model, "graph", None)
    if isinstance(graph, fx.Graph):
        for node in graph.nodes:
            if node.target is torch.ops.aten.embedding.default and node.args \
                    and getattr(node.args[0], "op", None) == "get_attr":
                owner, _, leaf = str(node.args[0].target).rpartition(".")
                weight = getattr(model.get_submodule(owner) if owner else model, leaf)
                sizes.append(int(weight.shape[0]))
    return min(sizes) if sizes else None


def real_inputs(model, inputs: tuple) -> tuple:
    """``inputs`` as real seeded tensors on the model's device (they may be ``meta``)."""
    if not any(t.device.type == "meta" for t in inputs):
        return inputs
    device = next((p.device for p in model.parameters()), None)
    floats = [t.dtype for t in inputs if t.is_floating_point()]
    specs = [",".join(map(str, t.shape)) + ("" if t.is_floating_point()
                                             else f":{str(t.dtype).removeprefix('torch.')}")
             for t in inputs]
    return example_inputs(model, specs, Path("model"), floats[0] if floats else None, device)


def stored_inputs(model) -> list[tuple[tuple[int, ...], str | None]]:
    """(shape, dtype name or None for floats) of each input a torch.export archive recorded."""
    from torch import fx

    graph = getattr(model, "graph", None)
    if not isinstance(graph, fx.Graph):
        return []
    dtypes = [getattr(n.meta.get("val"), "dtype", None) for n in graph.nodes
              if n.op == "placeholder"]
    return [(shape, None if dt is None or dt.is_floating_point
             else str(dt).removeprefix("torch."))
            for shape, dt in zip(stored_shapes(model), dtypes)]


def stored_shapes(model) -> list[tuple[int, ...]]:
    """Input shapes a torch.export archive recorded (symbolic sizes take their hint)."""
    from torch import fx

    graph = getattr(model, "graph", None)
    if not isinstance(graph, fx.Graph):  # not a graph module (TorchScript has a graph too)
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


def default_output(model: Path, suffix: str) -> Path:
    """MODEL.<suffix>.pt2 beside the input (e.g. vgg.skips.pt2, vgg.folded.pt2)."""
    return model.with_name(f"{model.stem}.{suffix}.pt2")
