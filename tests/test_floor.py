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
    """How many modules were copied whole (outermost calls only), by ``copy.deepcopy``
    or by ressurgeon's own copy (``quiet_copy``'s fast path)."""
    import ressurgeon._torch as plumbing

    count, depth = [0], [0]

    def counted(copier):
        def counting(x, memo=None, *rest):
            if depth[0] == 0 and isinstance(x, nn.Module):
                count[0] += 1
            depth[0] += 1
            try:
                return copier(x, memo, *rest) if memo is not None else copier(x)
            finally:
                depth[0] -= 1
        return counting

    monkeypatch.setattr(copy, "deepcopy", counted(copy.deepcopy))
    monkeypatch.setattr(plumbing, "_copy", counted(plumbing._copy))
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


def test_the_fast_copy_keeps_what_deepcopy_keeps():
    """quiet_copy's fast path against copy.deepcopy: ties, shared storage, hooks, plain
    attributes and modes come out the same, and nothing is shared with the original."""
    from ressurgeon._torch import quiet_copy

    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.BatchNorm1d(4), lin, nn.Linear(4, 4))
    model[3].weight = lin.weight                       # a tied parameter
    model.register_buffer("whole", torch.arange(6.0))
    model.register_buffer("part", model.whole[2:4])    # a view: same storage
    model.register_buffer("alone", torch.ones(3))
    model.names = ["a", "b"]                           # a mutable plain attribute
    calls = []
    model[1].register_forward_hook(lambda m, i, o: calls.append(1))
    model[1].eval()
    new = quiet_copy(model)
    assert new[0] is new[2] and new[3].weight is new[0].weight
    assert new.part.untyped_storage().data_ptr() == new.whole.untyped_storage().data_ptr()
    assert new.names == model.names and new.names is not model.names
    assert not new[1].training and new.training
    ours = {t.untyped_storage().data_ptr() for t in (*new.parameters(), *new.buffers())}
    theirs = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    assert not ours & theirs
    reference = copy.deepcopy(model)
    x = torch.randn(5, 4)
    assert torch.equal(new(x), reference(x)) and len(calls) == 2   # the hook came along
    assert list(new.state_dict()) == list(reference.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(),
                                                  reference.state_dict().values()))


def test_the_fast_copy_takes_classes_with_their_own_state_hooks():
    """Conv's own __setstate__ goes through the fast path; a parametrized module (its own
    __deepcopy__) goes to copy.deepcopy; both come out equal and independent."""
    from torch.nn.utils import parametrizations

    from ressurgeon._torch import quiet_copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
                          parametrizations.weight_norm(nn.Conv2d(4, 4, 1)))
    new = quiet_copy(model)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(new(x), model(x))
    assert new[0].padding_mode == "reflect" and new[0] is not model[0]
    with torch.no_grad():
        new[0].weight.add_(1.0)
        new[1].parametrizations.weight.original0.mul_(2.0)
    assert not torch.equal(new(x), model(x))
    assert torch.equal(model(x), copy.deepcopy(model)(x))   # the original did not move


def test_a_rearrangement_takes_its_inputs_statistics_without_a_pass(monkeypatch):
    """view / permute / flatten / eval-mode dropout move values: max |y| is the input's, read
    from its node instead of another aminmax over the tensor."""
    from ressurgeon._fx import info
    from ressurgeon.capture.shapes import propagate_shapes

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.drop = nn.Linear(6, 6), nn.Dropout(0.5)

        def forward(self, x):
            y = self.fc(x)
            z = self.drop(y.permute(0, 2, 1).reshape(2, -1).flatten())
            return torch.relu(z)

    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(Net())
    calls = [0]
    aminmax = torch.aminmax

    def counting(t, *a, **k):
        calls[0] += 1
        return aminmax(t, *a, **k)

    monkeypatch.setattr(torch, "aminmax", counting)
    x = torch.randn(2, 3, 6) * 100
    propagate_shapes(gm, (x,))
    nodes = {n.name: n for n in gm.graph.nodes}
    fc = info(nodes["fc"]).absmax
    assert fc == float(gm.fc(x).abs().max())
    moved = [info(nodes[k]).absmax for k in ("permute", "reshape", "flatten", "drop")]
    assert moved == [fc] * 4
    assert calls[0] == 3   # the input, fc and relu: not the rearrangements, not the output
