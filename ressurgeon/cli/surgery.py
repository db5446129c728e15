"""add-skips and inspect: the main job and its dry look at a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import SkipConfig
from ..errors import ConfigError
from .app import app
from .deploy import Fp16Opt, NoCheckOpt, OnnxOpt, OpsetOpt, StaticBatchOpt, write_onnx
from .common import (DEFAULTS, ArchOpt, ConcreteOpt, DebugOpt, DeviceOpt, DtypeOpt, ExcludeOpt,
                     FakeOpt, IncludeOpt, InitOpt, InputShapeOpt, JsonOpt, KindOpt, LeafOpt,
                     MaxSkipsOpt, ModelArg, PlacementOpt, PlotOpt, Progress, QuietOpt, SpanOpt,
                     TrustOpt, check_distinct, check_output, default_output, emit_json,
                     handle_errors, out, parse_concrete, prepare)


@app.command("add-skips")
def add_skips_cmd(
    model: ModelArg,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Where to write the rewritten model (.pt2, .pt, .safetensors). "
        "Default: MODEL.skips.pt2 beside the input.", show_default=False)] = None,
    input_shape: InputShapeOpt = None,
    span: SpanOpt = DEFAULTS.span,
    kind: KindOpt = DEFAULTS.kind,
    init: InitOpt = DEFAULTS.init,
    placement: PlacementOpt = DEFAULTS.placement,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    max_skips: MaxSkipsOpt = None,
    plan: Annotated[Optional[Path], typer.Option(
        "--plan", help="Apply this plan (JSON from --plan-out, maybe edited) instead of "
        "choosing spans; its settings win over the span/kind/init flags.",
        show_default=False)] = None,
    plan_out: Annotated[Optional[Path], typer.Option(
        "--plan-out", help="Write the plan as JSON, to edit and apply again with --plan.",
        show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Plan and verify, but write no model file.")] = False,
    onnx: OnnxOpt = None,
    opset: OpsetOpt = None,
    fp16: Fp16Opt = False,
    static_batch: StaticBatchOpt = False,
    no_check: NoCheckOpt = False,
    save_code: Annotated[Optional[Path], typer.Option(
        "--save-code", help="Also write the rewritten model as readable Python source plus "
        "weights into this folder.", show_default=False)] = None,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    leaf: LeafOpt = None,
    concrete: ConcreteOpt = None,
    fake: FakeOpt = False,
    no_verify: Annotated[bool, typer.Option(
        "--no-verify", help="Skip the parity check against the original model.")] = False,
    plot: PlotOpt = None,
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

      ressurgeon add-skips vgg.pt2 -o vgg_skips.pt2 --onnx vgg_skips.onnx
    """
    from .. import add_skips
    from ..export import atomic_path, save_code as write_code, save_model
    from ..plan import SurgeryPlan
    from ..report import rejection_summary, skips_table

    progress = Progress(quiet or as_json)
    with handle_errors(debug):
        config = SkipConfig(span=span, kind=kind, init=init, placement=placement,
                            include=tuple(include or ()), exclude=tuple(exclude or ()),
                            max_skips=max_skips)
        target = None if dry_run else (output or default_output(model))
        outputs = {"-o": target, "--plan-out": plan_out, "--onnx": onnx, "--plot": plot}
        for flag, path in outputs.items():
            check_output(model, path, flag)
        if target is not None and target.suffix not in (".pt2", ".pt", ".pth", ".safetensors"):
            raise ConfigError(f"-o {target}: cannot tell the format; use a .pt2, .pt, .pth or "
                              ".safetensors file name")
        check_output(model, save_code, "--save-code", folder=True)
        check_distinct([model, plan], {**outputs, "--save-code": save_code})
        loaded_plan = SurgeryPlan.load(plan) if plan else None
        net, inputs = prepare(model, input_shape, arch, trust_pickle, dtype, device, progress,
                               loaded_plan.input_shapes if loaded_plan else ())
        with progress.step("tracing and inserting shortcuts"):
            result = add_skips(net, inputs, config, plan=loaded_plan, leaf_modules=leaf or (),
                               concrete_args=parse_concrete(concrete), fake=fake,
                               verify=not no_verify)
        # The ONNX export is the one step that can still fail a check (exit 3):
        # run it first so a failure leaves no other output behind.
        onnx_report = None
        if onnx is not None and result.skips:
            onnx_report = write_onnx(result.module, inputs, onnx, opset=opset, fp16=fp16,
                                     static_batch=static_batch, check=not no_check,
                                     progress=progress)
        written = None
        if target is not None and result.skips:
            with progress.step(f"writing {target}"):
                written = save_model(result.module, target, inputs)
            progress.note(f"wrote {written}")
        if plan_out:
            with atomic_path(plan_out) as tmp:
                tmp.write_text(result.plan.to_json())
            progress.note(f"wrote plan {plan_out}")
        if plot is not None and result.skips:
            from ..plot import plot_surgery
            from ..spans import analyze_graph

            plot_surgery(analyze_graph(result.module).units, result.skips, plot)
            progress.note(f"wrote diagram {plot}")
        if save_code is not None and result.skips:
            write_code(result.module, save_code)
            progress.note(f"wrote source to {save_code}/")
        if as_json:
            emit_json({**result.to_dict(), "output": str(written) if written else None,
                       "onnx": onnx_report.to_dict() if onnx_report else None})
            return
        if not result.skips:
            why = rejection_summary(result.spans) or (
                f"no layer has {result.plan.config.span} layers above it to span; "
                "try a smaller --span")
            progress.note(f"no shortcut inserted: {why}; no model written")
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
    span: SpanOpt = DEFAULTS.span,
    kind: KindOpt = DEFAULTS.kind,
    placement: PlacementOpt = DEFAULTS.placement,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    leaf: LeafOpt = None,
    concrete: ConcreteOpt = None,
    fake: FakeOpt = False,
    plot: PlotOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show the layers ressurgeon sees and every candidate span, chosen or rejected with the reason. Writes nothing.

    Examples:

      ressurgeon inspect vgg.pt2

      ressurgeon inspect mlp.pt2 --span 3 --json

      ressurgeon inspect vgg.pt2 --plot surgery.png
    """
    from ..report import layers_table, residuals_table, spans_table
    from ..spans import analyze_graph, select_spans
    from ..trace import trace_model

    progress = Progress(quiet or as_json)
    with handle_errors(debug):
        config = SkipConfig(span=span, kind=kind, placement=placement)
        check_output(model, plot, "--plot")
        net, inputs = prepare(model, input_shape, arch, trust_pickle, dtype, device, progress)
        with progress.step("tracing"):
            gm = trace_model(net, inputs, leaf_modules=leaf or (),
                             concrete_args=parse_concrete(concrete), fake=fake)
            analysis = analyze_graph(gm)
            spans = select_spans(gm, config)
        if plot is not None:
            from ..plot import plot_surgery

            plot_surgery(analysis.units, spans, plot, show_rejected=True)
            progress.note(f"wrote diagram {plot}")
        nodes = len(analysis.nodes)
        method = gm.meta["ressurgeon"]["method"]
        if as_json:
            emit_json({"nodes": nodes, "method": method,
                       "layers": [lay.__dict__ for lay in analysis.layers],
                       "existing_residuals": [r.__dict__ for r in analysis.residuals],
                       "spans": [s.to_dict() for s in spans]})
            return
        out.print(f"{model}: {nodes} graph nodes, {len(analysis.layers)} layers, "
                  f"{len(analysis.residuals)} existing residual(s), traced with {method}",
                  markup=False, highlight=False)
        out.print(layers_table(analysis.layers))
        if analysis.residuals:
            out.print(residuals_table(analysis.residuals))
        out.print(spans_table(spans))
        chosen = sum(s.chosen for s in spans)
        out.print(f"{chosen} of {len(spans)} candidate spans would be chosen with span={span}",
                  markup=False, highlight=False)
