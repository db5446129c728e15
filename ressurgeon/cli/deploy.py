"""export and fold: the deployment commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import render
from .common import load_with_inputs
from .options import (KeyOpt, ArchOpt, DebugOpt, DeviceOpt, DtypeOpt, Fp16Opt, InputShapeOpt, JsonOpt,
                      LeafOpt, ModelArg, NoCheckOpt, OnnxOpt, OpsetOpt, QuietOpt, StaticBatchOpt,
                      TrustOpt, VocabOpt, WideOpt)
from .output import Output, session
from .parsing import check_paths, default_output, trace_from_flags
from .surgery import save_noting, write_onnx


def export_cmd(
    model: ModelArg,
    onnx: Annotated[Path, typer.Option(
        "--onnx", metavar="OUT.onnx", help="The ONNX file to write.", show_default=False)],
    input_shape: InputShapeOpt = None,
    vocab: VocabOpt = None,
    opset: OpsetOpt = None,
    fp16: Fp16Opt = False,
    static_batch: StaticBatchOpt = False,
    fold_first: Annotated[bool, typer.Option(
        "--fold", help="Fold shortcuts, BatchNorm and gates into the weights first "
        "(see 'ressurgeon fold').")] = False,
    no_check: NoCheckOpt = False,
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
    """Write MODEL as a checked ONNX file with a dynamic batch (for ONNX Runtime or TensorRT).

    Examples:

      ressurgeon export vgg_skips.pt2 --onnx vgg_skips.onnx

      ressurgeon export vgg_skips.pt2 --onnx vgg_fp16.onnx --fp16 --fold

      ressurgeon export weights.pt --arch mynets:build_vgg -i 1,3,224,224 --onnx vgg.onnx --opset 17 --static-batch
    """
    with session(as_json=as_json, quiet=quiet, debug=debug) as out:
        check_paths([model], {"--onnx": onnx})
        net, inputs = load_with_inputs(model, input_shape, arch, trust_pickle, dtype, device, out,
                                       vocab=vocab, key=key)
        folded = None
        if fold_first:
            folded = _fold(net, inputs, out, trace=trace_from_flags(leaf=leaf))
            net = folded.module
        report = write_onnx(net, inputs, onnx, out, opset=opset, fp16=fp16,
                            static_batch=static_batch, check=not no_check, note=False)
        out.emit({"onnx": report.to_dict(), "fold": folded.to_dict() if folded else None},
                 lambda: out.line(render.onnx_summary(report)))


def fold_cmd(
    model: ModelArg,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Where to write the folded model (.pt2, .pt, .safetensors). "
        "Default: MODEL.folded.pt2 beside the input, unless only --onnx is given.",
        show_default=False)] = None,
    onnx: OnnxOpt = None,
    input_shape: InputShapeOpt = None,
    vocab: VocabOpt = None,
    opset: OpsetOpt = None,
    fp16: Fp16Opt = False,
    static_batch: StaticBatchOpt = False,
    no_check: NoCheckOpt = False,
    keep_batchnorm: Annotated[bool, typer.Option(
        "--keep-batchnorm", help="Do not fold BatchNorm into the conv/linear before it "
        "(then fewer shortcuts can be merged or have their gates absorbed).")] = False,
    arch: ArchOpt = None,
    key: KeyOpt = None,
    trust_pickle: TrustOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    leaf: LeafOpt = None,
    wide: WideOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Fold MODEL for inference: zero-gate shortcuts removed, BatchNorm and gates folded into weights.

    MODEL is a .pt2 that add-skips wrote (its shortcuts are recognised in the
    archive), a .pt2 of a model rewire rewired (blocks whose new parameters are
    still at init go back to the plain residual; the others are kept, with the
    reason), a pickled GraphModule from add_skips (.pt, with --trust-pickle),
    or any model (then only BatchNorm is folded). The result computes the same
    function in eval mode (checked on the example input; exit 3 if not) and
    is for inference only: BatchNorm statistics are frozen into the weights.

    Examples:

      ressurgeon fold vgg_skips.pt2 -o vgg_folded.pt2

      ressurgeon fold vgg_skips.pt2 --onnx vgg_folded.onnx --json

      ressurgeon fold finetuned.pt --trust-pickle -i 8,3,32,32 -o deploy.pt2 --onnx deploy.onnx
    """
    with session(as_json=as_json, quiet=quiet, debug=debug) as out:
        from .. import check_format

        target = output if output is not None or onnx is not None else \
            default_output(model, "folded")
        check_paths([model], {"-o": target, "--onnx": onnx})
        if target is not None:
            check_format(target)
        net, inputs = load_with_inputs(model, input_shape, arch, trust_pickle, dtype, device, out,
                                       vocab=vocab, key=key)
        result = _fold(net, inputs, out, fold_batchnorm=not keep_batchnorm,
                       trace=trace_from_flags(leaf=leaf))
        report = None
        if onnx is not None:  # first: the one step that can still fail a check (exit 3)
            report = write_onnx(result.module, inputs, onnx, out, opset=opset, fp16=fp16,
                                static_batch=static_batch, check=not no_check)
        written, fixed_dims = None, []
        if target is not None:
            written, fixed_dims = save_noting(result.module, target, inputs, out,
                                              dynamic_batch=not static_batch)

        def show() -> None:
            for found, make in ((result.skips, lambda: render.fold_table(result, wide=wide)),
                                (result.rewired, lambda: render.fold_rewired_table(result))):
                if found:
                    table, notes = make()
                    out.table(table)
                    for line in notes:
                        out.line(line)
            if not result.skips and not result.rewired:
                out.note(f"no ressurgeon shortcuts found in {model}")
            out.note(render.fold_summary(result))

        out.emit({**result.to_dict(), "output": str(written) if written else None,
                  "fixed_dims": fixed_dims, "onnx": report.to_dict() if report else None}, show)


def _fold(net, inputs: tuple, out: Output, **options):
    from .. import fold

    with out.step("folding"):
        return fold(net, inputs, **options)
