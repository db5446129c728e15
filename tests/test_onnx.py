"""Stage export, ONNX: checker, parity in ONNX Runtime at two batch sizes, fallback, fusion.

Tolerances, relative to the output scale max(1, max |output|) (ressurgeon.onnx_export.ONNX_RTOL):

| name       | value | reason                                                                   |
|------------|-------|--------------------------------------------------------------------------|
| FP32       | 1e-4  | ORT and PyTorch sum conv products in other orders (NCHWc blocks, im2col)  |
| FP16       | 2e-2  | the fp16 model against the fp32 one: an 11-bit mantissa on every layer    |
"""

import json
import subprocess
import sys

import onnx
import onnxruntime as ort
import pytest
import torch

from helpers import run_cli
import ressurgeon.onnx_export as onnx_export
from examples.models import plain_vgg
from models import mlp_changing_widths, plain_cnn, randomize_bn
from ressurgeon import ExportError, Shortcut, SkipConfig, VerificationError, add_skips
from ressurgeon.fold import fold
from ressurgeon.onnx_export import ExportFallbackWarning, export_onnx, fusion_report

FP32, FP16 = 1e-4, 2e-2


@pytest.fixture(scope="module")
def skipped_cnn():
    """plain_cnn with standard shortcuts (two strided projections), eval mode."""
    torch.manual_seed(0)
    model = randomize_bn(plain_cnn()).eval()
    x = torch.randn(2, 3, 16, 16)
    return add_skips(model, (x,), SkipConfig(span=2, init="standard")).module, x


@pytest.fixture(scope="module")
def small_mlp():
    torch.manual_seed(0)
    x = torch.randn(4, 12)
    return add_skips(mlp_changing_widths().eval(), (x,), SkipConfig(span=2)).module, x


