"""The pass close to its floor: one pass per tensor for the statistics shape propagation
records, and one deep copy of the model per add_skips call (the copy that keeps the user's
model untouched). Timings live in benchmarks/bench_floor.py; these tests count."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from models import plain_cnn
from ressurgeon import SkipConfig, add_skips
from ressurgeon.shapes import _absmax


@pytest.fixture
def module_copies(monkeypatch):
    """How many modules ``copy.deepcopy`` was asked to copy (outermost calls only)."""
    count, depth = [0], [0]
    deepcopy = copy.deepcopy

    def counting(x, memo=None, _nil=[]):  # noqa: B006 - copy.deepcopy's own signature
        if depth[0] == 0 and isinstance(x, nn.Module):
            count[0] += 1
        depth[0] += 1
        try:
            return deepcopy(x, memo)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(copy, "deepcopy", counting)
    return count


@pytest.mark.parametrize("verify", [True, False])
def test_add_skips_copies_a_module_once(module_copies, verify):
    torch.manual_seed(0)
    model = plain_cnn().eval()
    result = add_skips(model, (torch.randn(1, 3, 16, 16),), SkipConfig(span=2), verify=verify)
    assert result.skips
    assert module_copies[0] == 1


@pytest.mark.parametrize("kind", ["program", "unlifted"])
def test_exported_input_is_copied_once_and_left_untouched(module_copies, kind):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    ep = torch.export.export(plain_cnn().eval(), (x,))
    model = ep if kind == "program" else ep.module()
    state = ep.state_dict if kind == "program" else model.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    expected = ep.module()(x)
    module_copies[0] = 0  # ep.module() above is the test's, not the pass's
    result = add_skips(model, (x,), SkipConfig(span=2))
    assert module_copies[0] == 1
    assert result.skips and result.parity.max_abs_diff <= 1e-6
    assert all(torch.equal(before[k], v) for k, v in state.items())
    mine = {p.data_ptr() for p in model.parameters()} if kind == "unlifted" else set()
    assert not mine & {p.data_ptr() for p in result.module.parameters()}
    torch.testing.assert_close(ep.module()(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_absmax_is_max_abs_with_nan_and_inf_kept(dtype):
    t = torch.tensor([[1.5, -3.0], [2.0, 0.25]], dtype=dtype)
    assert _absmax(t) == 3.0
    assert _absmax(torch.tensor([0.5, 4.0], dtype=dtype)) == 4.0
    assert _absmax(torch.tensor([-0.0, 0.0], dtype=dtype)) == 0.0
    assert math.isnan(_absmax(torch.tensor([1.0, float("nan"), -9.0], dtype=dtype)))
    assert math.isnan(_absmax(torch.tensor([float("-inf"), float("nan")], dtype=dtype)))
    assert _absmax(torch.tensor([1.0, float("-inf")], dtype=dtype)) == math.inf
    assert _absmax(torch.tensor(-7.0, dtype=dtype)) == 7.0   # a scalar


def test_absmax_measures_only_real_floating_tensors():
    assert _absmax(torch.tensor([3, -5])) is None
    assert _absmax(torch.tensor([True, False])) is None
    assert _absmax(torch.empty(0, 4)) is None
    assert _absmax(torch.empty(2, 3, device="meta")) is None
