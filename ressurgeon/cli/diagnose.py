"""diagnose and gates: gradient flow before and after surgery, and trained gate values."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import Init
from ..errors import ConfigError
from . import render
from .common import example_inputs, load_with_inputs
from .options import (KeyOpt, ArchOpt, DEFAULTS, DebugOpt, DeviceOpt, DtypeOpt, ExcludeOpt, IncludeOpt,
                      InputShapeOpt, JoinOpt, JsonOpt, KindOpt, LeafOpt, MaxSkipsOpt, ModelArg,
                      PlacementOpt, PlotOpt, QuietOpt, SpanOpt, TrustOpt, VocabOpt, WideOpt,
                      cfg_help, config_from_flags)
from .output import console, session
from .parsing import check_paths, check_plot_extra, trace_from_flags


def diagnose_cmd(
    model: ModelArg,
    input_shape: InputShapeOpt = None,
    vocab: VocabOpt = None,
    span: SpanOpt = DEFAULTS.span,
    kind: KindOpt = DEFAULTS.kind,
    init: Annotated[str, typer.Option(
        "--init", metavar="preserve|standard|rezero",
        help=cfg_help("init") + " Default here: standard, since preserve starts with closed "
        "gates and so leaves the first gradients exactly as they were.")] = Init.STANDARD.value,
    join: JoinOpt = DEFAULTS.join,
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
    key: KeyOpt = None,
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
    with session(as_json=as_json, quiet=quiet, debug=debug) as out:
        from .. import gradient_flow
        from .. import from_torchscript, load_model

        config = config_from_flags(span=span, kind=kind, init=init, join=join,
                                   placement=placement, include=include, exclude=exclude,
                                   max_skips=max_skips)
        check_paths([model], {"--plot": plot})
        check_plot_extra(plot)
        net, inputs = load_with_inputs(model, input_shape, arch, trust_pickle, dtype, device, out,
                                       vocab=vocab, key=key)
        other = None
        if rewritten is not None:
            with out.step(f"loading {rewritten}"):
                other = from_torchscript(load_model(rewritten, trust_pickle=trust_pickle),
                                         inputs)
            other = other.to(device=inputs[0].device, dtype=inputs[0].dtype)
        with out.step("measuring gradient flow"):
            report = gradient_flow(net, inputs, config, rewritten=other, train=not eval_mode,
                                   seed=seed, trace=trace_from_flags(leaf=leaf))
        if plot is not None:
            from .. import plot_gradient_flow

            plot_gradient_flow(report, plot)
            out.note(f"wrote {plot}")

        def show() -> None:
            out.table(render.flow_table(report, width=console.size.width))
            out.line(render.flow_summary(report))
            if report.init == "preserve" and other is None:
                out.note("note: init preserve starts with every gate at 0, so the weight "
                         "gradients equal the original's until training opens the gates; "
                         "--init standard shows what the shortcuts can do")
            if report.skips == 0:
                out.note("note: no shortcut was inserted (see ressurgeon inspect for why)")

        out.emit({**report.to_dict(), "config": None if other is not None else config.to_dict(),
                  "plot": str(plot) if plot else None}, show)


def gates_cmd(
    model: Annotated[Path, typer.Argument(
        help="A rewritten model: .pt2 archive (from add-skips), a state_dict .pt/.pth or "
        ".safetensors of one (no --arch needed), or a pickled module (with --trust-pickle).",
        show_default=False)],
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", metavar="FILE.png", help="Also draw the surgery diagram with each arc "
        "labelled by its gate (needs matplotlib: pip install 'ressurgeon\\[plot]', and the "
        "model itself, not only weights).", show_default=False)] = None,
    input_shape: InputShapeOpt = None,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    leaf: LeafOpt = None,
    wide: WideOpt = False,
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
    with session(as_json=as_json, quiet=quiet, debug=debug) as out:
        from .. import gate_report

        check_paths([model], {"--plot": plot})
        check_plot_extra(plot)
        with out.step(f"loading {model}"):
            loaded = _load_rewritten(model, arch, trust_pickle)
        report = gate_report(loaded)
        if plot is not None:
            _plot_gates(loaded, report, model, input_shape, leaf, plot, out)

        def show() -> None:
            if not report.gates:
                out.note(f"{model} has no ressurgeon shortcut (no skip_* module or parameter)")
                return
            out.table(render.gates_table(report, width=console.size.width, wide=wide))
            legend = render.gates_legend(report)
            if legend:
                out.line(legend)
            if report.flattened and any(g.init is None for g in report.gates):
                out.note("note: read from weights only: the init cannot be told, and identity "
                         "shortcuts of init standard own no tensor, so they are not listed")

        out.emit({**report.to_dict(), "plot": str(plot) if plot else None}, show)


def _load_rewritten(path: Path, arch: str | None, trust: bool):
    """A module, or a state_dict when the file holds weights only and no --arch is given."""
    from .. import load_model, read_weights

    if arch is None and path.is_file() and path.suffix in (".pt", ".pth", ".safetensors"):
        state = read_weights(path)
        if state is not None:
            return state
    return load_model(path, arch=arch, trust_pickle=trust)


def _plot_gates(loaded, report, model: Path, shapes, leaf, plot: Path, out) -> None:
    import torch

    from .. import find_layers
    from .. import trace_model

    if not isinstance(loaded, torch.nn.Module):
        raise ConfigError(f"--plot needs the model's graph, but {model} holds weights only; "
                          "pass --arch module:callable that builds the rewritten model, or use "
                          "the .pt2 archive add-skips wrote")
    try:
        inputs = example_inputs(loaded, shapes, model)  # token models: -i 2,8:int64
    except ConfigError:
        raise ConfigError(f"--plot traces the model and cannot tell the input shape of {model}; "
                          "pass --input-shape, e.g. --input-shape 1,3,224,224") from None
    with out.step("tracing"):
        gm = trace_model(loaded, inputs, trace_from_flags(leaf=leaf))
    from .. import plot_surgery

    plot_surgery(find_layers(gm), report.gates, plot, gates=report)
    out.note(f"wrote {plot}")
