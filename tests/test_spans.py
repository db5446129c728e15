"""Stage 3, find spans: layers, dominators, shape rules, tiling, reasons."""

import operator

import pytest
import torch
from torch import fx

from models import FAMILIES, PlainResNet, TwoTower, build, deep_mlp, plain18, plain34, plain50
from ressurgeon import Reason, SkipConfig, add_skips, find_layers, find_spans, trace_model
from ressurgeon.analysis.dominators import DominatorTree
from ressurgeon.spans import join_kind


def chosen(spans):
    return [s for s in spans if s.chosen]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_candidate_is_chosen_or_has_a_reason(family):
    model, inputs = build(family)
    spans = find_spans(model, inputs)
    assert spans, "every family has candidates"
    for s in spans:
        assert s.chosen == (s.reason is None)
        assert s.reason is None or isinstance(s.reason, Reason)
    assert chosen(spans), f"{family}: nothing chosen"


def test_chosen_spans_tile_without_overlap():
    spans = find_spans(deep_mlp(9, 16), (torch.randn(2, 16),), SkipConfig(span=2))
    picked = chosen(spans)
    covered = [lay for s in picked for lay in s.layers]
    assert len(covered) == len(set(covered))
    # 9 hidden layers + head; span 2 tiles layers 0->2->4->6->8; the head is not a block.
    assert [(s.source_layer, s.target_layer) for s in picked] == [
        ("0", "4"), ("4", "8"), ("8", "12"), ("12", "16")]
    assert {s.reason for s in spans if not s.chosen} == {Reason.OVERLAPS, Reason.HEAD}


@pytest.mark.parametrize("span,expected", [(1, 8), (2, 4), (3, 2), (4, 2)])
def test_span_length_sets_the_number_of_blocks(span, expected):
    spans = find_spans(deep_mlp(9, 16), (torch.randn(2, 16),), SkipConfig(span=span))
    assert len(chosen(spans)) == expected
    assert all(len(s.layers) == span for s in chosen(spans))


def test_mlp_with_changing_widths_gets_linear_projections():
    model, inputs = build("mlp_widths")
    picked = chosen(find_spans(model, inputs))
    kinds = [(s.kind, s.src_shape, s.dst_shape) for s in picked]
    assert ("projection", (4, 16), (4, 24)) in kinds
    assert ("identity", (4, 24), (4, 24)) in kinds
    assert all(s.channel_axis == -1 for s in picked)


def test_cnn_across_pooling_gets_a_strided_projection():
    model, inputs = build("plain_cnn")
    picked = chosen(find_spans(model, inputs))
    first = picked[0]
    assert (first.kind, first.stride, first.src_shape, first.dst_shape) == (
        "projection", 2, (2, 8, 16, 16), (2, 16, 8, 8))


def test_post_activation_targets_the_activation_output():
    model, inputs = build("plain_cnn")
    pre = chosen(find_spans(model, inputs, SkipConfig(placement="pre-activation")))
    post = chosen(find_spans(model, inputs, SkipConfig(placement="post-activation")))
    gm = trace_model(model, inputs)
    layers = {lay.name: lay for lay in find_layers(gm)}
    assert [s.target for s in pre] == [layers[s.target_layer].pre_act for s in pre]
    assert [s.target for s in post] == [layers[s.target_layer].out for s in post]
    assert layers["0.0"].op == "Conv2d" and layers["0.0"].pre_act != layers["0.0"].out


def test_kind_identity_rejects_projections_and_retiles():
    model, inputs = build("mlp_widths")
    spans = find_spans(model, inputs, SkipConfig(kind="identity"))
    assert any(s.reason is Reason.NEEDS_PROJECTION for s in spans)
    assert all(s.kind == "identity" for s in chosen(spans))


def test_kind_projection_projects_even_equal_shapes():
    model, inputs = build("mlp_widths")
    assert {s.kind for s in chosen(find_spans(model, inputs, SkipConfig(kind="projection")))} == {
        "projection"}


