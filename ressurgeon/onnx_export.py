"""Export stage, ONNX: a (rewritten or folded) model -> a checked ``.onnx`` file.

torch.onnx's dynamo exporter first (torch.export + onnxscript); if it raises,
the TorchScript exporter, with a warning that names the cause. The file is
checked with ``onnx.checker`` (full check) and, when onnxruntime is
installed, run against PyTorch at the example batch and at a second batch
size. ``fusion_report`` reads ONNX Runtime's optimized graph to count the
convolutions that absorbed a shortcut's Add.

onnx and onnxruntime are imported inside the functions: ``import ressurgeon``
costs only torch.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ._io import atomic_path, check_parent, scratch_dir
from ._torch import eval_mode, normalize_inputs, quiet_copy, quiet_torch
from .errors import ConfigError, ExportError, VerificationError, brief
from .capture.exported import as_module, batched_dims, pinned_batch, dynamic_args, dynamic_dims
from .save import model_dynamic_dims
from .verify import compare_outputs, eval_outputs

FALLBACK_OPSET = 17         # the TorchScript exporter's well-trodden opset
DYNAMO_MIN_OPSET = 18       # the dynamo exporter's oldest opset


class ExportFallbackWarning(UserWarning):
    """The dynamo ONNX exporter failed and the TorchScript exporter was used."""


@dataclass
class OnnxReport:
    """What ``export_onnx`` wrote and measured.

    ``parity`` maps a batch size to the max abs difference between ONNX
    Runtime and PyTorch outputs at that batch; empty when parity was not
    checked (``parity_note`` says why).
    """

    path: str
    files: list[str]
    exporter: str                       # "dynamo" or "torchscript"
    fallback_reason: str | None
    opset: int
    dynamic_batch: bool
    dtype: str
    checker_passed: bool
    parity: dict[int, float] = field(default_factory=dict)
    tolerance: float | None = None
    parity_note: str | None = None

    @property
    def parity_checked(self) -> bool:
        return bool(self.parity)

    @property
    def max_abs_diff(self) -> float | None:
        return max(self.parity.values()) if self.parity else None

    def to_dict(self) -> dict:
        return {**asdict(self), "parity": {str(k): v for k, v in self.parity.items()},
                "parity_checked": self.parity_checked, "max_abs_diff": self.max_abs_diff}


def export_onnx(module: nn.Module, path: str | Path, example_inputs: tuple, *,
                dynamic_batch: bool = True, opset: int | None = None, fp16: bool = False,
                check: bool = True) -> OnnxReport:
    """Export ``module`` to ONNX (eval mode), check it, and compare it with PyTorch.

    Args:
        module: the model (``add_skips(...).module``, ``fold(...).module``, any nn.Module);
            not modified (its train/eval mode is restored).
        path: the ``.onnx`` file to write. Written atomically: nothing appears
            unless export, checker and parity all pass. Models over 2 GB get
            their weights in ``<path>.data`` (or one file per tensor with the
            TorchScript exporter) beside it, moved into place before the
            ``.onnx`` file itself.
        example_inputs: tuple of tensors, as for torch.export.
        dynamic_batch: make dim 0 of every input (and output) symbolic ("batch"); a graph
            torch.export captured with a fixed batch is exported with that batch
            (``report.dynamic_batch`` says which).
        opset: ONNX opset; None picks the exporter's default (18+ for dynamo,
            17 for the TorchScript fallback).
        fp16: convert the model and floating inputs to float16 first; parity is
            then measured against the float32 model (tolerance ``TOLERANCES["onnx"][float16]``).
        check: run the file in onnxruntime (when installed) at the example batch
            and, with a dynamic batch, at a second batch size.

    Returns:
        OnnxReport with the exporter used, the opset, and the measured differences.

    Raises:
        ExportError: both exporters failed, the checker rejected the file, the
            output folder is missing, or onnxruntime cannot load the model.
        VerificationError: ONNX Runtime's outputs differ beyond ``verify.TOLERANCES["onnx"]``
            or hold NaN/infinity where PyTorch's do not (CLI exit 3).

    Example:
        >>> report = export_onnx(result.module, "vgg_skips.onnx", (x,))   # doctest: +SKIP
        >>> report.exporter, report.parity                                 # doctest: +SKIP
        ('dynamo', {2: 3.1e-07, 1: 2.9e-07})
    """
    import onnx

    inputs = normalize_inputs(example_inputs)
    module = as_module(module)
    if pinned_batch(module):  # captured by torch.export with a fixed batch: it can run no other
        dynamic_batch = False
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and (type(opset) is not int or not 7 <= opset <= newest):
        raise ConfigError(f"opset {opset!r} does not exist: ONNX opsets run from 7 to {newest} "
                          "in the installed onnx")
    path = Path(path)
    parent = check_parent(path)
    work, export_inputs = _prepare(module, inputs, fp16)
    reference = _run_torch(module, inputs, fp16)
    in_names = _names("input", len(inputs))
    out_names = _names("output", len(reference))
    with scratch_dir(path) as scratch:
        target = scratch / path.name
        exporter, reason = _export(work, export_inputs, target, in_names, out_names,
                                   dynamic_batch, opset)
        try:
            onnx.checker.check_model(str(target), full_check=True)
        except Exception as exc:
            raise ExportError(f"onnx.checker rejected the exported {path}: {brief(exc)}") from exc
        proto = onnx.load(str(target), load_external_data=False)
        used_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                          opset or 0)
        if opset is not None and used_opset != opset:
            raise ExportError(f"opset {opset} was asked for but the exporter wrote opset "
                              f"{used_opset}; pick an opset it supports (7-17 or 18+)")
        report = OnnxReport(path=str(path), files=[], exporter=exporter, fallback_reason=reason,
                            opset=used_opset, dynamic_batch=dynamic_batch,
                            dtype=str(_model_dtype(work, export_inputs)).split(".")[-1],
                            checker_passed=True)
        if check:
            _check_parity(report, target, module, inputs, reference, fp16)
        else:
            report.parity_note = "parity not checked (check=False)"
        extras = sorted(p.name for p in scratch.iterdir() if p != target)
        for name in extras:   # external weights first: the .onnx must never point at nothing
            os.replace(scratch / name, parent / name)
        with atomic_path(path) as tmp:
            os.replace(target, tmp)
        report.files = [str(path)] + [str(parent / name) for name in extras]
        return report


def _model_dtype(module: nn.Module, inputs: tuple) -> torch.dtype:
    floating = [p.dtype for p in module.parameters() if p.is_floating_point()]
    return floating[0] if floating else inputs[0].dtype


def _names(stem: str, count: int) -> list[str]:
    return [stem] if count == 1 else [f"{stem}_{i}" for i in range(count)]


def _prepare(module: nn.Module, inputs: tuple, fp16: bool) -> tuple[nn.Module, tuple]:
    if not fp16:
        return module, inputs
    work = quiet_copy(module).half()
    return work, tuple(t.half() if t.is_floating_point() else t for t in inputs)


def _run_torch(module: nn.Module, inputs: tuple, fp16: bool) -> list[torch.Tensor]:
    """Eval-mode outputs; for fp16 the float32 model on the fp16-rounded inputs."""
    if fp16:
        inputs = tuple(t.half().to(t.dtype) if t.is_floating_point() else t for t in inputs)
    return eval_outputs(module, inputs)


def _export(module: nn.Module, inputs: tuple, target: Path, in_names: list[str],
            out_names: list[str], dynamic_batch: bool, opset: int | None) -> tuple[str, str | None]:
    with eval_mode(module):
        if opset is not None and opset < DYNAMO_MIN_OPSET:
            # the dynamo exporter would quietly write opset 18 instead
            with quiet_torch(stdout=True):
                _export_torchscript(module, inputs, target, in_names, out_names,
                                    dynamic_batch, opset)
            return "torchscript", (f"opset {opset} requested; the dynamo exporter writes "
                                   f"opset {DYNAMO_MIN_OPSET} or newer")
        try:
            with quiet_torch(stdout=True):
                _export_dynamo(module, inputs, target, in_names, out_names, dynamic_batch, opset)
            return "dynamo", None
        except Exception as exc:  # noqa: BLE001  (any failure there means: try the other exporter)
            dynamo_error = exc
        for leftover in target.parent.iterdir():
            leftover.unlink()
        reason = brief(dynamo_error)
        warnings.warn(f"the dynamo ONNX exporter failed ({type(dynamo_error).__name__}: "
                      f"{reason}); used the TorchScript exporter instead",
                      ExportFallbackWarning, stacklevel=3)
        try:
            with quiet_torch(stdout=True):
                _export_torchscript(module, inputs, target, in_names, out_names,
                                    dynamic_batch, opset)
        except Exception as exc:
            raise ExportError(f"cannot export {type(module).__name__} to ONNX: the dynamo "
                              f"exporter failed with '{reason}' and the TorchScript exporter "
                              f"with '{brief(exc)}'") from exc
        return "torchscript", f"{type(dynamo_error).__name__}: {reason}"


def _export_dynamo(module, inputs, target, in_names, out_names, dynamic_batch, opset) -> None:
    """torch.onnx's dynamo exporter with the batch (and the dims the capture kept) symbolic."""
    dims = model_dynamic_dims(module)
    attempts = [dynamic_args(inputs, batch=dynamic_batch, dims=dims)]
    if dims:  # a dim export cannot keep symbolic: the batch alone, as --static-batch says
        attempts.append(dynamic_args(inputs, batch=dynamic_batch))
    for i, (args, dynamic) in enumerate(attempts):
        try:
            program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic,
                                        input_names=in_names, output_names=out_names,
                                        opset_version=opset)
            break
        except Exception:
            if i == len(attempts) - 1:
                raise
    program.save(str(target))   # external data only past 2 GB


