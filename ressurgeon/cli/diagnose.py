"""diagnose and gates: gradient flow before and after surgery, and trained gate values."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from ..config import SkipConfig
from ..errors import ConfigError
from ..load import as_state_dict, read_safetensors
from .app import app
from .common import (DEFAULTS, ArchOpt, DebugOpt, DeviceOpt, DtypeOpt, ExcludeOpt, IncludeOpt,
                     InputShapeOpt, JsonOpt, KindOpt, LeafOpt, MaxSkipsOpt, ModelArg,
                     PlacementOpt, Progress, QuietOpt, SpanOpt, TrustOpt, cfg_help, check_output,
                     emit_json, handle_errors, out, parse_shape, prepare, stored_shapes)

BAR_WIDTH = 16
_EIGHTHS = " ▏▎▍▌▋▊▉"

PlotOpt = Annotated[Optional[Path], typer.Option(
    "--plot", metavar="PATH", help="Also write a figure (.png, .svg or .pdf); needs matplotlib: "
    "pip install 'ressurgeon[plot]'.", show_default=False)]


@app.command("diagnose")
def diagnose_cmd(
    model: ModelArg,
    input_shape: InputShapeOpt = None,
    span: SpanOpt = DEFAULTS.span,
    kind: KindOpt = DEFAULTS.kind,
    init: Annotated[str, typer.Option(help=cfg_help("init") + " Default here: standard, since "
                                      "preserve starts with closed gates and so leaves the "
                                      "first gradients exactly as they were.")] = "standard",
    placement: PlacementOpt = DEFAULTS.placement,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    max_skips: MaxSkipsOpt = None,
    rewritten: Annotated[Optional[Path], typer.Option(
        "--rewritten", metavar="FILE", help="Compare against this already rewritten model "
        "(e.g. from add-skips, maybe fine-tuned) instead of rewriting MODEL with the flags "
        "above.", show_default=False)] = None,
    eval_mode: Annotated[bool, typer.Option(
        "--eval", help="Run both models in eval mode (BatchNorm running statistics, no "
        "dropout); default is train mode, as in training.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the example input, the synthetic "
                                      "regression target and dropout.")] = 0,
    plot: PlotOpt = None,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    leaf: LeafOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compare per-layer gradient norms and activation spread before and after adding shortcuts.

    One forward and backward pass of each model on the same seeded batch, with
    a mean-squared-error loss against a seeded random target. Each row is a
    layer: the norm of its weight's gradient (bars on a log scale) and the
    standard deviation of its output. Gradients that vanish towards the input
    in the original and stay level with shortcuts are what residual
    connections are for. Writes no model.

    Examples:

      ressurgeon diagnose examples/models/mlp.pt2

      ressurgeon diagnose deep.pt2 -i 64,32 --span 3 --plot grad.png

      ressurgeon diagnose vgg.pt2 --rewritten vgg.tuned.pt2 --json
    """
    from ..diagnose import gradient_flow
    from ..load import load_model

    progress = Progress(quiet or as_json)
    with handle_errors(debug):
        config = SkipConfig(span=span, kind=kind, init=init, placement=placement,
                            include=tuple(include or ()), exclude=tuple(exclude or ()),
                            max_skips=max_skips)
        check_output(model, plot, "--plot")
        net, inputs = prepare(model, input_shape, arch, trust_pickle, dtype, device, progress)
        other = None
        if rewritten is not None:
            with progress.step(f"loading {rewritten}"):
                other = load_model(rewritten, trust_pickle=trust_pickle)
            other = other.to(device=inputs[0].device, dtype=inputs[0].dtype)
        with progress.step("measuring gradient flow"):
            report = gradient_flow(net, inputs, config, rewritten=other, train=not eval_mode,
                                   seed=seed, leaf_modules=leaf or ())
        if plot is not None:
            from ..plot import plot_gradient_flow

            plot_gradient_flow(report, plot)
            progress.note(f"wrote {plot}")
        if as_json:
            emit_json({**report.to_dict(), "config": None if other is not None
                       else config.to_dict(), "plot": str(plot) if plot else None})
            return
        out.print(flow_table(report))
        out.print(flow_summary(report), markup=False, highlight=False)
        if report.init == "preserve":
            progress.note("note: init preserve starts with every gate at 0, so the weight "
                          "gradients equal the original's until training opens the gates; "
                          "--init standard shows what the shortcuts can do")
        if report.skips == 0:
            progress.note("note: no shortcut was inserted (see ressurgeon inspect for why)")