def test_include_exclude_and_max_skips():
    model, inputs = deep_mlp(9, 16), (torch.randn(2, 16),)
    spans = find_spans(model, inputs, SkipConfig(exclude=("4",)))
    assert all("4" not in (s.source_layer, s.target_layer) for s in chosen(spans))
    assert any(s.reason is Reason.EXCLUDED for s in spans)
    spans = find_spans(model, inputs, SkipConfig(include=("1*",)))
    assert all(s.source_layer.startswith("1") and s.target_layer.startswith("1")
               for s in chosen(spans))
    spans = find_spans(model, inputs, SkipConfig(max_skips=2))
    assert len(chosen(spans)) == 2
    assert sum(s.reason is Reason.MAX_SKIPS for s in spans) == 3  # 8->12, 10->14, 12->16


def test_branches_dominators_and_spans():
    model = TwoTower().eval()
    gm = trace_model(model, (torch.randn(1, 3, 8, 8),))
    tree = DominatorTree(gm.graph)
    node = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    cat = next(n for n in gm.graph.nodes if n.target is torch.cat)
    assert tree.dominates(node["stem.1"], cat)
    assert not tree.dominates(node["left.3"], cat)      # the right tower bypasses it
    assert tree.dominates(node["left.1"], node["left.3"])
    spans = find_spans(model, (torch.randn(1, 3, 8, 8),), SkipConfig(span=1))
    verdicts = {(s.source_layer, s.target_layer): s.reason for s in spans}
    assert verdicts[("left.0", "left.2")] is None and verdicts[("right.0", "right.2")] is None
    # The concat is a block, one unit of the layer tree: the trunk's first span starts at it,
    # and the span around the whole block would share layers with the in-tower spans.
    assert verdicts[("cat", "trunk.0")] is None
    assert verdicts[("stem.0", "cat")] is Reason.OVERLAPS
    spans = find_spans(model, (torch.randn(1, 3, 8, 8),), SkipConfig(span=3))
    verdicts = {(s.source_layer, s.target_layer): s.reason for s in spans}
    # a span from before the fork to after the join counts the towers as one unit
    assert verdicts == {("stem.0", "trunk.2"): Reason.OVERLAPS, ("cat", "trunk.4"): None,
                        ("trunk.0", "head"): Reason.HEAD}


def test_transformer_stack_gets_identity_spans_on_tokens():
    model, inputs = build("transformer")
    gm = trace_model(model, inputs)
    ops = [lay.op for lay in find_layers(gm)]
    assert ops.count("MultiheadAttention") == 3 and ops.count("Linear") == 7
    # attention + two feed-forward layers make one block: span 3 tiles the blocks exactly
    picked = chosen(find_spans(model, inputs, SkipConfig(span=3)))
    assert [(s.source_layer, s.target_layer) for s in picked] == [
        ("embed", "blocks.0.ff2"), ("blocks.0.ff2", "blocks.1.ff2"),
        ("blocks.1.ff2", "blocks.2.ff2")]
    assert all(s.kind == "identity" and s.dst_shape == (2, 5, 16) for s in picked)


def test_tiling_offset_prefers_identity_spans():
    model, inputs = build("transformer")
    picked = chosen(find_spans(model, inputs, SkipConfig(span=2)))
    assert len(picked) == 4
    # starting at the attention layer puts two spans on equal shapes; from the embedding, one
    assert sum(s.kind == "identity" for s in picked) == 2


@pytest.mark.parametrize("src,dst,axis,expected", [
    ((2, 8, 16, 16), (2, 8, 16, 16), 1, ("identity", 1)),
    ((2, 8, 16, 16), (2, 16, 16, 16), 1, ("projection", 1)),
    ((2, 8, 16, 16), (2, 16, 8, 8), 1, ("projection", 2)),
    ((2, 8, 15, 15), (2, 16, 8, 8), 1, ("projection", 2)),    # (15 - 1) // 2 + 1 = 8
    ((2, 8, 16, 16), (2, 16, 4, 8), 1, None),                 # two different strides
    ((2, 8, 8, 8), (2, 8, 16, 16), 1, None),                  # upsampling
    ((2, 8, 16), (3, 8, 16), 1, None),                        # batch differs
    ((2, 5, 16), (2, 5, 32), -1, ("projection", 1)),          # tokens, width differs
    ((2, 4, 4, 16), (2, 4, 4, 32), -1, ("projection", 1)),    # channels-last
    ((2, 4, 4, 16), (2, 2, 2, 32), -1, None),                 # channels-last cannot stride
    ((2, 16), (2, 16, 1), -1, None),                          # rank differs
])
def test_join_kind(src, dst, axis, expected):
    assert join_kind(src, dst, axis) == expected


