"""The command line: parse, call the library, render, map errors to exit codes.

Exit codes: 0 success; 2 bad input or usage; 3 a verification the user asked
for failed; 1 a fault of ressurgeon's own. Results go to stdout (a table, or
JSON with --json); progress, warnings and errors go to stderr.
"""

from __future__ import annotations

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

from .config import SkipConfig
from .errors import ConfigError, RessurgeonError, brief

app = typer.Typer(
    name="ressurgeon",
    help="Add residual (skip) connections to existing PyTorch networks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

_FIELDS = {f.name: f for f in fields(SkipConfig)}
_DEFAULTS = SkipConfig()


def _cfg_help(name: str) -> str:
    meta = _FIELDS[name].metadata
    choices = meta.get("choices")
    return meta["help"] + (f" (one of: {', '.join(choices)})" if choices else "")


# Options shared by several commands (typer builds flags from these annotations).
ModelArg = Annotated[Path, typer.Argument(help="Model file: .pt2 archive, .pt/.pth state_dict "
                                          "(with --arch), .safetensors (with --arch), or a "
                                          "pickled module (with --trust-pickle).",
                                          show_default=False)]
InputShapeOpt = Annotated[Optional[list[str]], typer.Option(
    "--input-shape", "-i", metavar="SHAPE", help="Example input shape, e.g. 1,3,224,224; repeat for models "
    "with several inputs. Defaults to the shapes stored in a .pt2 archive.",
    show_default=False)]
ArchOpt = Annotated[Optional[str], typer.Option(
    "--arch", help="module:callable that builds the architecture for a weights file "
    "(imported from the current folder or PYTHONPATH).", show_default=False)]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-pickle", help="Allow loading a pickled nn.Module. Unpickling runs code from the "
    "file: only for files you made yourself.")]
DtypeOpt = Annotated[str, typer.Option(
    "--dtype", help="Model and input dtype: float32, float16, bfloat16 or float64.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")]
LeafOpt = Annotated[Optional[list[str]], typer.Option(
    "--leaf", metavar="PATTERN", help="Glob on module names or class names that tracing keeps opaque "
    "(repeatable).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable report on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes on stderr.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]


@contextlib.contextmanager
def _errors(debug: bool):
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


class _Progress:
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


def _dtype(name: str):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}
    if name not in table:
        raise ConfigError(f"--dtype {name!r} is not supported; use float32, float16, "
                          "bfloat16 or float64")
    return table[name]


def _device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; "
                          "use --device cpu")
    return device


def _check_output(model: Path, output: Path | None) -> None:
    if output is None:
        return
    if output.exists() and model.exists() and output.resolve() == model.resolve():
        raise ConfigError(f"-o {output} is the input file; ressurgeon never overwrites its "
                          "input: choose another output name")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"output folder {parent} does not exist; create it first")


def _prepare(model_path: Path, shapes: list[str] | None, arch: str | None, trust: bool,
             dtype: str, device: str, progress: _Progress, plan_shapes=()):
    """Load the model and build seeded example inputs on the requested dtype and device."""
    import torch

    from .load import load_model

    dt, dev = _dtype(dtype), _device(device)
    with progress.step(f"loading {model_path}"):
        model = load_model(model_path, arch=arch, trust_pickle=trust)
    parsed = [parse_shape(s) for s in shapes] if shapes else list(plan_shapes) or _stored_shapes(model)
    if not parsed:
        raise ConfigError(f"cannot tell the input shape of {model_path}; pass --input-shape, "
                          "e.g. --input-shape 1,3,224,224")
    model = model.to(device=dev, dtype=dt)
    gen = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(s, generator=gen).to(device=dev, dtype=dt) for s in parsed)
    return model, inputs


def _stored_shapes(model) -> list[tuple[int, ...]]:
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


def _default_output(model: Path) -> Path:
    return model.with_name(f"{model.stem}.skips.pt2")