def ort_run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def test_parity_at_two_batch_sizes_and_checker(skipped_cnn, tmp_path):
    module, x = skipped_cnn
    path = tmp_path / "cnn.onnx"
    report = export_onnx(module, path, (x,))
    assert report.exporter == "dynamo" and report.fallback_reason is None
    assert report.checker_passed and report.files == [str(path)]
    assert sorted(report.parity) == [1, 2] and report.max_abs_diff <= report.tolerance
    onnx.checker.check_model(str(path), full_check=True)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 16, 16]
    x5 = torch.randn(5, 3, 16, 16)  # a batch the export never saw
    with torch.no_grad():
        want = module(x5)
    assert (ort_run(path, x5) - want).abs().max() <= FP32 * max(1.0, want.abs().max().item())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_fallback_to_torchscript_warns_and_still_checks(small_mlp, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("dynamo cannot do this model")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    module, x = small_mlp
    with pytest.warns(ExportFallbackWarning, match="dynamo cannot do this model"):
        report = export_onnx(module, tmp_path / "m.onnx", (x,))
    assert report.exporter == "torchscript" and "dynamo cannot do this model" in report.fallback_reason
    assert report.opset == onnx_export.FALLBACK_OPSET and report.checker_passed
    assert sorted(report.parity) == [1, 4] and report.max_abs_diff <= report.tolerance


def test_both_exporters_failing_is_one_export_error(small_mlp, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("nope")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    monkeypatch.setattr(onnx_export, "_export_torchscript", broken)
    module, x = small_mlp
    with pytest.warns(ExportFallbackWarning), pytest.raises(ExportError, match="both|dynamo"):
        export_onnx(module, tmp_path / "m.onnx", (x,))
    assert list(tmp_path.iterdir()) == []


def test_without_onnxruntime_export_works_and_says_parity_was_not_checked(small_mlp, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    module, x = small_mlp
    report = export_onnx(module, tmp_path / "m.onnx", (x,))
    assert report.checker_passed and not report.parity_checked
    assert "not installed" in report.parity_note and (tmp_path / "m.onnx").exists()


def test_parity_failure_is_a_verification_error_and_writes_nothing(small_mlp, tmp_path,
                                                                   monkeypatch):
    real = onnx_export._run_torch
    monkeypatch.setattr(onnx_export, "_run_torch",
                        lambda *a: [t + 1.0 for t in real(*a)])  # PyTorch "disagrees" by 1
    module, x = small_mlp
    with pytest.raises(VerificationError, match="differ") as caught:
        export_onnx(module, tmp_path / "m.onnx", (x,))
    assert list(tmp_path.iterdir()) == []  # the CLI maps VerificationError to exit 3


def test_fp16_and_static_batch(small_mlp, tmp_path):
    module, x = small_mlp
    half = export_onnx(module, tmp_path / "h.onnx", (x,), fp16=True)
    assert half.dtype == "float16" and half.tolerance == pytest.approx(
        FP16 * max(1.0, module(x).abs().max().item()), rel=1e-6)
    assert half.max_abs_diff <= half.tolerance
    static = export_onnx(module, tmp_path / "s.onnx", (x,), dynamic_batch=False)
    assert list(static.parity) == [4]
    dims = onnx.load(str(tmp_path / "s.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [4, 12]


def test_import_ressurgeon_does_not_import_onnx():
    code = "import ressurgeon, sys; print('onnx' in sys.modules, 'onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_folded_gates_fuse_into_convolutions_in_ort(tmp_path):
    """Gated Muls block ORT's Conv+Add(+ReLU) fusion; folded, every shortcut's Add is fused."""
    torch.manual_seed(0)
    model = randomize_bn(plain_vgg(widths=(8, 8, 8, 8, 8), classes=3)).eval()
    x = torch.randn(2, 3, 8, 8)
    result = add_skips(model, (x,), SkipConfig(span=2))
    for m in result.module.modules():
        if isinstance(m, Shortcut):
            m.gate.data.fill_(0.5)
    n = len(result.skips)
    export_onnx(result.module, tmp_path / "gated.onnx", (x,))
    gated = fusion_report(tmp_path / "gated.onnx")
    assert gated.muls == n                                      # negative control
    folded = fold(result.module, (x,))
    assert folded.fusion_eligible == n
    export_onnx(folded.module, tmp_path / "folded.onnx", (x,))
    fused = fusion_report(tmp_path / "folded.onnx")
    assert fused.fused_add == n and fused.adds == 0 and fused.muls == 0
    assert fused.convs == 5


def test_export_command(small_mlp, example_models, tmp_path, monkeypatch):
    out = tmp_path / "vgg.onnx"
    result = run_cli("export", example_models["vgg"], "--onnx", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {out}") and "batch 1" in result.stdout
    result = run_cli("export", example_models["mlp"], "--onnx", tmp_path / "m.onnx",
                     "--static-batch", "--opset", "18", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["onnx"]
    assert report["opset"] == 18 and not report["dynamic_batch"] and report["parity_checked"]
    missing = run_cli("export", example_models["mlp"], "--onnx", tmp_path / "no" / "m.onnx")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    real = onnx_export._run_torch
    monkeypatch.setattr(onnx_export, "_run_torch", lambda *a: [t + 1.0 for t in real(*a)])
    bad = run_cli("export", example_models["mlp"], "--onnx", tmp_path / "bad.onnx")
    assert bad.exit_code == 3 and bad.stderr.startswith("error: ONNX Runtime's outputs differ")
    assert not (tmp_path / "bad.onnx").exists()


def test_an_old_opset_is_honoured_not_silently_raised(tmp_path):

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).eval()
    report = export_onnx(model, tmp_path / "m.onnx", (torch.randn(1, 3, 8, 8),), opset=17)
    assert report.opset == 17 and report.exporter == "torchscript"
    assert "opset 17 requested" in report.fallback_reason
    assert next(o.version for o in onnx.load(str(tmp_path / "m.onnx")).opset_import
                if o.domain in ("", "ai.onnx")) == 17