class _Residuals(torch.nn.Module):
    """``blocks`` residual blocks ``x = x + relu(fc(x))``: every add joins two paths."""

    def __init__(self, blocks: int):
        super().__init__()
        self.fcs = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(blocks))

    def forward(self, x):
        for fc in self.fcs:
            x = x + torch.relu(fc(x))
        return x


class _CountingIdom(dict):
    """An idom table that counts its reads: each is one step up the dominator tree."""

    reads = 0

    def __getitem__(self, key):
        _CountingIdom.reads += 1
        return super().__getitem__(key)


class _CountingTree(DominatorTree):
    idom = property(lambda self: self._idom,
                    lambda self, table: setattr(self, "_idom", _CountingIdom(table)))


def _tree_steps(graph) -> int:
    _CountingIdom.reads = 0
    _CountingTree(graph)
    return _CountingIdom.reads


def test_dominator_tree_is_linear_on_a_long_chain():
    gm = fx.symbolic_trace(deep_mlp(500, 4))
    tree = DominatorTree(gm.graph)
    nodes = list(gm.graph.nodes)
    assert tree.dominates(nodes[1], nodes[-2]) and not tree.dominates(nodes[-2], nodes[1])


@pytest.mark.parametrize("blocks", [200, 400])
def test_dominator_tree_takes_a_linear_number_of_steps(blocks):
    # Operations counted, not time: the steps up the tree that joining two paths takes. A
    # quadratic walk (to the root at every add) would take ~blocks**2 / 2 steps.
    graph = fx.symbolic_trace(_Residuals(blocks)).graph
    steps = _tree_steps(graph)
    assert blocks <= steps <= 4 * len(graph.nodes), (steps, len(graph.nodes))
    tree = DominatorTree(graph)
    adds = [n for n in graph.nodes if n.target is operator.add]
    assert len(adds) == blocks
    assert all(tree.parent(b) is a for a, b in zip(adds, adds[1:]))   # each add: the last one


# -- does it put shortcuts where a designer would? The ResNet paper's plain networks ------------

def resnet_shortcuts(model: PlainResNet, last_conv: str):
    """ResNet's own shortcuts: (block, kind, stride) for every block, in order."""
    out = []
    for s, stage in enumerate((model.layer1, model.layer2, model.layer3, model.layer4), 1):
        for b, block in enumerate(stage):
            cin = block.conv1.in_channels
            cout = getattr(block, last_conv).out_channels
            stride = block.conv1.stride[0] if last_conv == "conv2" else block.conv2.stride[0]
            kind = "identity" if cin == cout and stride == 1 else "projection"
            out.append((f"layer{s}.{b}.{last_conv}", kind, stride))
    return out


@pytest.mark.parametrize("build,span,last_conv,blocks", [
    (plain18, 2, "conv2", 8), (plain34, 2, "conv2", 16), (plain50, 3, "conv3", 16),
])
def test_plain_resnets_get_exactly_resnets_shortcuts(build, span, last_conv, blocks):
    torch.manual_seed(0)
    model, x = build().eval(), torch.randn(1, 3, 64, 64)
    result = add_skips(model, (x,), SkipConfig(span=span))
    got = [(s.target_layer, s.kind, s.stride) for s in result.skips]
    assert got == resnet_shortcuts(model, last_conv) and len(got) == blocks
    first = result.skips[0]  # the first block reads the stem's pooled output, as ResNet does
    assert first.source_layer == "conv1" and first.src_shape == (1, 64, 16, 16)
    assert result.parity.max_abs_diff == 0