def flow_table(report, width: int | None = None) -> Table:
    """One row per layer: gradient norm with a log-scale bar, original beside rewritten."""
    grads = [v for r in report.layers for v in (r.original.grad_norm, r.rewritten.grad_norm)
             if v is not None and v > 0]
    lo, hi = (math.log10(min(grads)), math.log10(max(grads))) if grads else (0.0, 0.0)
    names = max((len(r.layer) for r in report.layers), default=5) + 3
    # the bars take what the console has left after the other columns
    bars = max(4, min(BAR_WIDTH, ((width or out.size.width) - names - 60) // 2))
    table = Table(title=f"Gradient flow, {report.mode} mode (bars: weight-gradient norm on a "
                  f"log scale, {_decades(lo, hi)})", title_justify="left")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("layer", no_wrap=True, min_width=min(names, 24))
    table.add_column("grad, original", no_wrap=True)
    table.add_column("with shortcuts", no_wrap=True)
    table.add_column("gain", justify="right", no_wrap=True)
    table.add_column("act std", justify="right", no_wrap=True)
    for i, r in enumerate(report.layers, 1):
        layer = Text(r.layer)
        if r.skip:
            layer.append(" <+", style="cyan")  # a shortcut's sum lands on this layer's output
        table.add_row(str(i), layer, _bar(r.original.grad_norm, lo, hi, "grey62", bars),
                      _bar(r.rewritten.grad_norm, lo, hi, "blue", bars), _gain(r.gain),
                      f"{_num(r.original.act_std)}→{_num(r.rewritten.act_std)}")
    return table


def flow_summary(report) -> str:
    gain = report.first_gain
    first = (f"first layer's gradient x{gain:,.3g}" if gain is not None
             else "no first-layer gradient")
    return (f"{report.skips} shortcut(s), init {report.init or 'unknown'}: {first}; loss "
            f"{report.loss_original:.4g} -> {report.loss_rewritten:.4g}. '<+': a shortcut's sum "
            "lands on this layer's output; act std: original→with shortcuts")


def _decades(lo: float, hi: float) -> str:
    return f"1e{math.floor(lo)} .. 1e{math.ceil(hi)}"


def _bar(value: float | None, lo: float, hi: float, style: str, width: int) -> Text:
    if value is None:
        return Text("no grad", style="red")
    if value <= 0:
        return Text(f"{0.0:8.2e}", style="red")
    frac = 1.0 if hi <= lo else (math.log10(value) - lo) / (hi - lo)
    eighths = max(1, round(frac * width * 8))
    bar = "█" * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else "")
    text = Text(f"{value:8.2e} ")
    text.append(bar.ljust(width), style=style)
    return text


def _gain(gain: float | None) -> Text:
    if gain is None:
        return Text("-")
    style = "green" if gain >= 10 else ("red" if gain < 0.1 else "")
    return Text(f"x{gain:,.3g}", style=style)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


@app.command("gates")
def gates_cmd(
    model: Annotated[Path, typer.Argument(
        help="A rewritten model: .pt2 archive (from add-skips), a state_dict .pt/.pth or "
        ".safetensors of one (no --arch needed), or a pickled module (with --trust-pickle).",
        show_default=False)],
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", metavar="PATH", help="Also draw the surgery diagram with each arc labelled "
        "by its gate (needs matplotlib, and the model itself, not only weights).",
        show_default=False)] = None,
    input_shape: InputShapeOpt = None,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    leaf: LeafOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List every shortcut of a rewritten model with its gate's current value.

    With init preserve (h + a*S(x)) a gate far from 0 means fine-tuning adopted
    the shortcut; with init rezero (S(x) + a*H(x)) a gate near 0 means the
    span is still bypassed. Init standard has no gate. A .pt2 archive keeps
    the gates as parameters named skip_*.gate (torch.export inlines the
    Shortcut modules); a state_dict gives names and values but not the init,
    and shows no identity shortcut of init standard (it owns no tensor).

    Examples:

      ressurgeon gates vgg.tuned.pt2

      ressurgeon gates tuned_state.pt --json

      ressurgeon gates vgg.tuned.pt2 --plot gates.png
    """
    from ..gates import gate_report

    progress = Progress(quiet or as_json)
    with handle_errors(debug):
        check_output(model, plot, "--plot")
        with progress.step(f"loading {model}"):
            loaded = _load_rewritten(model, arch, trust_pickle)
        report = gate_report(loaded)
        if plot is not None:
            _plot_gates(loaded, report, model, input_shape, leaf or (), plot, progress)
        if as_json:
            emit_json({**report.to_dict(), "plot": str(plot) if plot else None})
            return
        if not report.gates:
            progress.note(f"{model} has no ressurgeon shortcut (no skip_* module or parameter)")
            return
        out.print(gates_table(report))
        legend = gates_legend(report)
        if legend:
            out.print(legend, markup=False, highlight=False)
        if report.flattened and any(g.init is None for g in report.gates):
            progress.note("note: read from weights only: the init cannot be told, and identity "
                          "shortcuts of init standard own no tensor, so they are not listed")


FORMULAS = {"preserve": "h + a*S(x)", "rezero": "S(x) + a*H(x)", "standard": "h + S(x)"}


def gates_table(report, width: int | None = None) -> Table:
    """One row per shortcut: its ends, kind, init, and the gate's value with a bar of |a|."""
    values = [abs(g.value) for g in report.gates if g.value is not None]
    top = max(values, default=0.0)
    name = max((len(g.name) for g in report.gates), default=8)
    ends = max((len(g.source_layer) + len(g.target_layer) + 4 for g in report.gates), default=16)
    # 8 borders and 14 cells of padding, '#', kind, init and value columns, then the bar
    fixed = 22 + 3 + name + max(ends, 16) + 8 + 8 + 7
    bars = max(3, min(BAR_WIDTH, (width or out.size.width) - fixed))
    table = Table(title="Shortcut gates", title_justify="left")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("shortcut", no_wrap=True)
    table.add_column("source -> target", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("init", no_wrap=True)
    table.add_column("gate a", justify="right", no_wrap=True)
    table.add_column("|a|", no_wrap=True)
    for i, g in enumerate(report.gates, 1):
        if g.value is None:
            value, bar = Text("-"), Text("")
        else:
            value = Text(f"{g.value:+.4f}")
            n = round(abs(g.value) / top * bars) if top > 0 else 0
            bar = Text("█" * n, style="blue")
        table.add_row(str(i), g.name, f"{g.source_layer} -> {g.target_layer}",
                      "proj" if g.kind == "projection" else g.kind, g.init or "?", value, bar)
    return table


def gates_legend(report) -> str:
    """What a gate multiplies, for the inits present."""
    inits = [i for i in FORMULAS if any(g.init == i for g in report.gates)]
    meaning = {"preserve": "a far from 0: fine-tuning adopted the shortcut",
               "rezero": "a near 0: the span is still bypassed",
               "standard": "no gate"}
    return "; ".join(f"{i}: {FORMULAS[i]} ({meaning[i]})" for i in inits)


def _load_rewritten(path: Path, arch: str | None, trust: bool):
    """A module, or a state_dict when the file holds weights only and no --arch is given."""
    from ..load import load_model

    if arch is None and path.is_file() and path.suffix in (".pt", ".pth", ".safetensors"):
        state = _read_weights(path)
        if state is not None:
            return state
    return load_model(path, arch=arch, trust_pickle=trust)


def _read_weights(path: Path) -> dict | None:
    """The tensors of a state_dict file, read without running code; None if it is not one."""
    import torch

    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # a pickled module, or garbage: load_model says which, and what to do
    return as_state_dict(obj)


def _plot_gates(loaded, report, model: Path, shapes, leaf, plot: Path, progress) -> None:
    import torch

    from ..plot import plot_surgery
    from ..spans import find_layers
    from ..trace import trace_model

    if not isinstance(loaded, torch.nn.Module):
        raise ConfigError(f"--plot needs the model's graph, but {model} holds weights only; "
                          "pass --arch module:callable that builds the rewritten model, or use "
                          "the .pt2 archive add-skips wrote")
    parsed = [parse_shape(s) for s in shapes] if shapes else stored_shapes(loaded)
    if not parsed:
        raise ConfigError(f"--plot traces the model and cannot tell the input shape of {model}; "
                          "pass --input-shape, e.g. --input-shape 1,3,224,224")
    gen = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(s, generator=gen) for s in parsed)
    with progress.step("tracing"):
        gm = trace_model(loaded, inputs, leaf_modules=leaf)
    skips = {g.name for g in report.gates}
    # torch.export inlines a projection's 1x1 conv, which would count as a layer of its own
    layers = [lay for lay in find_layers(gm)
              if not any(lay.name == s or lay.name.startswith(s + ".") for s in skips)]
    plot_surgery(layers, report.gates, plot, gates=report)
    progress.note(f"wrote {plot}")
