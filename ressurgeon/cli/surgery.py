"""add-skips and inspect: the main job and its dry look at a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import render
from .common import load_with_inputs, real_inputs
from .options import (ModuleOpt, PatternOpt, KeyOpt, MaxShareOpt, SeedOpt, ArchOpt, ConcreteOpt, DEFAULTS, DebugOpt, DeviceOpt, DtypeOpt, DynamicOpt,
                      ExcludeOpt, FakeOpt, Fp16Opt, IncludeOpt, InitOpt, InputShapeOpt, JoinOpt,
                      JsonOpt, KindOpt, LeafOpt, MaxSkipsOpt, ModelArg, NoCheckOpt, OnnxOpt,
                      OpsetOpt, PlacementOpt, PlanOutOpt, PlotOpt, QuietOpt, SpanOpt,
                      StaticBatchOpt, TrustOpt, VocabOpt, WideOpt, config_from_flags)
from .output import Output, session
from .parsing import check_paths, check_plot_extra, default_output, trace_from_flags


def add_skips_cmd(
    model: ModelArg,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Where to write the rewritten model (.pt2, .pt, .safetensors). "
        "Default: MODEL.skips.pt2 beside the input.", show_default=False)] = None,
    input_shape: InputShapeOpt = None,
    vocab: VocabOpt = None,
    span: SpanOpt = DEFAULTS.span,
    kind: KindOpt = DEFAULTS.kind,
    init: InitOpt = DEFAULTS.init,
    join: JoinOpt = DEFAULTS.join,
    pattern: PatternOpt = DEFAULTS.pattern,
    placement: PlacementOpt = DEFAULTS.placement,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    max_skips: MaxSkipsOpt = None,
    max_projection_share: MaxShareOpt = DEFAULTS.max_projection_share,
    seed: SeedOpt = DEFAULTS.seed,
    module: ModuleOpt = None,
    plan: Annotated[Optional[Path], typer.Option(
        "--plan", help="Apply this plan (JSON from --plan-out, maybe edited) instead of "
        "choosing spans; its settings win over the span/kind/init flags.",
        show_default=False)] = None,
    plan_out: PlanOutOpt = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Plan and verify, but write no model, ONNX or code; only "
        "--plan-out and --plot are written.")] = False,
    onnx: OnnxOpt = None,
    opset: OpsetOpt = None,
    fp16: Fp16Opt = False,
    static_batch: StaticBatchOpt = False,
    no_check: NoCheckOpt = False,
    save_code: Annotated[Optional[Path], typer.Option(
        "--save-code", help="Also write the rewritten model as a Python package in this "
        "folder: module.py (constructor calls and the graph's forward) and model.safetensors. "
        "A submodule of a class other than torch.nn's or ressurgeon's needs --trust-pickle "
        "(it is then stored as a pickle).", show_default=False)] = None,
    arch: ArchOpt = None,
    key: KeyOpt = None,
    trust_pickle: TrustOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    leaf: LeafOpt = None,
    concrete: ConcreteOpt = None,
    fake: FakeOpt = False,
    dynamic: DynamicOpt = None,
    no_verify: Annotated[bool, typer.Option(
        "--no-verify", help="Skip the parity check against the original model.")] = False,
    plot: PlotOpt = None,
    wide: WideOpt = False,
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
    with session(as_json=as_json, quiet=quiet, debug=debug) as out:
        from .. import SurgeryPlan
        from .. import check_format

        config = config_from_flags(span=span, kind=kind, init=init, join=join,
                                   placement=placement, include=include, exclude=exclude,
                                   max_skips=max_skips,
                                   max_projection_share=max_projection_share, seed=seed,
                                   pattern=pattern, module=module)
        trace = trace_from_flags(leaf=leaf, concrete=concrete, fake=fake, dynamic=dynamic)
        target = None if dry_run else (output or default_output(model, "skips"))
        if dry_run:  # writes only what planning makes: the plan and the diagram
            onnx = save_code = None
        if plan is not None:  # a --plan that is no plan file (a folder, a device) says so first
            from .. import read_plan_text

            read_plan_text(plan)
        check_paths([model, plan], {"-o": target, "--plan-out": plan_out, "--onnx": onnx,
                                    "--plot": plot}, code_folder=save_code)
        if target is not None:
            check_format(target)
        check_plot_extra(plot)
        loaded_plan = SurgeryPlan.load(plan) if plan else None
        net, inputs = load_with_inputs(model, input_shape, arch, trust_pickle, dtype, device, out,
                                       loaded_plan.input_shapes if loaded_plan else (),
                                       shapes_only=fake and no_verify, vocab=vocab, key=key)
        with out.step("tracing and inserting shortcuts"):
            from .. import add_skips

            result = add_skips(net, inputs, config, plan=loaded_plan, verify=not no_verify,
                               trace=trace)
        written = _write_outputs(result, inputs, out, target=target, plan_out=plan_out,
                                 onnx=onnx, save_code=save_code, plot=plot,
                                 trust_pickle=trust_pickle, dynamic=trace.dynamic,
                                 onnx_options=dict(opset=opset, fp16=fp16,
                                                   static_batch=static_batch,
                                                   check=not no_check))
        if not result.skips:
            out.warn(nothing_inserted(result))
        out.emit({**result.to_dict(), "output": str(written["model"]) if written["model"] else None,
                  "fixed_dims": written.get("fixed_dims", []),
                  "onnx": written["onnx"].to_dict() if written["onnx"] else None},
                 lambda: _render_surgery(result, out, wide))


def _write_outputs(result, inputs, out: Output, *, target, plan_out, onnx, save_code, plot,
                   onnx_options: dict, dynamic=(), trust_pickle: bool = False) -> dict:
    """Write what the flags ask for (nothing when no shortcut was inserted)."""
    from .. import prepare_code

    # the package is made (and may be refused) before any output is written
    package = (prepare_code(_rewritten(result), trust_pickle=trust_pickle)
               if save_code is not None else None)
    written = write_results(result.module, result.plan, inputs, out, target=target,
                            plan_out=plan_out, onnx=onnx, onnx_options=onnx_options,
                            dynamic=dynamic)
    if plot is not None and result.skips:
        from .. import analyze_graph
        from .. import plot_surgery

        plot_surgery(analyze_graph(_rewritten(result)).units, result.skips, plot)
        out.note(f"wrote diagram {plot}")
    if save_code is not None:
        package.write(save_code)
        out.note(f"wrote source to {save_code}/")
    return written


def _rewritten(result):
    """The rewritten GraphModule: the model, or with --module the submodule spliced into it."""
    path = result.plan.config.module
    return result.module.get_submodule(path) if path else result.module


def write_results(module, plan, inputs, out: Output, *, target, plan_out, onnx,
                  onnx_options: dict, dynamic=()) -> dict:
    """Write the model, its ONNX and its plan, as the flags ask ({"model": path, "onnx": report}).

    ``dynamic``: the dims ``--dynamic`` named; a ``.pt2`` keeps them symbolic with
    those the capture kept (a fallback to a fixed size is noted, see ``save_noting``).

    The ONNX export is the one step that can still fail a check (exit 3): it runs first, so a
    failure leaves no other output behind.
    """
    from .. import atomic_path

    written = {"model": None, "onnx": None, "fixed_dims": []}
    if onnx is not None or (target is not None and target.suffix == ".pt2"):
        inputs = real_inputs(module, inputs)  # exporters trace with real examples
    if onnx is not None:
        written["onnx"] = write_onnx(module, inputs, onnx, out, **onnx_options)
    if target is not None:
        from .. import model_dynamic_dims

        dims = tuple(dict.fromkeys(model_dynamic_dims(module) + tuple(dynamic or ())))
        written["model"], written["fixed_dims"] = save_noting(module, target, inputs, out,
                                                              dynamic=dims)
    if plan_out:
        with atomic_path(plan_out) as tmp:
            tmp.write_text(plan.to_json())
        out.note(f"wrote plan {plan_out}")
    return written


def save_noting(module, target: Path, inputs: tuple, out: Output, **options
                ) -> tuple[Path, list[dict]]:
    """``save_model`` for a command: (path written, dims the .pt2 had to fix, for --json).

    A fallback to a fixed size is never silent: it is noted on stderr.
    """
    import warnings

    from .. import FixedDimsWarning, save_model

    with out.step(f"writing {target}"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FixedDimsWarning)
        path = save_model(module, target, inputs, **options)
    fixed = []
    for w in caught:
        if isinstance(w.message, FixedDimsWarning):
            fixed += [{"input": i, "dim": d, "size": size} for i, d, size in w.message.dims]
            out.note(f"warning: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    out.note(f"wrote {path}")
    return path, fixed


def nothing_inserted(result) -> str:
    """Why a run inserted no shortcut, in one line, with what to use instead."""
    if result.residuals:
        n = len(result.residuals)
        return (f"no shortcut inserted: the model already has {n} residual connection"
                f"{'s' * (n != 1)} and add-skips adds none inside or beside them; to grow a "
                "residual network use `ressurgeon deepen`; the model was written unchanged")
    why = render.rejection_summary(result.spans) or (
        f"no layer has {result.plan.config.span} layers above it to span; try a smaller --span")
    return f"no shortcut inserted: {why}; the model was written unchanged"


def _render_surgery(result, out: Output, wide: bool) -> None:
    if not result.skips:
        return  # said on stderr by add_skips_command, --json or not
    out.table(render.skips_table(result.skips, wide=wide, module=result.plan.config.module))
    if result.mode_baked:
        shown = ", ".join(result.mode_baked[:4]) + (" ..." if len(result.mode_baked) > 4 else "")
        mode = "train" if result.module.training else "eval"
        out.note(f"note: the capture ran in {mode} mode and fixed the train-mode behaviour "
                 f"of {len(result.mode_baked)} layer(s) "
                 f"({shown}); see README 'Training-mode layers' (--leaf keeps such a layer a "
                 "module)")
    for note in (render.rejection_summary(result.spans), render.overrides_note(result.skips)):
        if note:
            out.note(note)
    parity, init = result.parity, result.plan.config.init
    if parity is not None and init != "preserve":
        out.note(f"note: init '{init}' changes the model's outputs (max abs diff "
                 f"{parity.max_abs_diff:.3g} on the example input); fine-tune before use")
    elif parity is not None:
        out.note(f"outputs unchanged: {parity.describe()}")


def write_onnx(module, inputs: tuple, path: Path, out: Output, *, opset: int | None = None,
               fp16: bool = False, static_batch: bool = False, check: bool = True,
               note: bool = True):
    """Export ``module`` to ``path`` as ONNX for a command; notes go to stderr.

    Wraps ``export_onnx`` in a progress step, turns the library's fallback
    warning into a note, and notes the parity figures (``note=False``: the
    caller prints them). Errors propagate to the session (2 for ExportError,
    3 for VerificationError).
    """
    import warnings

    from .. import export_onnx

    with out.step(f"exporting {path}"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export_onnx(module, path, inputs, dynamic_batch=not static_batch, opset=opset,
                             fp16=fp16, check=check)
    for w in caught:
        out.note(f"warning: {w.message}")
    if note:
        out.note(render.onnx_summary(report))
    return report


def inspect_cmd(
    model: ModelArg,
    input_shape: InputShapeOpt = None,
    vocab: VocabOpt = None,
    span: SpanOpt = DEFAULTS.span,
    kind: KindOpt = DEFAULTS.kind,
    join: JoinOpt = DEFAULTS.join,
    pattern: PatternOpt = DEFAULTS.pattern,
    placement: PlacementOpt = DEFAULTS.placement,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    max_skips: MaxSkipsOpt = None,
    max_projection_share: MaxShareOpt = DEFAULTS.max_projection_share,
    module: ModuleOpt = None,
    arch: ArchOpt = None,
    key: KeyOpt = None,
    trust_pickle: TrustOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    leaf: LeafOpt = None,
    concrete: ConcreteOpt = None,
    fake: FakeOpt = False,
    dynamic: DynamicOpt = None,
    plot: PlotOpt = None,
    wide: WideOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show the layers ressurgeon sees and every candidate span, chosen or rejected with the reason. Writes nothing.

    Examples:

      ressurgeon inspect vgg.pt2

      ressurgeon inspect mlp.pt2 --span 3 --json

      ressurgeon inspect vgg.pt2 --exclude 'classifier.*' --max-skips 2

      ressurgeon inspect vgg.pt2 --plot surgery.png
    """
    with session(as_json=as_json, quiet=quiet, debug=debug) as out:
        config = config_from_flags(span=span, kind=kind, join=join, placement=placement,
                                   include=include, exclude=exclude, max_skips=max_skips,
                                   max_projection_share=max_projection_share,
                                   pattern=pattern, module=module)
        trace = trace_from_flags(leaf=leaf, concrete=concrete, fake=fake, dynamic=dynamic)
        check_paths([model], {"--plot": plot})
        check_plot_extra(plot)
        net, inputs = load_with_inputs(model, input_shape, arch, trust_pickle, dtype, device, out,
                                       vocab=vocab, key=key)
        with out.step("tracing"):
            from .. import inspect_model

            found = inspect_model(net, inputs, config, trace=trace)
        if plot is not None:
            from .. import plot_surgery

            plot_surgery(found.units, found.spans, plot, show_rejected=True)
            out.note(f"wrote diagram {plot}")

        def show() -> None:
            out.line(f"{model}: {found.nodes} graph nodes, {len(found.layers)} layers, "
                     f"{len(found.residuals)} existing residual(s), traced with {found.method}")
            out.table(render.layers_table(found.layers))
            if found.residuals:
                out.table(render.residuals_table(found.residuals))
            out.table(render.spans_table(found.spans, wide=wide))
            for line in render.reasons_legend(found.spans):
                out.line(line)
            chosen = sum(s.chosen for s in found.spans)
            out.line(f"{chosen} of {len(found.spans)} candidate spans would be chosen with "
                     + (f"span={span}" if pattern == "chain" else f"--pattern {pattern}"))

        out.emit(found.to_dict(), show)
