"""The plan check (skips/rewrite.py check_plan, plans.py) refuses what would not work and
reports what a plan overrides. (benchmarks/mutation.py mutates these checks.)"""

import json

import pytest
import torch
import torch.nn as nn

from models import deep_mlp
from ressurgeon import PlanError, SkipConfig, SurgeryPlan, add_skips


@pytest.fixture
def mlp_plan():
    model, x = deep_mlp(6, 16).eval(), torch.randn(2, 16)
    result = add_skips(model, (x,), SkipConfig(span=2))
    return model, x, result, json.loads(result.plan.to_json())


def plan(data) -> SurgeryPlan:
    return SurgeryPlan.from_dict(json.loads(json.dumps(data)))


def test_two_skips_may_not_end_at_one_node(mlp_plan):
    model, x, _, data = mlp_plan
    first = data["skips"][0]
    data["skips"] = [first, {**first, "source": "x", "source_layer": ""}]
    with pytest.raises(PlanError, match=f"two skips end at node '{first['target']}'"):
        add_skips(model, (x,), plan=plan(data))


def test_a_kind_the_join_does_not_take_is_refused(mlp_plan):
    model, x, _, data = mlp_plan
    data["config"]["join"] = "concat"           # concat takes concat skips, not identity
    with pytest.raises(PlanError, match="is of kind identity, but the plan's join concat"):
        add_skips(model, (x,), plan=plan(data))


def test_an_unknown_plan_version_is_refused(mlp_plan):
    _, _, _, data = mlp_plan
    data["version"] = 2
    with pytest.raises(PlanError, match="plan version 2 is not supported"):
        plan(data)


def test_overlapping_plan_skips_are_applied_and_reported(mlp_plan):
    model, x, result, data = mlp_plan
    rejected = [s for s in result.spans if s.reason == "overlaps"]
    assert rejected
    extra = rejected[0]
    data["skips"].append({"source": extra.source, "target": extra.target, "kind": "identity"})
    again = add_skips(model, (x,), plan=plan(data))
    assert len(again.skips) == len(result.skips) + 1
    assert {s.target for s in again.skips if "overlaps" in s.overrides} >= {extra.target}
    assert again.parity.ok


class MixedDtypes(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8).double()

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h.double())


def test_ends_of_different_dtypes_are_refused():
    model, x = MixedDtypes().eval(), torch.randn(2, 8)
    data = json.loads(add_skips(model, (x,), SkipConfig(span=1)).plan.to_json())
    data["skips"] = [{"source": "relu", "target": "b", "kind": "identity"}]   # float -> double
    with pytest.raises(PlanError, match="different dtypes"):
        add_skips(model, (x,), plan=plan(data))


class Overflows(nn.Module):
    """fp16: layer a's output is 6e4, a shortcut from it to c overflows (see test_attacks)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 64)
        self.c, self.d = nn.Linear(64, 128), nn.Linear(128, 128)   # a -> c: a 64->128 projection
        self.head = nn.Linear(128, 4)
        with torch.no_grad():
            self.a.weight.zero_()
            self.a.bias.fill_(6e4)
            self.b.weight.mul_(1e-4)
            self.c.weight.mul_(1e-3)

    def forward(self, x):
        for layer in (self.a, self.b, self.c, self.d):
            x = torch.relu(layer(x))
        return self.head(x)


def test_a_shortcut_path_that_overflows_is_refused_in_a_plan():
    model, x = Overflows().half().eval(), torch.randn(2, 16).half()
    result = add_skips(model, (x,), SkipConfig(span=2))
    bad = [s for s in result.spans if s.reason == "non-finite"]
    assert bad
    data = json.loads(result.plan.to_json())
    data["skips"] = [{"source": bad[0].source, "target": bad[0].target, "kind": "projection"}]
    with pytest.raises(PlanError, match="NaN or infinite on the example inputs"):
        add_skips(model, (x,), plan=plan(data))


def test_a_projection_with_the_wrong_stride_is_refused():
    from models import plain_cnn

    model, x = plain_cnn().eval(), torch.randn(2, 3, 16, 16)
    result = add_skips(model, (x,), SkipConfig(span=2))
    data = json.loads(result.plan.to_json())
    strided = [s for s in data["skips"] if s["kind"] == "projection" and s["stride"] == 2]
    assert strided
    strided[0]["stride"] = 1
    with pytest.raises(PlanError, match="the shapes need stride 2 .* the plan says 1"):
        add_skips(model, (x,), plan=plan(data))


@pytest.mark.parametrize("skips", [3, [3], ["x"], {"source": "a"}])
def test_entries_that_are_not_a_list_of_objects_are_named(skips):
    with pytest.raises(PlanError, match="the plan's 'skips' must be a list of objects, one per"):
        SurgeryPlan.from_dict({"config": {}, "skips": skips})
