"""benchmarks/bench_gpu.py: its CPU smoke mode runs here, so the GPU benchmark cannot rot unseen.

The smoke run (tiny sizes, float32, dynamo's eager backend, ONNX Runtime's
CPU provider) goes through every path a GPU run takes except CUDA events and
the CUDA/TensorRT providers; ``test_quick_run_on_cuda`` covers those where a
GPU is present (``pytest -k cuda``).
"""

import contextlib
import functools
import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


@functools.cache
def load_bench():
    """Import the script from its path, once (dataclasses look their module up in sys.modules)."""
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run(bench, argv: list[str], out: Path) -> tuple[dict, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert bench.main(argv + ["--json-out", str(out)]) == 0
    return json.loads(out.read_text()), stdout.getvalue()


def check_report(bench, report: dict, eager: list[str]) -> None:
    """Eager sections time every variant; others are timed or say why not; ratios are sane."""
    sections = {s["name"]: s for s in report["sections"]}
    for name in eager:
        assert sections[name]["status"] == "timed", sections[name]["note"]
        assert set(sections[name]["latency_ms"]) == set(bench.VARIANTS)
        assert set(sections[name]["ratios"]) == {f"{n}/{d}" for n, d, _ in bench.RATIOS}
    for s in sections.values():
        assert s["status"] in ("timed", "partial", "skipped"), s
        assert (s["status"] == "timed") != bool(s["note"]), s   # anything less says why
        assert set(s["latency_ms"]) <= set(s["variants"])
        if s["status"] == "timed":
            assert set(s["latency_ms"]) == set(s["variants"])
        for key, ratio in s["ratios"].items():
            values = [ratio[k] for k in ("median", "q1", "q3", "min", "max")] + ratio["per_round"]
            assert all(math.isfinite(v) and v > 0 for v in values), (s["name"], key, ratio)
            assert len(ratio["per_round"]) == report["config"]["rounds"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    bench = load_bench()
    out = tmp_path_factory.mktemp("bench_gpu") / "smoke.json"
    report, stdout = run(bench, ["--device", "cpu", "--smoke"], out)
    return bench, report, stdout, out


@pytest.mark.slow   # needs the CPU smoke run (40 s on a busy machine)
def test_smoke_times_every_variant_with_sane_ratios(smoke):
    bench, report, _, _ = smoke
    check_report(bench, report, eager=["eager float32"])
    sections = {s["name"]: s for s in report["sections"]}
    compiled = sections["torch.compile(eager) float32"]
    assert compiled["status"] == "timed" and "standard/plain" in compiled["ratios"], compiled
    ort = sections["ORT CPU float32"]
    if importlib.util.find_spec("onnxruntime"):
        assert ort["status"] == "timed" and "standard/plain" in ort["ratios"], ort
    else:
        assert "not installed" in ort["note"]
    assert report["environment"]["torch"] == torch.__version__
    assert report["elapsed_s"] > 0


@pytest.mark.slow   # needs the CPU smoke run (40 s on a busy machine)
def test_smoke_markdown_has_every_row(smoke):
    bench, _, stdout, _ = smoke
    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("| ratio"))
    assert "eager float32" in header and "ORT CPU float32" in header
    for label in [label for _, _, label in bench.RATIOS] + list(bench.VARIANTS.values()):
        row = next((line for line in lines if line.startswith(f"| {label} |")), None)
        assert row is not None, label
        assert "-" != row.split("|")[2].strip(), row   # the eager column is filled
    assert any(line.startswith("elapsed: ") for line in lines)
    assert any(line.startswith("gates left after fold") for line in lines)


@pytest.mark.slow   # needs the CPU smoke run (40 s on a busy machine)
def test_json_is_written_without_leftovers(smoke):
    *_, out = smoke
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_gates_left_after_fold_counts_kept_gates():
    bench = load_bench()
    from benchmarks._models import build_cnns, set_trained_gates

    cnns = build_cnns(16)
    x = cnns.example
    assert bench.gates_left_after_fold(cnns.trained, (x,)) == (0, [])
    # negative control: a negative gate's scale cannot pass the ReLU after the Add
    count, reasons = bench.gates_left_after_fold(set_trained_gates(cnns.trained, -0.7, -0.3), (x,))
    assert count > 0 and len(reasons) == count and all(reasons)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quick_run_on_cuda(tmp_path):
    bench = load_bench()
    report, stdout = run(bench, ["--quick"], tmp_path / "quick.json")
    check_report(bench, report, eager=["eager float16", "eager bfloat16"])
    assert report["environment"]["device"] == torch.cuda.get_device_name()
    assert "| add_skips standard / plain |" in stdout
