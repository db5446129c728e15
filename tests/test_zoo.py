"""Optional zoo: add_skips and ONNX export on torchvision / timm architectures (weights=None).

Runs only when selected AND installed, e.g. in the venv that benchmarks/zoo.py describes:

    /work/zoo-venv/bin/python -m pytest -m zoo tests/test_zoo.py

The model list, input sizes and the exclusions (each with its reason) live in
``benchmarks/zoo.py``, shared with the benchmark that prints the README table.
"""

import importlib.util

import pytest

pytestmark = pytest.mark.zoo

HAVE_ZOO = any(importlib.util.find_spec(lib) is not None for lib in ("torchvision", "timm"))


@pytest.fixture(autouse=True)
def _only_when_selected(request):
    markexpr = request.config.getoption("-m") or ""
    if "zoo" not in markexpr or "not zoo" in markexpr:
        pytest.skip("zoo models run only with -m zoo")
    if not HAVE_ZOO:
        pytest.skip("needs torchvision or timm (see benchmarks/zoo.py)")


def _entries():
    if not HAVE_ZOO:
        return [pytest.param(None, id="zoo",
                             marks=pytest.mark.skip(reason="needs torchvision or timm"))]
    from benchmarks.zoo import zoo

    return [pytest.param(e, id=f"{e[0]}.{e[1]}") for e in zoo()]


@pytest.mark.parametrize("entry", _entries())
def test_zoo_model(entry):
    from benchmarks.zoo import run_one

    row = run_one(*entry)
    assert not row.error, row.error
    assert row.parity == 0.0  # preserve mode: a zero gate times a finite tensor adds exactly 0
    assert row.onnx == "yes"
    assert row.candidates <= row.layers * 2  # one per layer or block, never one per pair