def _emit_json(data: dict) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.command("add-skips")
def add_skips_cmd(
    model: ModelArg,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Where to write the rewritten model (.pt2, .pt, .safetensors). "
        "Default: MODEL.skips.pt2 beside the input.", show_default=False)] = None,
    input_shape: InputShapeOpt = None,
    span: Annotated[int, typer.Option(help=_cfg_help("span"))] = _DEFAULTS.span,
    kind: Annotated[str, typer.Option(help=_cfg_help("kind"))] = _DEFAULTS.kind,
    init: Annotated[str, typer.Option(help=_cfg_help("init"))] = _DEFAULTS.init,
    placement: Annotated[str, typer.Option(help=_cfg_help("placement"))] = _DEFAULTS.placement,
    include: Annotated[Optional[list[str]], typer.Option(
        metavar="PATTERN", help=_cfg_help("include"), show_default=False)] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(
        metavar="PATTERN", help=_cfg_help("exclude"), show_default=False)] = None,
    max_skips: Annotated[Optional[int], typer.Option(
        help=_cfg_help("max_skips"), show_default=False)] = None,
    plan: Annotated[Optional[Path], typer.Option(
        "--plan", help="Apply this plan (JSON from --plan-out, maybe edited) instead of "
        "choosing spans; its settings win over the span/kind/init flags.",
        show_default=False)] = None,
    plan_out: Annotated[Optional[Path], typer.Option(
        "--plan-out", help="Write the plan as JSON, to edit and apply again with --plan.",
        show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Plan and verify, but write no model file.")] = False,
    save_code: Annotated[Optional[Path], typer.Option(
        "--save-code", help="Also write the rewritten model as readable Python source plus "
        "weights into this folder.", show_default=False)] = None,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    leaf: LeafOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Insert residual shortcuts into MODEL and write the rewritten model.

    Examples:

      ressurgeon add-skips vgg.pt2 -i 1,3,32,32 -o vgg_skips.pt2

      ressurgeon add-skips mlp.pt2 --span 3 --init standard --json

      ressurgeon add-skips weights.pt --arch mynets:build_vgg -i 1,3,224,224 --plan-out plan.json --dry-run

      ressurgeon add-skips vgg.pt2 --plan plan.json -o vgg_skips.pt2
    """
    from . import add_skips
    from .export import atomic_path, save_code as write_code, save_model
    from .plan import SurgeryPlan
    from .report import rejection_summary, skips_table

    progress = _Progress(quiet or as_json)
    with _errors(debug):
        config = SkipConfig(span=span, kind=kind, init=init, placement=placement,
                            include=tuple(include or ()), exclude=tuple(exclude or ()),
                            max_skips=max_skips)
        target = None if dry_run else (output or _default_output(model))
        _check_output(model, target)
        for extra in (plan_out, save_code):
            _check_output(model, extra)
        loaded_plan = SurgeryPlan.load(plan) if plan else None
        net, inputs = _prepare(model, input_shape, arch, trust_pickle, dtype, device, progress,
                               loaded_plan.input_shapes if loaded_plan else ())
        with progress.step("tracing and inserting shortcuts"):
            result = add_skips(net, inputs, config, plan=loaded_plan, leaf_modules=leaf or ())
        if plan_out:
            with atomic_path(plan_out) as tmp:
                tmp.write_text(result.plan.to_json())
            progress.note(f"wrote plan {plan_out}")
        written = None
        if target is not None and result.skips:
            with progress.step(f"writing {target}"):
                written = save_model(result.module, target, inputs)
            progress.note(f"wrote {written}")
        if save_code is not None and result.skips:
            write_code(result.module, save_code)
            progress.note(f"wrote source to {save_code}/")
        if as_json:
            _emit_json({**result.to_dict(), "output": str(written) if written else None})
            return
        if not result.skips:
            progress.note(f"no shortcut inserted: {rejection_summary(result.spans) or 'the model has no layers to join'}; nothing written")
            return
        out.print(skips_table(result.skips))
        summary = rejection_summary(result.spans)
        if summary:
            progress.note(summary)
        parity = result.parity
        if parity is not None and result.plan.config.init != "preserve":
            progress.note(f"note: init '{result.plan.config.init}' changes the model's outputs "
                          f"(max abs diff {parity.max_abs_diff:.3g} on the example input); "
                          "fine-tune before use")
        elif parity is not None:
            progress.note(f"outputs unchanged: max abs diff {parity.max_abs_diff:.3g} "
                          f"(tolerance {parity.tolerance:g})")


@app.command("inspect")
def inspect_cmd(
    model: ModelArg,
    input_shape: InputShapeOpt = None,
    span: Annotated[int, typer.Option(help=_cfg_help("span"))] = _DEFAULTS.span,
    kind: Annotated[str, typer.Option(help=_cfg_help("kind"))] = _DEFAULTS.kind,
    placement: Annotated[str, typer.Option(help=_cfg_help("placement"))] = _DEFAULTS.placement,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    leaf: LeafOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show the layers ressurgeon sees and every candidate span, chosen or rejected with the reason. Writes nothing.

    Examples:

      ressurgeon inspect vgg.pt2

      ressurgeon inspect mlp.pt2 --span 3 --json
    """
    from .report import layers_table, spans_table
    from .spans import find_layers, select_spans
    from .trace import trace_model

    progress = _Progress(quiet or as_json)
    with _errors(debug):
        config = SkipConfig(span=span, kind=kind, placement=placement)
        net, inputs = _prepare(model, input_shape, arch, trust_pickle, dtype, device, progress)
        with progress.step("tracing"):
            gm = trace_model(net, inputs, leaf_modules=leaf or ())
            layers = find_layers(gm)
            spans = select_spans(gm, config)
        nodes = sum(1 for _ in gm.graph.nodes)
        method = gm.meta["ressurgeon"]["method"]
        if as_json:
            _emit_json({"nodes": nodes, "method": method,
                        "layers": [lay.__dict__ for lay in layers],
                        "spans": [s.to_dict() for s in spans]})
            return
        out.print(f"{model}: {nodes} graph nodes, {len(layers)} layers, traced with {method}",
                  markup=False, highlight=False)
        out.print(layers_table(layers))
        out.print(spans_table(spans))
        chosen = sum(s.chosen for s in spans)
        out.print(f"{chosen} of {len(spans)} candidate spans would be chosen with span={span}",
                  markup=False, highlight=False)


def main() -> None:
    """Console-script entry point."""
    app()
