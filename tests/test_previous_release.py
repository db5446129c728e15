"""Files the previous release wrote still load, keep their shortcuts, and still apply.

tests/data/previous_release/ was written by ressurgeon at commit cf35128 (before the
layout change): a plain CNN's add / highway / concat results as .pt2 archives and plans,
its weights and the example input. The shortcut classes are found by the class path
torch.export recorded then (``ressurgeon.shortcuts.<Class>``), which must stay resolvable.
"""

from pathlib import Path

import pytest
import torch

from models import plain_cnn
from ressurgeon import SurgeryPlan, apply_plan, find_shortcuts, load_model, trace_model

DATA = Path(__file__).parent / "data" / "previous_release"
PARITY = 1e-6  # float32; every file was written with init preserve (gates at 0)


def _reference():
    model = plain_cnn().eval()
    model.load_state_dict(torch.load(DATA / "cnn_weights.pt", weights_only=True))
    return model, torch.load(DATA / "input.pt", weights_only=True)


@pytest.mark.parametrize("join,cls", [("add", "Shortcut"), ("highway", "HighwayShortcut"),
                                      ("concat", "ConcatJoin")])
def test_an_archive_of_the_previous_release_loads_with_its_shortcuts(join, cls):
    model, x = _reference()
    loaded = load_model(DATA / f"cnn_{join}.pt2").eval()
    sites = find_shortcuts(loaded)
    assert len(sites) == 2
    assert {type(s.module).__name__ for s in sites} == {cls}
    assert {s.module.join for s in sites} == {join}
    torch.testing.assert_close(loaded(x), model(x), atol=PARITY, rtol=0)


@pytest.mark.parametrize("join", ["add", "highway", "concat"])
def test_a_plan_of_the_previous_release_applies(join):
    model, x = _reference()
    plan = SurgeryPlan.load(DATA / f"cnn_{join}.plan.json")
    assert plan.config.join == join and plan.config.pattern == "chain"
    module, skips = apply_plan(trace_model(model, (x,)), plan)
    assert len(skips) == 2 and {s.join for s in skips} == {join}
    torch.testing.assert_close(module(x), model(x), atol=PARITY, rtol=0)
