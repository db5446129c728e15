"""Stage 2, trace: exact equality with the original, the export fallback, in-place ops."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from models import FAMILIES, DataBranchNet, InplaceCNN, PosMLP, TokenStack, build
from ressurgeon import (ShapeError, SkipConfig, TraceError, TraceOptions, add_skips, load_model,
                        save_model, trace_model)
from ressurgeon._fx import capture_info, info
from ressurgeon.inplace import remove_inplace


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_traced_graph_equals_original_exactly(family):
    model, inputs = build(family)
    gm = trace_model(model, inputs)
    with torch.no_grad():
        assert torch.equal(gm(*inputs), model(*inputs))  # same ops, same order: bit-exact


def test_shapes_recorded_for_every_tensor():
    model, inputs = build("plain_cnn")
    gm = trace_model(model, inputs)
    first_conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert info(first_conv).shape == (2, 8, 16, 16)
    assert info(first_conv).dtype == torch.float32
    assert capture_info(gm).method == "fx"


def test_input_model_is_never_modified():
    model, inputs = build("plain_cnn")
    before = copy.deepcopy(model.state_dict())
    flags = [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)]
    model.train()
    gm = trace_model(model, inputs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)] == flags
    assert all(flags)  # the fixture really has in-place ReLUs
    assert not any(m.inplace for m in gm.modules() if isinstance(m, nn.ReLU))
    assert gm.training  # the traced copy keeps the original's mode


def test_fx_failure_falls_back_to_export_and_trains_like_the_original():
    model, inputs = build("shape_branch")
    gm = trace_model(model, inputs)
    assert capture_info(gm).method == "export"
    assert capture_info(gm).fx_error
    bns = [m for m in gm.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 3  # aten.batch_norm turned back into modules
    assert any(isinstance(m, nn.Dropout) for m in gm.modules())

    # Train mode: batch statistics, running-stat updates and dropout follow .train().
    reference = copy.deepcopy(model).train()
    gm.train()
    torch.manual_seed(3)
    expected = reference(*inputs)
    torch.manual_seed(3)
    got = gm(*inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(bns[0].running_mean, reference.b1.running_mean, rtol=0, atol=1e-7)
    assert bns[0].num_batches_tracked.item() == 1
    gm.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), reference(*inputs), rtol=0, atol=1e-6)


def test_untraceable_model_names_both_failures():
    with pytest.raises(TraceError, match="torch.fx failed .* torch.export"):
        trace_model(DataBranchNet(), (torch.randn(2, 4),))


def test_bad_input_shape_names_the_layer():
    model, _ = build("plain_cnn")
    with pytest.raises(ShapeError, match=r"layer '0\.0' \(Conv2d\) rejected input of shape \(2, 5, 16, 16\)"):
        trace_model(model, (torch.randn(2, 5, 16, 16),))


def test_example_inputs_must_be_tensors():
    with pytest.raises(ShapeError, match="example input 0 is a list"):
        trace_model(nn.Linear(2, 2), ([1.0, 2.0],))


@pytest.mark.parametrize("functional", [False, True])
def test_inplace_ops_are_turned_off(functional):
    gm = trace_model(InplaceCNN(functional=functional).eval(), (torch.randn(1, 3, 8, 8),))
    for node in gm.graph.nodes:
        assert node.kwargs.get("inplace") is not True
        if node.op == "call_module":
            assert getattr(gm.get_submodule(node.target), "inplace", False) is False


def test_removing_inplace_keeps_aliasing_semantics():
    class ReadsAfterMutation(nn.Module):
        def forward(self, x):
            y = x * 2
            z = y.relu_()     # overwrites y
            return y + z      # the original sees relu(y) twice

    m = ReadsAfterMutation()
    x = torch.randn(3, 4)
    gm = fx.symbolic_trace(m)
    assert remove_inplace(gm) == 1
    assert all(n.target != "relu_" for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), m(x), rtol=0, atol=0)


def test_buffer_updates_stay_in_place():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("seen", torch.zeros(()))

        def forward(self, x):
            self.seen.add_(1)
            return F.relu(x)

    gm = fx.symbolic_trace(Counter())
    assert remove_inplace(gm) == 0


def test_shared_inplace_relu_called_twice_keeps_the_function():
    class SharedRelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.relu = nn.ReLU(inplace=True)  # one module, two call sites

        def forward(self, x):
            y = self.a(x)
            self.relu(y)
            z = self.b(y)      # reads y as the first ReLU left it
            self.relu(z)
            return z + y       # both overwritten tensors read again

    torch.manual_seed(0)
    m = SharedRelu().eval()
    x = torch.randn(3, 4)
    gm = trace_model(m, (x,))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=0, atol=0)
    assert m.relu.inplace


# -- captures never answer for inputs they did not cover ----------------------------------------

def test_an_export_capture_refuses_a_size_it_did_not_cover():
    model = PosMLP().eval()
    result = add_skips(model, (torch.randn(2, 8, 16),))
    assert result.method == "export" and result.skips
    with pytest.raises(ShapeError, match="size 1 at dim 1.*captured by torch.export with size 8"):
        result.module(torch.randn(2, 1, 16))  # used to return shape (2, 8, 16)
    x = torch.randn(5, 8, 16)  # the batch stays dynamic
    torch.testing.assert_close(result.module(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("build,make", [
    (PosMLP, lambda n: torch.randn(3, n, 16)),
    (TokenStack, lambda n: torch.randint(0, 50, (3, n))),
])
def test_a_dynamic_sequence_dim_is_exact_at_every_length(build, make):
    model = build().eval()
    result = add_skips(model, (make(8),), SkipConfig(span=2),
                       trace=TraceOptions(dynamic=(1,)))
    assert result.method == "export" and result.skips
    assert capture_info(result.module).dynamic == ((0, 0), (0, 1))
    for length in (1, 3, 8):
        x = make(length)
        torch.testing.assert_close(result.module(x), model(x), rtol=0, atol=0)
    with pytest.raises((ShapeError, ValueError, RuntimeError)):
        result.module(make(9 if build is PosMLP else 17))  # past what the model itself allows


def test_a_saved_archive_keeps_the_dynamic_sequence_dim(tmp_path):
    model = TokenStack().eval()
    result = add_skips(model, (torch.randint(0, 50, (2, 8)),), trace=TraceOptions(dynamic=(1,)))
    save_model(result.module, tmp_path / "t.pt2", (torch.randint(0, 50, (2, 8)),))
    reloaded = load_model(tmp_path / "t.pt2")
    for length in (2, 5):
        ids = torch.randint(0, 50, (4, length))
        torch.testing.assert_close(reloaded(ids), model(ids), rtol=0, atol=1e-6)


def test_dims_asked_dynamic_are_never_quietly_fixed():
    class Pinned(PosMLP):
        def forward(self, x):
            torch._check(x.shape[1] == 8)  # the model's own code fixes the length
            return super().forward(x)

    with pytest.raises(TraceError, match="cannot keep every input dim 1 dynamic"):
        add_skips(Pinned().eval(), (torch.randn(2, 8, 16),), trace=TraceOptions(dynamic=(1,)))


def test_float_inputs_to_a_token_model_say_how_to_pass_the_dtype():
    with pytest.raises(ShapeError, match=r"integer inputs.*2,8:int64"):
        add_skips(TokenStack().eval(), (torch.randn(2, 8),))
