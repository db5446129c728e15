"""export and fold: the deployment commands, and the --onnx step add-skips shares."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .app import app
from .common import (
    ArchOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    InputShapeOpt,
    JsonOpt,
    ModelArg,
    Progress,
    QuietOpt,
    TrustOpt,
    check_distinct,
    check_output,
    emit_json,
    handle_errors,
    out,
    prepare,
)

# Options shared by every command that writes ONNX (add-skips takes them too).
OnnxOpt = Annotated[Path | None, typer.Option(
    "--onnx", metavar="OUT.onnx", help="Also write the model as ONNX (dynamo exporter, checked "
    "with onnx.checker and, when onnxruntime is installed, against PyTorch at two batch sizes).",
    show_default=False)]
OpsetOpt = Annotated[int | None, typer.Option(
    "--opset", help="ONNX opset version (default: the exporter's own, 18+).", show_default=False)]
Fp16Opt = Annotated[bool, typer.Option(
    "--fp16", help="Convert the model to float16 before the ONNX export (parity is measured "
    "against the float32 model).")]
StaticBatchOpt = Annotated[bool, typer.Option(
    "--static-batch", help="Fix the ONNX batch size to the example's instead of a symbolic "
    "'batch' dimension.")]
NoCheckOpt = Annotated[bool, typer.Option(
    "--no-check", help="Skip the ONNX Runtime parity run (the checker still runs).")]


def write_onnx(module, inputs: tuple, path: Path, *, opset: int | None = None,
               fp16: bool = False, static_batch: bool = False, check: bool = True,
               progress: Progress | None = None, note: bool = True):
    """Export ``module`` to ``path`` as ONNX for a command; notes go to stderr via ``progress``.

    The one call add-skips makes for ``--onnx``: it wraps ``export_onnx`` in a
    progress step, turns the library's fallback warning into a note, and notes
    the parity figures (``note=False``: the caller prints them). Errors propagate (``handle_errors`` maps them: 2 for
    ExportError, 3 for VerificationError).

    Returns:
        The OnnxReport (``.to_dict()`` for --json).
    """
    from ..onnx_export import export_onnx

    progress = progress or Progress(quiet=True)
    with progress.step(f"exporting {path}"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export_onnx(module, path, inputs, dynamic_batch=not static_batch, opset=opset,
                             fp16=fp16, check=check)
    for w in caught:
        progress.note(f"warning: {w.message}")
    if note:
        progress.note(onnx_summary(report))
    return report


def onnx_summary(report) -> str:
    """One line: what was written and how close it is to PyTorch."""
    head = (f"wrote {report.path} ({report.exporter} exporter, opset {report.opset}, "
            f"{report.dtype}, {'dynamic' if report.dynamic_batch else 'static'} batch)")
    if report.parity_checked:
        diffs = ", ".join(f"batch {b}: {d:.3g}" for b, d in report.parity.items())
        return f"{head}; ONNX Runtime vs PyTorch max abs diff {diffs} (tolerance {report.tolerance:.3g})"
    return f"{head}; {report.parity_note}"


@app.command("export")
def export_cmd(
    model: ModelArg,
    onnx: Annotated[Path, typer.Option(
        "--onnx", metavar="OUT.onnx", help="The ONNX file to write.", show_default=False)],
    input_shape: InputShapeOpt = None,
    opset: OpsetOpt = None,
    fp16: Fp16Opt = False,
    static_batch: StaticBatchOpt = False,
    fold_first: Annotated[bool, typer.Option(
        "--fold", help="Fold shortcuts, BatchNorm and gates into the weights first "
        "(see 'ressurgeon fold').")] = False,
    no_check: NoCheckOpt = False,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
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
    progress = Progress(quiet or as_json)
    with handle_errors(debug):
        check_output(model, onnx, "--onnx")
        net, inputs = prepare(model, input_shape, arch, trust_pickle, dtype, device, progress)
        folded = None
        if fold_first:
            folded = _fold(net, inputs, progress)
            net = folded.module
        report = write_onnx(net, inputs, onnx, opset=opset, fp16=fp16,
                            static_batch=static_batch, check=not no_check, progress=progress,
                            note=False)
        if as_json:
            emit_json({"onnx": report.to_dict(), "fold": folded.to_dict() if folded else None})
            return
        out.print(onnx_summary(report), markup=False, highlight=False)


@app.command("fold")
def fold_cmd(
    model: ModelArg,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Where to write the folded model (.pt2, .pt, .safetensors). "
        "Default: MODEL.folded.pt2 beside the input, unless only --onnx is given.",
        show_default=False)] = None,
    onnx: OnnxOpt = None,
    input_shape: InputShapeOpt = None,
    opset: OpsetOpt = None,
    fp16: Fp16Opt = False,
    static_batch: StaticBatchOpt = False,
    no_check: NoCheckOpt = False,
    keep_batchnorm: Annotated[bool, typer.Option(
        "--keep-batchnorm", help="Do not fold BatchNorm into the conv/linear before it "
        "(then fewer shortcuts can be merged or have their gates absorbed).")] = False,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Fold MODEL for inference: zero-gate shortcuts removed, BatchNorm and gates folded into weights.

    MODEL is a .pt2 that add-skips wrote (its shortcuts are recognised in the
    archive), a pickled GraphModule from add_skips (.pt, with --trust-pickle),
    or any model (then only BatchNorm is folded). The result computes the same
    function in eval mode (checked on the example input; exit 3 if not) and
    is for inference only: BatchNorm statistics are frozen into the weights.

    Examples:

      ressurgeon fold vgg_skips.pt2 -o vgg_folded.pt2

      ressurgeon fold vgg_skips.pt2 --onnx vgg_folded.onnx --json

      ressurgeon fold finetuned.pt --trust-pickle -i 8,3,32,32 -o deploy.pt2 --onnx deploy.onnx
    """
    from ..export import save_model

    progress = Progress(quiet or as_json)
    with handle_errors(debug):
        target = output if output is not None or onnx is not None else \
            model.with_name(f"{model.stem}.folded.pt2")
        check_output(model, target, "-o")
        check_output(model, onnx, "--onnx")
        check_distinct([model], {"-o": target, "--onnx": onnx})
        net, inputs = prepare(model, input_shape, arch, trust_pickle, dtype, device, progress)
        result = _fold(net, inputs, progress, fold_batchnorm=not keep_batchnorm)
        written = None
        if target is not None:
            with progress.step(f"writing {target}"):
                written = save_model(result.module, target, inputs,
                                     dynamic_batch=not static_batch)
            progress.note(f"wrote {written}")
        report = None
        if onnx is not None:
            report = write_onnx(result.module, inputs, onnx, opset=opset, fp16=fp16,
                                static_batch=static_batch, check=not no_check,
                                progress=progress)
        if as_json:
            emit_json({**result.to_dict(), "output": str(written) if written else None,
                       "onnx": report.to_dict() if report else None})
            return
        if result.skips:
            out.print(fold_table(result))
        else:
            progress.note(f"no ressurgeon shortcuts found in {model}; folded BatchNorm only")
        progress.note(f"{result.ops_before} ops -> {result.ops_after}; "
                      f"{len(result.batchnorms_folded)} BatchNorm folded; "
                      f"{result.fusion_eligible} Add(s) fusable into a conv; outputs within "
                      f"{result.max_abs_diff:.3g} of the unfolded model (eval mode)")


def _fold(net, inputs: tuple, progress: Progress, **options):
    from ..fold import fold

    with progress.step("folding"):
        return fold(net, inputs, **options)


def fold_table(result) -> Table:
    """One row per shortcut: what fold did with it, and why a gate stayed."""
    kept = any(s.outcome == "kept" for s in result.skips)
    table = Table(title="Shortcuts folded", title_justify="left")
    for column in ("shortcut", "kind", "init", "gate", "outcome", "fusion") + ("why kept",) * kept:
        table.add_column(column)
    for s in result.skips:
        gate = "-" if s.gate is None else f"{s.gate:.4g}"
        row = [s.name, s.kind, s.init, gate, s.outcome, s.fusion or "-"]
        table.add_row(*row, *([s.reason or ""] if kept else []))
    return table
