"""Stages 4-5, rewrite and verify: function preservation, init modes, gradients, plans."""

import copy
import json

import pytest
import torch
import torch.nn as nn

from models import FAMILIES, InplaceCNN, build, deep_mlp, randomize_bn
from ressurgeon import (PlanError, PlannedSkip, Shortcut, SkipConfig, SurgeryPlan, add_skips,
                        apply_plan, check_gradients, check_parity, trace_model)

# Tolerances, with the reason for each.
PRESERVE_ATOL = 1e-6   # DESIGN contract: preserve mode equals the original (fp32, eval)
CHANGED_MIN = 1e-3     # standard/rezero must move outputs by far more than rounding


def gates(module):
    return [m.gate for m in module.modules() if isinstance(m, Shortcut) and m.gate is not None]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_preserve_keeps_outputs(family):
    model, inputs = build(family)
    result = add_skips(model, inputs)
    assert result.skips, f"{family}: no shortcut inserted"
    assert result.parity.max_abs_diff <= PRESERVE_ATOL
    with torch.no_grad():
        diff = (result.module(*inputs) - model(*inputs)).abs().max().item()
    assert diff <= PRESERVE_ATOL


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_standard_init_changes_outputs(family):  # negative control: the shortcuts are wired in
    model, inputs = build(family)
    result = add_skips(model, inputs, SkipConfig(init="standard"))
    assert result.parity.max_abs_diff > CHANGED_MIN
    assert not gates(result.module)


def test_flipping_a_preserve_gate_changes_outputs():
    model, inputs = build("plain_cnn")
    result = add_skips(model, inputs)
    with torch.no_grad():
        before = result.module(*inputs)
        gates(result.module)[0].fill_(1.0)
        after = result.module(*inputs)
    assert (after - before).abs().max().item() > CHANGED_MIN


def test_rezero_starts_from_the_shortcut():
    model, inputs = deep_mlp(4, 16).eval(), (torch.randn(3, 16),)
    result = add_skips(model, inputs, SkipConfig(init="rezero", span=2))
    assert result.parity.max_abs_diff > CHANGED_MIN
    skip = result.module.get_submodule(result.skips[0].name)
    h, x = torch.randn(3, 16), torch.randn(3, 16)
    torch.testing.assert_close(skip(h, x), x, rtol=0, atol=0)  # S(x) + 0 * H(x)


@pytest.mark.parametrize("family", ["plain_cnn", "mlp_widths", "transformer"])
def test_gradients_reach_every_new_parameter(family):
    model, inputs = build(family)
    result = add_skips(model, inputs)
    names = [s.name for s in result.skips]
    module = result.module.train()
    report = check_gradients(module, inputs, names)
    assert report.norms and not report.unreached
    for name, norm in report.norms.items():
        if name.endswith("gate"):
            assert norm > 0, f"{name} gets no gradient"
    proj = {n: v for n, v in report.norms.items() if ".proj." in n}
    assert all(v == 0.0 for v in proj.values())  # a zero gate blocks them for one step...
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    loss = sum((t ** 2).mean() for t in [module(*inputs)])
    loss.backward()
    opt.step()
    report = check_gradients(module, inputs, names)
    assert all(report.norms[n] > 0 for n in proj)  # ...then every projection learns


def test_standard_init_gives_projections_gradient_at_once():
    model, inputs = build("mlp_widths")
    result = add_skips(model, inputs, SkipConfig(init="standard"))
    report = check_gradients(result.module.train(), inputs, [s.name for s in result.skips])
    assert report.norms and all(v > 0 for v in report.norms.values())


@pytest.mark.parametrize("functional", [False, True])
def test_inplace_relu_cannot_corrupt_a_shortcut(functional):
    torch.manual_seed(0)
    model = randomize_bn(InplaceCNN(functional=functional)).eval()
    x = torch.randn(2, 3, 8, 8)
    # Shortcut from bn1's output, which ReLU(inplace=True) overwrites in the original.
    plan = SurgeryPlan(config=SkipConfig(init="preserve"),
                       skips=(PlannedSkip(source="bn1", target="bn3", kind="identity"),))
    result = add_skips(model, (x,), plan=plan)
    assert result.parity.max_abs_diff <= PRESERVE_ATOL
    gates(result.module)[0].data.fill_(1.0)  # a zero gate would hide the corruption
    with torch.no_grad():
        bn1 = model.bn1(model.conv1(x)).clone()
        assert (bn1 < 0).any()  # there is something for ReLU to overwrite
        expected = model(x) + bn1
        got = result.module(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert model.relu1.inplace  # the user's model keeps its flags


def test_input_model_is_untouched_and_shares_no_parameters():
    model, inputs = build("plain_cnn")
    model.train()
    state = copy.deepcopy(model.state_dict())
    result = add_skips(model, inputs)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.training and result.module.training
    ours = {id(p) for p in result.module.parameters()}
    assert not ours & {id(p) for p in model.parameters()}


def test_mixed_train_eval_modes_survive_the_pass():
    # a training model with frozen BatchNorm (a common fine-tuning set-up)
    model, inputs = build("plain_cnn")
    model.train()
    frozen = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert frozen
    for bn in frozen:
        bn.eval()
    before = {name: m.training for name, m in model.named_modules()}
    result = add_skips(model, inputs)
    assert {name: m.training for name, m in model.named_modules()} == before
    # the rewritten model inherits them: its BatchNorm stays frozen, the rest trains
    modes = {type(m).__name__: m.training for m in result.module.modules()}
    assert result.module.training and modes["Conv2d"] and not modes["BatchNorm2d"]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in result.module.modules()) == len(frozen)


