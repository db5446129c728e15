"""Extension points: a join and a pattern defined in this file alone go through every stage.

The proof that a residual family is one class in one file: a scaled addition
``h + 0.5*a*S(x)`` and an "every second span" pattern are registered here, and
the library runs them through add_skips, a plan's JSON round trip, fold, the
gate report, a .pt2 save/load and ONNX without knowing them.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from torch import fx

from models import deep_mlp, plain_cnn
from ressurgeon import (SkipConfig, SurgeryPlan, add_skips, apply_plan, fold, gate_report,
                        load_model, save_model, trace_model)
from ressurgeon.catalog import (JOINS, PATTERNS, Entry, JoinEntry, register_join,
                                register_pattern)
from ressurgeon.errors import ConfigError
from ressurgeon.shortcuts import Shortcut, Term, find_shortcuts
from ressurgeon.shortcuts._graph import ShortcutSite, group_ends, projection_module
from ressurgeon.skips.patterns import Chain
from ressurgeon.verdicts import Reason

PARITY = 1e-6  # float32, preserve: the gate is exactly 0, so only 0 is added


class ScaledAdd(Shortcut):
    """``h + 0.5*a*S(x)``: an addition whose shortcut enters at half the gate."""

    join_name = "scaled"
    _TERMS = (Term("h", False, None), Term("x", True, "half"))

    def terms(self):
        return self._TERMS

    def coefficient(self, name):
        return 0.5 * self.gate

    @classmethod
    def from_inlined(cls, gm: fx.GraphModule, path: str, nodes: list[fx.Node]):
        ends = group_ends(nodes)
        if ends is None:
            return None
        out, externals = ends
        proj = next((n for n in nodes if n.op == "call_function" and len(n.args) > 1
                     and getattr(n.args[1], "target", None) == f"{path}.proj.weight"), None)
        x = proj.args[0] if proj is not None else min(
            externals, key={n: i for i, n in enumerate(gm.graph.nodes)}.__getitem__)
        h = next(e for e in externals if e is not x)
        module = cls("preserve", projection_module(gm, proj))
        gate = next(n for n in nodes if n.op == "get_attr" and n.target == f"{path}.gate")
        module.gate = gm.get_parameter(gate.target)
        return ShortcutSite(path=path, module=module, node=out, h=h, x=x, inlined=tuple(nodes))


class EverySecond(Chain):
    """The chain's spans, but only every second chosen one."""

    name = "every-second"

    @classmethod
    def select(cls, analysis, config):
        spans, kept = [], 0
        for span in super().select(analysis, config):
            if span.chosen:
                kept += 1
                if kept % 2 == 0:
                    span = span.__class__(**{**span.__dict__, "reason": Reason.EXCLUDED})
            spans.append(span)
        return spans


@pytest.fixture(autouse=True)
def registered():
    register_join(JoinEntry("scaled", f"{__name__}:ScaledAdd", "h + 0.5*a*S(x)",
                            formulas={"preserve": "h + 0.5*a*S(x)"}), replace=True)
    register_pattern(Entry("every-second", f"{__name__}:EverySecond",
                           "every second span of the chain"), replace=True)
    yield
    JOINS.pop("scaled")
    PATTERNS.pop("every-second")


def test_a_join_from_this_file_runs_through_every_stage(tmp_path):
    torch.manual_seed(0)
    model, x = plain_cnn().eval(), torch.randn(2, 3, 16, 16)
    config = SkipConfig(join="scaled", span=2)
    result = add_skips(model, (x,), config)
    assert len(result.skips) >= 2 and {s.join for s in result.skips} == {"scaled"}
    assert result.parity.max_abs_diff <= PARITY
    modules = [m for m in result.module.modules() if isinstance(m, ScaledAdd)]
    assert len(modules) == len(result.skips)

    # the module is what it says: a negative control opens the gates and sees half the shortcut
    with torch.no_grad():
        for m in modules:
            m.gate.fill_(2.0)  # 0.5 * 2 = S(x) at full strength
        opened = result.module(x)
        for m in modules:
            m.gate.zero_()
    assert (opened - model(x)).abs().max() > 1e-3

    # the plan's JSON round trip re-applies to a fresh trace
    plan = SurgeryPlan.from_json(result.plan.to_json())
    assert json.loads(result.plan.to_json())["config"]["join"] == "scaled"
    assert plan.config.join == "scaled"
    again, skips = apply_plan(trace_model(model, (x,)), plan)
    assert len(skips) == len(result.skips)
    torch.testing.assert_close(again(x), model(x), atol=PARITY, rtol=0)

    # gates read the catalog's formula and the module's own gate
    report = gate_report(result.module)
    assert {g.formula for g in report.gates} == {"h + 0.5*a*S(x)"}
    assert {g.join for g in report.gates} == {"scaled"} and {g.value for g in report.gates} == {0.0}

    # fold removes closed gates of a join it has never heard of (a sum of terms)
    folded = fold(result.module, (x,))
    assert {s.outcome for s in folded.skips} == {"removed"}
    assert not any(isinstance(m, ScaledAdd) for m in folded.module.modules())

    # .pt2: torch.export inlines the module; loading recognises it by its class path
    path = tmp_path / "scaled.pt2"
    save_model(result.module, path, (x,))
    loaded = load_model(path).eval()
    sites = find_shortcuts(loaded)
    assert len(sites) == len(result.skips)
    assert {type(s.module) for s in sites} == {ScaledAdd}
    torch.testing.assert_close(loaded(x), model(x), atol=PARITY, rtol=0)


def test_a_join_from_this_file_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from ressurgeon import export_onnx

    model, x = deep_mlp(6).eval(), torch.randn(4, 32)
    result = add_skips(model, (x,), SkipConfig(join="scaled"))
    report = export_onnx(result.module, tmp_path / "scaled.onnx", (x,))
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4


def test_a_pattern_from_this_file_chooses_the_pairs():
    model, x = deep_mlp(12).eval(), torch.randn(4, 32)
    chain = add_skips(model, (x,), SkipConfig(span=2))
    alternate = add_skips(model, (x,), SkipConfig(span=2, pattern="every-second"))
    assert len(chain.skips) >= 4
    assert len(alternate.skips) == (len(chain.skips) + 1) // 2
    assert [s.target for s in alternate.skips] == [s.target for s in chain.skips][::2]
    assert alternate.parity.max_abs_diff <= PARITY


def test_an_init_the_join_does_not_list_is_refused_with_its_choices():
    with pytest.raises(ConfigError, match="init standard has no scaled form: use one of preserve"):
        SkipConfig(join="scaled", init="standard")
    with pytest.raises(ConfigError, match="join must be one of add, concat, highway, scaled"):
        SkipConfig(join="nope")


def test_unknown_names_are_refused_by_the_catalog():
    with pytest.raises(ConfigError, match="already registered"):
        register_join(JoinEntry("add", f"{__name__}:ScaledAdd", "x", formulas={"preserve": "x"}))
    with pytest.raises(ConfigError, match="target must be"):
        JoinEntry("bad", "not a path", "x", formulas={"preserve": "x"})