def _export_torchscript(module, inputs, target, in_names, out_names, dynamic_batch,
                        opset) -> None:
    free = dynamic_dims(inputs, batch=dynamic_batch, dims=model_dynamic_dims(module))
    axes = None
    if any(free):
        axes = {n: {d: "batch" if d == 0 else f"dim{d}" for d in sorted(f)}
                for n, f in zip(in_names, free) if f}
        if dynamic_batch and any(0 in f for f in free):
            axes.update({n: {0: "batch"} for n in out_names})
    torch.onnx.export(module, inputs, str(target), dynamo=False, input_names=in_names,
                      output_names=out_names, dynamic_axes=axes,
                      opset_version=opset or FALLBACK_OPSET)


def _check_parity(report: OnnxReport, target: Path, module: nn.Module, inputs: tuple,
                  reference: list[torch.Tensor], fp16: bool) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        report.parity_note = ("onnxruntime is not installed, so parity was not checked "
                              "(pip install 'ressurgeon[ort]', or onnxruntime-gpu)")
        return
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failing run is our error message, not ORT's log line
    try:
        session = ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load {report.path}: {brief(exc)}; write it "
                          "without the parity check (check=False / --no-check)") from exc
    batches = [(inputs, reference)]
    if report.dynamic_batch and any(batched_dims(inputs)):
        other = _other_batch(inputs)
        batches.append((other, _run_torch(module, other, fp16)))
    dtype = torch.float16 if fp16 else reference[0].dtype if reference else torch.float32
    tolerance, notes, failed = 0.0, [], []
    for index, (batch_inputs, expected) in enumerate(batches):
        batch = batch_inputs[0].shape[0] if batch_inputs[0].dim() else 1
        # at the second batch size, the example's passed: the graph does not generalise
        hint = _static_batch_hint(report, batches[0][0]) if index else ""
        feed = {i.name: _numpy(t, fp16) for i, t in zip(session.get_inputs(), batch_inputs)}
        try:
            got = session.run(None, feed)
        except Exception as exc:
            raise VerificationError(f"{report.path} fails in onnxruntime at batch {batch}: "
                                    f"{brief(exc)}{hint}") from exc
        try:
            parity = compare_outputs(expected, [torch.from_numpy(g) for g in got], check="onnx",
                                     dtype=dtype)
        except VerificationError as exc:
            raise VerificationError(f"{report.path} at batch {batch}: {exc}{hint}") from exc
        report.parity[int(batch)] = parity.max_abs_diff
        tolerance = max(tolerance, parity.tolerance)
        if parity.nonfinite:
            notes.append(f"batch {batch}: {parity.nonfinite} value(s) NaN or infinite where "
                         "PyTorch's are finite")
        if not parity.ok:
            failed.append(hint)
    report.tolerance = tolerance
    if notes or (report.max_abs_diff is not None and not report.max_abs_diff <= tolerance):
        shown = ", ".join(f"batch {b}: {d:.3g}" for b, d in report.parity.items())
        # only when the example's batch itself passed is the batch size the cause
        hint = failed[0] if failed and failed[0] else ""
        raise VerificationError(f"ONNX Runtime's outputs differ from PyTorch's ({shown}; "
                                f"tolerance {tolerance:.3g}{'; ' if notes else ''}"
                                f"{'; '.join(notes)}); {report.path} was not written{hint}")


