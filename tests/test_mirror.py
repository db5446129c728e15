"""The mirror pattern: U-Net's long skips on plain encoder-decoders built in code.

Pairs are asserted by layer names; ``preserve`` is exact for add (the gate is
0, so 0 is added: torch.equal) and within 1e-6 for concat (the widened layer's
sums run over more, zero-weighted, channels in another order).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import run_cli
from models import encoder_decoder, plain_cnn
from ressurgeon import SkipConfig, SurgeryPlan, add_skips, apply_plan, find_spans, trace_model
from ressurgeon.shortcuts import ConcatJoin, Shortcut
from ressurgeon.verdicts import Reason

CONCAT_PARITY = 1e-6  # float32: the zero columns add exact zeros, the sum order may differ
UPS = ["transpose", "upsample", "interpolate", "shuffle"]


def _mirror(model, x, join="add", **extra):
    return add_skips(model, (x,), SkipConfig(pattern="mirror", join=join, **extra))


def _open(result, value=0.5):
    """Open every shortcut as training would: gates for add, the new columns for concat."""
    with torch.no_grad():
        for name, p in result.module.named_parameters():
            if name.endswith(".gate"):
                p.fill_(value)
        for skip in result.skips:
            if skip.consumer_layer is not None:
                layer = result.module.get_submodule(
                    next(n.target for n in result.module.graph.nodes
                         if n.op == "call_module" and n.args and getattr(n.args[0], "target",
                                                                         None) == skip.name))
                extra = skip.src_shape[1]
                layer.weight[:, -extra:].fill_(value / extra)


def test_the_pairs_are_unets_outermost_to_outermost():
    torch.manual_seed(0)
    model, x = encoder_decoder(up="transpose"), torch.randn(2, 3, 16, 16)
    result = _mirror(model, x, join="concat")
    pairs = [(s.source_layer, s.consumer_layer) for s in result.skips]
    # inner pair first in graph order: level 1 (8x8) meets decoder 0, level 0 (16x16) decoder 1
    assert pairs == [("down.1.3", "dec.0.0"), ("down.0.3", "dec.1.0")]
    assert [(s.src_shape, s.dst_shape) for s in result.skips] == [
        ((2, 16, 8, 8), (2, 16, 8, 8)), ((2, 8, 16, 16), (2, 8, 16, 16))]
    assert result.parity.max_abs_diff <= CONCAT_PARITY
    # taps are the last tensor before each pool; joins what the level's first conv reads
    spans = [s for s in result.spans if s.chosen]
    assert [(s.source, s.target) for s in spans] == [("down_1_5", "ups_0_1"),
                                                      ("down_0_5", "ups_1_1")]
    assert all(s.fit for s in spans) and all(p.fit for p in result.plan.skips)


@pytest.mark.parametrize("up", UPS)
@pytest.mark.parametrize("join", ["add", "concat"])
def test_each_upsampling_and_join_is_exact_and_survives_odd_sizes(up, join):
    torch.manual_seed(0)
    model, x = encoder_decoder(up=up), torch.randn(2, 3, 16, 16)
    result = _mirror(model, x, join=join)
    assert len(result.skips) == 2 and {s.join for s in result.skips} == {join}
    if up in ("upsample", "interpolate"):  # the decoder reads 32 channels: a projection for add
        assert {s.kind for s in result.skips} == ({"projection"} if join == "add" else {"concat"})
    odd = torch.randn(2, 3, 15, 15)  # 15 -> 7 -> 3 -> 6 -> 12: the taps are cropped
    for inp in (x, odd):
        out, ref = result.module(inp), model(inp)
        assert out.shape == ref.shape
        if join == "add":
            assert torch.equal(out, ref)
        else:
            torch.testing.assert_close(out, ref, atol=CONCAT_PARITY, rtol=0)
    # negative control: opened, the long skips change the output, at the odd size too
    _open(result)
    for inp in (x, odd):
        assert (result.module(inp) - model(inp)).abs().max() > 1e-3


@pytest.mark.parametrize("dims,shape", [(1, (2, 3, 32)), (3, (1, 3, 8, 8, 8))])
@pytest.mark.parametrize("join", ["add", "concat"])
def test_1d_and_3d_encoder_decoders(dims, shape, join):
    torch.manual_seed(0)
    model, x = encoder_decoder(dims=dims, up="transpose"), torch.randn(*shape)
    result = _mirror(model, x, join=join)
    assert [s.source_layer for s in result.skips] == ["down.1.3", "down.0.3"]
    assert [s.src_shape[2:] for s in result.skips] == [tuple(shape[2:][i] // 2 for i in
                                                             range(dims)), tuple(shape[2:])]
    assert result.parity.max_abs_diff <= CONCAT_PARITY
    odd = torch.randn(*shape[:2], *(d - 1 for d in shape[2:]))
    torch.testing.assert_close(result.module(odd), model(odd), atol=CONCAT_PARITY, rtol=0)


def test_levels_with_unequal_convs_keep_the_level_boundaries():
    """Tie-break: the tap is the encoder level's last tensor, the join the decoder level's first."""
    torch.manual_seed(0)
    model, x = encoder_decoder(enc_convs=3, dec_convs=1), torch.randn(1, 3, 16, 16)
    result = _mirror(model, x)
    assert [(s.source_layer, s.target_layer) for s in result.skips] == [
        ("down.1.6", "ups.0.0"), ("down.0.6", "ups.1.0")]
    assert torch.equal(result.module(x), model(x))


class FCNLike(nn.Module):
    """Three x2 downsamplings, then one x8 bilinear upsampling (FCN, DeepLabV3, LRASPP)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))

    def forward(self, x):
        return F.interpolate(self.body(x), size=x.shape[-2:], mode="bilinear")


