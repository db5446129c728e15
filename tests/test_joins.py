"""The residual families as joins: addition (ResNet), concatenation (DenseNet), highway gates."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import one_line_error, run_cli
from models import MobileNetLike, PlainChannelsLast, deep_mlp, plain_cnn
from ressurgeon import (ConfigError, SkipConfig, SurgeryPlan, add_skips, export_onnx, fold,
                        gate_report, load_model, save_model)
from ressurgeon.shortcuts import ConcatJoin, HighwayShortcut

# Exactness where the construction is exact in IEEE arithmetic: zero weights and gates
# contribute exact zeros; the consumer's widened sum adds exact zeros.
EXACT = 0.0


def nets():
    torch.manual_seed(0)
    return [("mlp", deep_mlp(8).eval(), torch.randn(8, 32)),
            ("cnn", plain_cnn().eval(), torch.randn(4, 3, 16, 16))]


@pytest.mark.parametrize("join", ["concat", "highway"])
def test_preserve_is_exact_and_every_new_weight_learns(join):
    for name, model, x in nets():
        result = add_skips(model, (x,), SkipConfig(join=join, init="preserve"))
        assert result.skips, name
        assert result.parity.max_abs_diff == EXACT and result.parity.nonfinite == 0
        result.module.train()
        F.cross_entropy(result.module(x), torch.randint(0, 5, (x.shape[0],))).backward()
        for s in result.skips:
            if join == "highway":
                gate = result.module.get_submodule(s.name).gate
                assert gate.grad is not None and gate.grad.abs().sum() > 0, name
            else:  # the consumer's new columns start at zero, with a gradient at once
                consumer = dict(result.module.named_modules())[s.consumer_layer]
                extra = s.src_shape[s.channel_axis]
                new = consumer.weight[:, -extra:]
                assert torch.all(new == 0)
                assert consumer.weight.grad[:, -extra:].abs().sum() > 0, name


def test_standard_inits_change_the_function_and_train():
    for join in ("concat", "highway"):
        for name, model, x in nets():
            result = add_skips(model, (x,), SkipConfig(join=join, init="standard"))
            assert result.parity.max_abs_diff > 1e-4, (join, name)
            # and train: 20 Adam steps on a fixed batch lower the loss and move every new weight
            module = result.module.train()
            new = {n: p.detach().clone() for n, p in module.named_parameters()
                   if any(n.startswith(s.name + ".") for s in result.skips)
                   or any(n.startswith(f"{s.consumer_layer}.") for s in result.skips
                          if s.consumer_layer)}
            assert new, (join, name)
            target = torch.randint(0, 5, (x.shape[0],), generator=torch.Generator().manual_seed(1))
            opt = torch.optim.Adam(module.parameters(), lr=1e-2)
            losses = []
            for _ in range(20):
                opt.zero_grad()
                loss = F.cross_entropy(module(x), target)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            assert losses[-1] < 0.5 * losses[0], (join, name, losses[0], losses[-1])
            moved = {n: (dict(module.named_parameters())[n] - p).abs().max().item()
                     for n, p in new.items()}
            assert all(d > 0 for d in moved.values()), (join, name, moved)


def test_highway_rezero_starts_as_its_shortcut_and_standard_carries():
    model, x = deep_mlp(8).eval(), torch.randn(4, 32)
    result = add_skips(model, (x,), SkipConfig(join="highway", init="rezero"))
    hw = [m for m in result.module.modules() if isinstance(m, HighwayShortcut)]
    assert hw and all(torch.all(m.gate == 0) for m in hw)
    assert all(torch.all(m.transform.bias == -2.0) for m in hw)  # T starts near 0.12: carry


def test_joins_round_trip_through_plans(tmp_path):
    for join in ("concat", "highway"):
        model, x = plain_cnn().eval(), torch.randn(2, 3, 16, 16)
        first = add_skips(model, (x,), SkipConfig(join=join))
        plan = SurgeryPlan.from_json(first.plan.to_json())
        assert plan == first.plan and plan.config.join == join
        again = add_skips(model, (x,), plan=plan)
        assert [s.name for s in again.skips] == [s.name for s in first.skips]


def test_fold_removes_untouched_joins_and_keeps_trained_ones():
    for name, model, x in nets():
        size = sum(p.numel() for p in model.parameters())
        for join in ("concat", "highway"):
            result = add_skips(model, (x,), SkipConfig(join=join))
            folded = fold(result.module, (x,))
            assert set(folded.counts()) == {"removed"}, (join, name)
            assert folded.max_abs_diff <= folded.tolerance
            bn = sum(m.num_features * 2 for m in model.modules()
                     if isinstance(m, nn.BatchNorm2d))  # folding BN also drops its affine
            assert sum(p.numel() for p in folded.module.parameters()) in (size, size - bn)
            with torch.no_grad():  # a trained highway gate or concat weight stays
                for m in result.module.modules():
                    if isinstance(m, HighwayShortcut):
                        m.gate.fill_(0.5)
                for s in result.skips:
                    if join == "concat":
                        layer = dict(result.module.named_modules())[s.consumer_layer]
                        layer.weight[:, -s.src_shape[s.channel_axis]:].fill_(0.01)
            trained = fold(result.module, (x,))
            assert set(trained.counts()) == ({"kept"} if join == "highway" else {"plain"})
            assert trained.max_abs_diff <= trained.tolerance


def test_onnx_and_pt2_round_trips(tmp_path):
    for join in ("concat", "highway"):
        for name, model, x in nets():
            result = add_skips(model, (x,), SkipConfig(join=join))
            report = export_onnx(result.module, tmp_path / "m.onnx", (x,))
            assert len(report.parity) == 2 and report.max_abs_diff <= report.tolerance
            save_model(result.module, tmp_path / "m.pt2", (x,))
            reloaded = load_model(tmp_path / "m.pt2").eval()
            torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=1e-6)
            for module in (result.module, reloaded):  # fx-traced and read back from .pt2
                gates = gate_report(module).gates
                assert len(gates) == len(result.skips) and {g.join for g in gates} == {join}
                assert all(g.value == 0 for g in gates)  # still closed
            assert set(fold(reloaded, (x,)).counts()) == {"removed"}


def test_concat_rejects_layers_it_cannot_widen_and_handles_channels_last():
    torch.manual_seed(0)
    result = add_skips(MobileNetLike().eval(), (torch.randn(2, 3, 16, 16),),
                       SkipConfig(join="concat"))
    assert any(s.reason == "no-consumer" for s in result.spans)  # depthwise convs follow
    assert result.parity.max_abs_diff <= 1e-6
    last = add_skips(PlainChannelsLast().eval(), (torch.randn(2, 3, 8, 8),),
                     SkipConfig(join="concat"))
    assert last.skips and all(s.channel_axis == -1 for s in last.skips)
    assert last.parity.max_abs_diff == EXACT


def test_inits_without_a_form_are_refused():
    with pytest.raises(ConfigError, match="rezero has no concat form"):
        SkipConfig(join="concat", init="rezero")
    with pytest.raises(ConfigError, match="morph has no highway form"):
        SkipConfig(join="highway", init="morph")
    with pytest.raises(ConfigError):
        ConcatJoin.widen(nn.Conv2d(4, 4, 3, groups=4), 2, SkipConfig().init)


def test_join_flag_in_the_cli(example_models, tmp_path):
    out = tmp_path / "d.pt2"
    result = run_cli("add-skips", example_models["vgg"], "--join", "concat", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["join"] == "concat" and report["parity"]["max_abs_diff"] == 0
    assert {s["join"] for s in report["skips"]} == {"concat"}
    result = run_cli("gates", out, "--json")
    assert result.exit_code == 0 and {g["join"] for g in json.loads(result.stdout)["gates"]} == {
        "concat"}
    line = one_line_error(run_cli("add-skips", example_models["vgg"], "--join", "dense"))
    assert "join must be one of" in line