def _static_batch_hint(report: OnnxReport, example: tuple) -> str:
    """The fix for a file that runs the example's batch size but not another one."""
    why = (" (the TorchScript exporter, used because the dynamo exporter failed, records "
           "the example's sizes)" if report.exporter == "torchscript" else "")
    batch = example[0].shape[0] if example[0].dim() else 1
    return (f"; batch {batch}, the example's, passed: the exported graph does not run at "
            f"another batch size{why}. Export with a static batch (--static-batch, or "
            "dynamic_batch=False)")


def _other_batch(inputs: tuple) -> tuple:
    """The example rows repeated to a second batch size (1, or 3 when the example has 1)."""
    dims = batched_dims(inputs)
    batch = inputs[0].shape[0]
    size = 1 if batch != 1 else 3
    index = torch.arange(size, device=inputs[0].device) % batch
    return tuple(t[index] if d else t for t, d in zip(inputs, dims))


def _numpy(t: torch.Tensor, fp16: bool):
    t = t.detach().cpu()
    if fp16 and t.is_floating_point():
        t = t.half()
    return t.numpy()


# -- ONNX Runtime's optimized graph --------------------------------------------------------------

@dataclass(frozen=True)
class FusionReport:
    """Convolutions in ONNX Runtime's optimized CPU graph (ORT_ENABLE_ALL).

    ``fused_add``: convolutions that took in an Add as their "sum" input
    (``FusedConv`` or the NCHWc ``Conv`` with 4 inputs), i.e. shortcuts that
    cost no separate op; ``adds``/``muls``: element-wise ops left over.
    """

    convs: int
    fused_add: int
    fused_activation: int
    adds: int
    muls: int
    ops: dict[str, int]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def fusion_report(path: str | Path) -> FusionReport:
    """Optimize ``path`` with ONNX Runtime on CPU (ORT_ENABLE_ALL) and count fused convolutions.

    Args:
        path: an ``.onnx`` file.

    Returns:
        FusionReport of the optimized graph (written to a temporary file via
        ``SessionOptions.optimized_model_filepath``, then deleted).

    Raises:
        ExportError: onnxruntime is not installed or cannot load the file.

    Example:
        >>> fusion_report("vgg_skips.onnx").fused_add   # doctest: +SKIP
        4
    """
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("fusion_report needs onnxruntime: pip install 'ressurgeon[ort]'") from exc
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(optimized)
        options.log_severity_level = 3  # the NCHWc "hardware specific" notice
        try:
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ExportError(f"onnxruntime cannot load {path}: {brief(exc)}") from exc
        graph = onnx.load(str(optimized), load_external_data=False).graph
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
                  for n in graph.node)
    convs = [n for n in graph.node if n.op_type in ("Conv", "FusedConv", "NhwcFusedConv")]
    fused_add = sum(len(n.input) >= 4 and bool(n.input[3]) for n in convs)
    fused_act = sum(any(a.name == "activation" for a in n.attribute) for n in convs)
    return FusionReport(convs=len(convs), fused_add=fused_add, fused_activation=fused_act,
                        adds=ops.get("Add", 0), muls=ops.get("Mul", 0), ops=dict(ops))
