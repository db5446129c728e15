"""``SkipConfig(module=...)`` / ``--module``: one submodule rewritten and spliced back.

The model (``models.Detector``) branches on a tensor's value and returns a dict
with a data-dependent list, so neither torch.fx nor torch.export captures it
whole; its backbone is a plain CNN.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from helpers import one_line_error, run_cli
from models import Detector, detector
from ressurgeon import DeepenConfig, SkipConfig, SurgeryPlan, add_skips, deepen
from ressurgeon.errors import ConfigError, TraceError


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_whole_model_fails_with_an_error_naming_module():
    with pytest.raises(TraceError, match=r"--module backbone .*its children: backbone, head"):
        add_skips(detector(), (torch.randn(1, 3, 16, 16),), SkipConfig())


def test_module_backbone_rewrites_the_backbone_and_keeps_the_rest():
    model, x = detector(), torch.randn(2, 3, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = add_skips(model, (x,), SkipConfig(module="backbone"))
    whole = result.module
    assert type(whole) is Detector and whole is not model
    assert [s.name for s in result.skips] == ["backbone.skip_0__7", "backbone.skip_7__13"]
    assert all(whole.get_submodule(s.name) is not None for s in result.skips)
    assert result.parity.max_abs_diff == 0.0
    assert _same(whole(x), model(x)) and whole.decode(whole(x)) == model.decode(model(x))
    odd = torch.randn(3, 3, 12, 20)  # fx graphs take other sizes
    assert _same(whole(odd), model(odd))
    keys = whole.state_dict()
    assert set(before) <= set(keys)  # every original key, the backbone's included
    assert {k for k in set(keys) - set(before)} == {
        "backbone.skip_0__7.gate", "backbone.skip_0__7.proj.weight", "backbone.skip_7__13.gate"}
    assert all(torch.equal(keys[k], v) for k, v in before.items())
    assert whole.head is not model.head and torch.equal(whole.head.weight, model.head.weight)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    # negative control: opening the gates changes the scores
    with torch.no_grad():
        for name, p in whole.named_parameters():
            if name.endswith(".gate"):
                p.fill_(1.0)
    assert not torch.equal(whole(x)["scores"], model(x)["scores"])


def test_the_plan_remembers_the_module():
    model, x = detector(), torch.randn(1, 3, 16, 16)
    result = add_skips(model, (x,), SkipConfig(module="backbone", span=3))
    plan = SurgeryPlan.from_json(result.plan.to_json())
    assert plan.config.module == "backbone"
    assert plan.input_shapes == ((1, 3, 16, 16),)  # the whole model's inputs, for --plan
    again = add_skips(model, (x,), plan=plan)
    assert [s.name for s in again.skips] == [s.name for s in result.skips]
    assert _same(again.module(x), model(x))


def test_a_bad_module_is_refused_with_the_children():
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ConfigError, match=r"no submodule 'neck' \(its children: backbone, head"):
        add_skips(detector(), (x,), SkipConfig(module="neck"))
    with pytest.raises(ConfigError, match="dotted path"):
        SkipConfig(module="back bone")


def test_deepen_a_submodule():
    model, x = detector(), torch.randn(2, 3, 16, 16)
    result = deepen(model, (x,), DeepenConfig(blocks=2, how="new", module="backbone"))
    assert type(result.module) is Detector and len(result.new_blocks) == 2
    assert all(name.startswith("backbone.") for name in result.new_blocks)
    assert _same(result.module(x), model(x))
    assert result.module.decode(result.module(x)) == model.decode(model(x))
    smaller = result.unfold()  # still the identity: unfolded back to the original layers
    assert type(smaller) is Detector and set(smaller.state_dict()) == set(model.state_dict())


def test_cli_module_flag(tmp_path):
    weights = tmp_path / "det.pt"
    torch.save(detector().state_dict(), weights)
    whole = run_cli("add-skips", weights, "--arch", "models:detector", "-i", "1,3,16,16",
                    "-o", tmp_path / "o.pt")
    assert "--module" in one_line_error(whole)
    done = run_cli("add-skips", weights, "--arch", "models:detector", "-i", "1,3,16,16",
                   "--module", "backbone", "--dry-run", "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["config"]["module"] == "backbone" and len(report["skips"]) == 2
    assert report["parity"]["max_abs_diff"] == 0.0
    table = run_cli("add-skips", weights, "--arch", "models:detector", "-i", "1,3,16,16",
                    "--module", "backbone", "--dry-run")
    assert table.exit_code == 0 and "Shortcuts inserted in backbone" in table.output
    shown = run_cli("inspect", weights, "--arch", "models:detector", "-i", "1,3,16,16",
                    "--module", "backbone", "--json")
    assert shown.exit_code == 0, shown.output
    assert sum(s["chosen"] for s in json.loads(shown.stdout)["spans"]) == 2
    grown = run_cli("deepen", weights, "--arch", "models:detector", "-i", "1,3,16,16",
                    "--module", "backbone", "-n", "1", "--how", "new", "--dry-run", "--json")
    assert grown.exit_code == 0, grown.output
    assert json.loads(grown.stdout)["new_blocks"][0].startswith("backbone.")


def test_the_suggested_module_is_the_body_or_the_heaviest_child():
    from ressurgeon.capture.trace import _likely_body

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.trunk, self.head = nn.Linear(2, 2), nn.Linear(64, 64), nn.Linear(2, 2)

    assert _likely_body(Net()) == "trunk"            # no usual name: the most parameters
    assert _likely_body(detector()) == "backbone"