def test_no_pair_qualifies_and_each_candidate_says_why():
    spans = find_spans(FCNLike(), (torch.randn(1, 3, 32, 32),), SkipConfig(pattern="mirror"))
    assert not any(s.chosen for s in spans)
    assert [s.reason for s in spans] == [Reason.LEVELS, Reason.NO_MIRROR, Reason.NO_MIRROR]
    assert spans[0].src_shape == (1, 3, 32, 32) and spans[0].target == "interpolate"
    # a classifier never goes back up: each pooling level is a no-mirror candidate
    spans = find_spans(plain_cnn().eval(), (torch.randn(1, 3, 16, 16),),
                       SkipConfig(pattern="mirror"))
    assert spans and {s.reason for s in spans} == {Reason.NO_MIRROR}
    # an MLP has no resolution at all: nothing to pair, nothing inserted
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert add_skips(mlp, (torch.randn(2, 4),), SkipConfig(pattern="mirror")).skips == []


class UNet(nn.Module):
    """An encoder-decoder that has its long skip already (one level)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.mid = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                 nn.ConvTranspose2d(8, 8, 2, 2))
        self.dec = nn.Conv2d(16, 2, 3, padding=1)

    def forward(self, x):
        e = self.enc(x)
        return self.dec(torch.cat([e, self.mid(e)], 1))


def test_a_unet_already_has_its_skips():
    spans = find_spans(UNet(), (torch.randn(1, 3, 16, 16),), SkipConfig(pattern="mirror"))
    assert [s.reason for s in spans] == [Reason.EXISTING]


def test_the_plan_keeps_the_fit_through_json_and_max_skips_applies():
    torch.manual_seed(0)
    model, x = encoder_decoder(), torch.randn(1, 3, 16, 16)
    result = _mirror(model, x, max_skips=1)
    assert len(result.skips) == 1 and result.skips[0].source_layer == "down.1.3"
    assert [s.reason for s in result.spans] == [None, Reason.MAX_SKIPS]
    data = json.loads(result.plan.to_json())
    assert [s["fit"] for s in data["skips"]] == [True]
    plan = SurgeryPlan.from_json(result.plan.to_json())
    again, skips = apply_plan(trace_model(model, (x,)), plan)
    assert len(skips) == 1 and not skips[0].overrides  # nested pairs are no overlap
    odd = torch.randn(1, 3, 13, 17)
    assert torch.equal(again(odd), model(odd))
    # the chain's plans are written as before: no fit entry
    chain = add_skips(model, (x,), SkipConfig())
    assert chain.skips and all("fit" not in s for s in json.loads(chain.plan.to_json())["skips"])


def test_the_chain_pattern_is_unchanged_by_the_mirror():
    torch.manual_seed(0)
    model, x = encoder_decoder(), torch.randn(1, 3, 16, 16)
    default = find_spans(model, (x,), SkipConfig(span=2))
    assert default == find_spans(model, (x,), SkipConfig(span=2, pattern="chain"))
    assert not any(s.fit for s in default)
    # the chain never pairs across a level: its shortcuts stay within one resolution or stride
    chosen = [s for s in default if s.chosen]
    assert chosen and all(s.stride in (1, 2) for s in chosen)
    assert all(s.src_shape[2:] == s.dst_shape[2:] or s.stride == 2 for s in chosen)


def test_nested_pairs_nest_the_modules():
    torch.manual_seed(0)
    model, x = encoder_decoder(widths=(4, 8, 16, 32)), torch.randn(1, 3, 32, 32)
    add = _mirror(model, x)
    assert [s.source_layer for s in add.skips] == ["down.2.3", "down.1.3", "down.0.3"]
    assert sum(isinstance(m, Shortcut) for m in add.module.modules()) == 3
    concat = _mirror(model, x, join="concat")
    assert sum(isinstance(m, ConcatJoin) for m in concat.module.modules()) == 3
    assert concat.parity.max_abs_diff <= CONCAT_PARITY


def test_cli_inspect_and_add_skips_with_pattern_mirror(tmp_path):
    torch.manual_seed(0)
    model, x = encoder_decoder(), torch.randn(1, 3, 16, 16)
    path = tmp_path / "ed.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    shown = run_cli("inspect", path, "--pattern", "mirror", "--join", "concat", "--json")
    assert shown.exit_code == 0, shown.output
    spans = json.loads(shown.stdout)["spans"]
    assert sum(s["chosen"] for s in spans) == 2 and all(s["fit"] for s in spans)
    out = tmp_path / "unet.pt2"
    done = run_cli("add-skips", path, "--pattern", "mirror", "--join", "concat", "-o", out,
                   "--json")
    assert done.exit_code == 0, done.output
    assert len(json.loads(done.stdout)["skips"]) == 2
    loaded = torch.export.load(out).module()
    torch.testing.assert_close(loaded(x), model(x), atol=CONCAT_PARITY, rtol=0)
    why = run_cli("inspect", path, "--pattern", "nope")
    assert why.exit_code == 2 and "pattern must be one of chain, mirror" in why.stderr