def test_skip_records_and_readable_names():
    model, inputs = build("plain_cnn")
    result = add_skips(model, inputs)
    first = result.skips[0]
    assert first.name == "skip_0_0__0_7"
    assert (first.kind, first.stride, first.src_shape, first.dst_shape) == (
        "projection", 2, (2, 8, 16, 16), (2, 16, 8, 8))
    assert first.params == 8 * 16 + 1  # 1x1 conv 8->16 without bias, plus the gate
    assert result.params_added == sum(
        p.numel() for s in result.skips for p in result.module.get_submodule(s.name).parameters())
    assert isinstance(result.module.get_submodule(first.name).proj, nn.Conv2d)


def test_plan_round_trips_through_json_and_reapplies():
    model, inputs = build("mlp_widths")
    result = add_skips(model, inputs, SkipConfig(span=2, init="standard"))
    text = result.plan.to_json()
    again = SurgeryPlan.from_json(text)
    assert again == result.plan
    data = json.loads(text)
    data["skips"] = data["skips"][:1]  # a user edits the plan: keep one shortcut
    edited = add_skips(model, inputs, plan=SurgeryPlan.from_dict(data))
    assert len(edited.skips) == 1 and edited.skips[0].init == "standard"


def test_plan_errors_name_the_problem():
    model, inputs = build("two_tower")
    gm = trace_model(model, inputs)
    cfg = SkipConfig()
    with pytest.raises(PlanError, match="lacks"):
        apply_plan(gm, SurgeryPlan(cfg, (PlannedSkip("nope", "trunk_0", "identity"),)))
    with pytest.raises(PlanError, match="without passing left_3"):  # right tower bypasses it
        apply_plan(gm, SurgeryPlan(cfg, (PlannedSkip("left_3", "trunk_0", "projection"),)))
    with pytest.raises(PlanError, match="use kind projection"):
        apply_plan(gm, SurgeryPlan(cfg, (PlannedSkip("stem_1", "trunk_0", "identity"),)))
    with pytest.raises(PlanError, match="stride"):
        PlannedSkip("a", "b", "identity", stride=2)
    with pytest.raises(PlanError, match="not valid JSON"):
        SurgeryPlan.from_json("{")


def test_plan_layer_names_must_match_the_graph():
    model, inputs = build("mlp_widths")
    result = add_skips(model, inputs, SkipConfig(span=2))
    data = json.loads(result.plan.to_json())
    first = data["skips"][0]
    assert first["source_layer"] and first["target_layer"]
    for key, other in (("source_layer", first["target_layer"]),
                       ("target_layer", first["source_layer"])):
        edited = json.loads(json.dumps(data))
        edited["skips"][0][key] = other     # a layer name the node does not belong to
        end = first["source"] if key == "source_layer" else first["target"]
        with pytest.raises(PlanError, match=f"calls node '{end}' layer '{other}', but in this "
                                            "graph it belongs to layer"):
            add_skips(model, inputs, plan=SurgeryPlan.from_dict(edited))
    blank = json.loads(json.dumps(data))
    blank["skips"][0]["source_layer"] = blank["skips"][0]["target_layer"] = ""   # empty: accepted
    again = add_skips(model, inputs, plan=SurgeryPlan.from_dict(blank))
    assert [(s.source_layer, s.target_layer) for s in again.skips] == \
        [(s.source_layer, s.target_layer) for s in result.skips]


def test_parity_helper_reports_differences():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    report = check_parity(a, b, (torch.randn(4, 3),))
    assert report.max_abs_diff > 0 and not report.ok and report.tolerance == 1e-6
    assert check_parity(a, copy.deepcopy(a), (torch.randn(4, 3),)).max_abs_diff == 0.0


def test_export_fallback_model_is_rewritten_and_trains():
    model, inputs = build("shape_branch")
    result = add_skips(model, inputs, SkipConfig(span=1))
    assert result.method == "export" and result.skips
    assert result.parity.max_abs_diff <= PRESERVE_ATOL
    module = result.module.train()  # ep.module() would refuse this
    module(*inputs).sum().backward()
    assert all(g.grad is not None for g in gates(module))


def test_forward_that_edits_its_input_in_place():
    class Centers(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = deep_mlp(4, 8)

        def forward(self, x):
            x.sub_(0.5)           # a preprocessing step written in place
            return self.body(x)

    torch.manual_seed(0)
    model = Centers().eval()
    x = torch.randn(3, 8)
    before = x.clone()
    result = add_skips(model, (x,))
    assert result.parity.max_abs_diff <= PRESERVE_ATOL
    assert torch.equal(x, before)  # the caller's example tensor is untouched
