"""Exact on inf inputs: every join that claims exactness at insertion, and deepen's blocks.

IEEE gives ``0 * inf = NaN``: a zero gate (or zero weight) times an infinite
value used to turn an input that the original maps to a finite output into a
NaN. Each case checks the value (bitwise equal to the original) and the
gradient of every new parameter (finite and non-zero on the first step).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ressurgeon import SkipConfig, add_skips, fold
from ressurgeon.config import DeepenConfig
from ressurgeon.deepen import deepen
from ressurgeon.shortcuts import ConcatJoin, HighwayShortcut, Shortcut

INF = float("inf")


def tanh_mlp() -> nn.Sequential:
    """An inf input feature stays inf through the first layer and its ReLU (what a shortcut
    from there reads); the next layer's tanh saturates it: the output is finite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.Tanh(),
                          nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).eval()
    with torch.no_grad():  # positive weights: a row with one inf is all +inf or all -inf, no NaN
        for layer in (model[0], model[2]):
            layer.weight.abs_().add_(0.1)
    return model


def inf_input() -> torch.Tensor:
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    x[0, 0], x[1, 3], x[2, 5] = INF, -INF, INF
    return x


def test_gated_is_exact_at_zero_and_ieee_elsewhere_with_a_gradient():
    from ressurgeon.shortcuts.base import finite_or_zero, gated
    value = torch.tensor([1.5, INF, -INF, float("nan"), -2.0])
    gate = torch.zeros((), requires_grad=True)
    out = gated(gate, value)
    assert torch.equal(out, torch.zeros(5))
    (grad,) = torch.autograd.grad((out * torch.arange(1.0, 6.0)).sum(), gate)
    assert grad.item() == pytest.approx(1.5 * 1 + (-2.0) * 5)   # the finite entries
    open_gate = torch.tensor(0.5)
    torch.testing.assert_close(gated(open_gate, value), open_gate * value, equal_nan=True)
    assert torch.equal(finite_or_zero(value), torch.tensor([1.5, 0, 0, 0, -2.0]))


@pytest.mark.parametrize("init", ["preserve", "morph"])
@pytest.mark.parametrize("projected", [False, True])
def test_add_join_is_h_for_inf_shortcut_values(init, projected):
    torch.manual_seed(0)
    join = Shortcut(init, nn.Linear(6, 6, bias=False) if projected else None)
    h, x = torch.randn(4, 6), inf_input()
    out = join(h, x)
    assert torch.equal(out, h)
    out.pow(2).sum().backward()
    grad = join.gate.grad
    assert torch.isfinite(grad) and grad.item() != 0.0
    # (proj's own weight gradient reads x: 0 * inf there, as for any layer reading that input)


@pytest.mark.parametrize("projected", [False, True])
def test_highway_preserve_is_h_for_inf_inputs(projected):
    torch.manual_seed(0)
    join = HighwayShortcut("preserve", nn.Linear(6, 6, bias=False) if projected else None,
                           nn.Linear(6, 6), channel_axis=-1)
    h, x = torch.randn(4, 6), inf_input()
    out = join(h, x)
    assert torch.equal(out, h)
    out.pow(2).sum().backward()
    assert torch.isfinite(join.gate.grad).all() and join.gate.grad.abs().sum() > 0


def test_concat_zero_columns_ignore_inf_features():
    torch.manual_seed(0)
    consumer = nn.Linear(6, 5)
    wide = ConcatJoin.widen(consumer, 6, ConcatJoin("preserve", -1).init)
    join = ConcatJoin("preserve", channel_axis=-1)
    c, x = torch.randn(4, 6), inf_input()
    out = wide(join(c, x))
    assert torch.isfinite(out).all()   # a wider GEMM may sum in another order: rounding only
    torch.testing.assert_close(out, consumer(c), rtol=0, atol=1e-6)
    out.pow(2).sum().backward()
    new_columns = wide.weight.grad[:, 6:]
    assert torch.isfinite(new_columns).all() and new_columns.abs().sum() > 0


@pytest.mark.parametrize("config", [
    SkipConfig(span=1, kind="projection"),
    SkipConfig(span=1, kind="projection", init="morph"),
    SkipConfig(span=1, join="highway"),
    SkipConfig(span=1, join="concat"),
], ids=["preserve", "morph", "highway", "concat"])
def test_add_skips_keeps_finite_outputs_for_inf_inputs(config):
    model = tanh_mlp()
    x = inf_input()
    want = model(x)
    assert torch.isfinite(want).all()
    result = add_skips(model, (torch.randn(4, 6),), config)
    assert result.skips
    got = result.module(x)
    assert torch.isfinite(got).all()   # concat's wider GEMM may round differently: 1e-6
    torch.testing.assert_close(got, want, rtol=0, atol=0 if config.join != "concat" else 1e-6)
    if config.join == "highway" or config.init.value == "morph":
        return  # their gates also read h or x themselves: inf there gives 0 * inf in the
        # gradient, as for the original's own layers (the unit tests above check finite h)
    got.pow(2).sum().backward()
    before = {k: v.shape for k, v in model.state_dict().items()}
    new = [p for name, p in result.module.named_parameters()  # gates, widened layers
           if "proj" not in name and before.get(name.replace("_", ".")) != p.shape]
    grads = [p.grad for p in new if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_fold_removes_the_guard_with_the_closed_shortcut():
    model = tanh_mlp()
    result = add_skips(model, (torch.randn(4, 6),), SkipConfig(span=1, kind="projection"))
    folded = fold(result.module, (torch.randn(4, 6),))
    assert [s.outcome for s in folded.skips] == ["removed"] * len(result.skips)
    targets = {str(n.target) for n in folded.module.graph.nodes}
    assert not any("isfinite" in t or "where" in t for t in targets)
    assert torch.equal(folded.module(inf_input()), model(inf_input()))


def test_fold_of_an_open_gate_is_a_plain_mul():
    model = tanh_mlp()
    result = add_skips(model, (torch.randn(4, 6),), SkipConfig(span=1, kind="projection"))
    with torch.no_grad():
        for name, p in result.module.named_parameters():
            if name.endswith("gate"):
                p.fill_(0.25)
    folded = fold(result.module, (torch.randn(4, 6),))
    targets = {str(n.target) for n in folded.module.graph.nodes}
    assert not any("isfinite" in t or "where" in t for t in targets)
    x = torch.randn(4, 6)
    torch.testing.assert_close(folded.module(x), result.module(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["new", "copy"])
def test_deepen_blocks_keep_finite_outputs_for_inf_inputs(how):
    model = tanh_mlp()
    if how == "copy":  # a model with residual blocks to copy: add_skips with standard init
        model = add_skips(model, (torch.randn(4, 6),), SkipConfig(span=1, init="standard"),
                          verify=False).module.eval()
    x = inf_input()
    want = model(x)
    assert torch.isfinite(want).all()
    result = deepen(model, (torch.randn(4, 6),), DeepenConfig(blocks=1, how=how))
    assert result.blocks
    got = result.module(x)
    assert torch.equal(got, want)
    got.pow(2).sum().backward()
    zeroed = [dict(result.module.named_parameters())[t] for b in result.blocks
              for t in b.zeroed if t in dict(result.module.named_parameters())]
    assert zeroed and all(p.grad is not None and torch.isfinite(p.grad).all() for p in zeroed)
    assert any(p.grad.abs().sum() > 0 for p in zeroed)
