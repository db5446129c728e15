"""Stage 3, find spans: traced graph + config -> every candidate, chosen or rejected.

Analysis only: nothing here touches weights or edits the graph.

The graph is grouped into *layers* (a weighted op from the registry, the norms
that follow it, then its activation). Layers form a tree: a layer's parent is
the nearest layer whose output dominates it. A candidate span runs from the
output of a layer's ``span``-th ancestor to that layer's output (before its
activation with pre-activation placement), so the source always dominates the
target and the span is a single-entry region of the graph. Non-overlapping
spans are then chosen by tiling each path of the tree, ``span`` layers each.

Merges of branches (``blocks.py``) are units of the tree too: a span that
crosses an Inception module counts it once, and two spans overlap when they
share a layer inside one. A merge the model already uses as a shortcut (an
existing residual) rejects every candidate that covers its layers, so no
shortcut ever runs inside or parallel to one. Each unit keeps channels at a
fixed axis (1 for convolutions, last for Linear and attention); the two ends
of a span must agree, and 1x1-spatial gate tensors are never span ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum

from torch import fx

from .blocks import Residual, find_merges
from .config import SkipConfig
from .dominators import DominatorTree
from .registry import Role, is_getitem, op_info
from .shortcuts import exported_shortcut_path
from .trace import META, node_label, op_name


class Reason(str, Enum):
    """Why a candidate span was not chosen."""

    NOT_TENSOR = "not-tensor"
    NOT_DOMINATED = "not-dominated"
    HEAD = "head"
    EXCLUDED = "excluded"
    DTYPE = "dtype-mismatch"
    SHAPE = "shape-mismatch"
    NEEDS_PROJECTION = "needs-projection"
    OVERLAPS = "overlaps"
    MAX_SKIPS = "max-skips"
    EXISTING = "existing-residual"
    SQUEEZED = "squeezed"
    LAYOUT = "layout-mismatch"
    NOT_IN_PLAN = "not-in-plan"

    @property
    def text(self) -> str:
        return _REASON_TEXT[self]


_REASON_TEXT = {
    Reason.NOT_TENSOR: "an end is not a single tensor",
    Reason.NOT_DOMINATED: "a path bypasses the source, so the sum would not be a residual",
    Reason.HEAD: "ends at the output layer (a shortcut into the logits is no residual block)",
    Reason.EXCLUDED: "excluded by the include/exclude patterns",
    Reason.DTYPE: "the two ends have different dtypes",
    Reason.SHAPE: "shapes differ by more than channels and an integer stride",
    Reason.NEEDS_PROJECTION: "shapes differ and kind=identity forbids projections",
    Reason.OVERLAPS: "overlaps a chosen span",
    Reason.MAX_SKIPS: "max_skips reached",
    Reason.EXISTING: "inside or parallel to a residual connection the model already has",
    Reason.SQUEEZED: "an end is a 1x1-spatial tensor (a squeeze-excitation gate, not a feature map)",
    Reason.LAYOUT: "the ends keep channels on different axes (channels-first vs channels-last)",
    Reason.NOT_IN_PLAN: "left out of the applied plan",
}


@dataclass(frozen=True)
class Layer:
    """A unit of the layer tree; node names, not nodes.

    Usually a weighted op with its norms and activation (``kind`` "layer").
    ``kind`` "block" is a merge of branches (an Inception module's concat, a
    squeeze-excitation gate) and "residual" a merge the model already uses as
    a shortcut; ``covers`` then names the layers inside its branches.
    """

    name: str            # readable: the anchor's module path, else its node name
    op: str              # e.g. "Conv2d", "linear"; "cat", "add", "mul" for blocks
    anchor: str          # the weighted op's node (its first tensor, for tuple outputs)
    pre_act: str         # last node before the activation
    out: str             # the activation's node (pre_act when there is none)
    channel_axis: int
    has_norm: bool = False
    kind: str = "layer"
    covers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Span:
    """A candidate shortcut from ``source``'s output to ``target``'s output.

    ``kind`` is "identity" or "projection" when the ends can be joined, else None;
    ``reason`` is None for a chosen span and says why otherwise.
    """

    source: str
    target: str
    source_layer: str
    target_layer: str
    layers: tuple[str, ...]          # layers inside the span, source excluded
    src_shape: tuple[int, ...] | None
    dst_shape: tuple[int, ...] | None
    channel_axis: int
    kind: str | None = None
    stride: int = 1
    reason: Reason | None = None
    residual: str | None = None      # for Reason.EXISTING: the model's own residual it meets

    @property
    def chosen(self) -> bool:
        return self.reason is None

    def to_dict(self) -> dict:
        return {
            "source": self.source, "target": self.target,
            "source_layer": self.source_layer, "target_layer": self.target_layer,
            "layers": list(self.layers),
            "src_shape": list(self.src_shape) if self.src_shape else None,
            "dst_shape": list(self.dst_shape) if self.dst_shape else None,
            "channel_axis": self.channel_axis, "kind": self.kind, "stride": self.stride,
            "chosen": self.chosen, "reason": self.reason.value if self.reason else None,
            "residual": self.residual,
        }


@dataclass
class GraphAnalysis:
    """What select_spans learnt about a graph; reused by the rewrite to check plans.

    ``layers`` are the weighted layers, ``blocks`` the merges of branches (kind
    "block" or "residual"), ``units`` both in graph order: the layer tree's nodes.
    """

    gm: fx.GraphModule
    layers: list[Layer]
    dominators: DominatorTree
    nodes: dict[str, fx.Node] = field(default_factory=dict)
    blocks: list[Layer] = field(default_factory=list)
    residuals: list[Residual] = field(default_factory=list)

    @property
    def units(self) -> list[Layer]:
        order = {n: i for i, n in enumerate(self.nodes)}
        return sorted(self.layers + self.blocks, key=lambda u: order[u.anchor])


def find_layers(gm: fx.GraphModule) -> list[Layer]:
    """Group the traced graph into layers, in graph order."""
    modules = dict(gm.named_modules())
    layers: list[Layer] = []
    seen: dict[str, int] = {}
    for node in gm.graph.nodes:
        info = op_info(node, modules)
        if info is None or info.role is not Role.LAYER:
            continue
        if exported_shortcut_path(node) is not None:
            continue  # a projection of ours, inlined by torch.export: part of a shortcut
        anchor = node
        if _shape(node) is None:  # e.g. MultiheadAttention returns (out, weights)
            firsts = [u for u in node.users if is_getitem(u, 0)]
            if len(firsts) != 1 or _shape(firsts[0]) is None:
                continue
            anchor = firsts[0]
        pre_act, out, has_norm = _tail(anchor, modules)
        name = node_label(node)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:  # a module called twice: each call is its own layer
            name = f"{name}#{seen[name]}"
        layers.append(Layer(name=name, op=op_name(node, modules), anchor=anchor.name,
                            pre_act=pre_act.name, out=out.name,
                            channel_axis=info.channel_axis, has_norm=has_norm))
    return layers


def _tail(anchor: fx.Node, modules) -> tuple[fx.Node, fx.Node, bool]:
    """(pre_act, out, has_norm): the norms that follow ``anchor``, then its activation."""
    pre_act, has_norm = anchor, False
    nxt = _single_user(pre_act)
    while nxt is not None and _role(nxt, modules) is Role.NORM and _shape(nxt) is not None:
        pre_act, has_norm = nxt, True
        nxt = _single_user(pre_act)
    out = pre_act
    if nxt is not None and _role(nxt, modules) is Role.ACTIVATION and _shape(nxt) is not None:
        out = nxt
    return pre_act, out, has_norm


def analyze_graph(gm: fx.GraphModule) -> GraphAnalysis:
    """Layers, blocks, residuals and dominators of a traced graph (shapes in node.meta)."""
    layers = find_layers(gm)
    dom = DominatorTree(gm.graph)
    nodes = {n.name: n for n in gm.graph.nodes}
    modules = dict(gm.named_modules())
    merges = find_merges(gm, layers, dom)
    blocks = []
    for merge in merges:
        pre_act, out, has_norm = _tail(nodes[merge.node], modules)
        blocks.append(Layer(name=merge.name, op=merge.op, anchor=merge.node,
                            pre_act=pre_act.name, out=out.name,
                            channel_axis=merge.channel_axis, has_norm=has_norm,
                            kind="residual" if merge.residual else "block",
                            covers=merge.covers))
    return GraphAnalysis(gm=gm, layers=layers, dominators=dom, nodes=nodes, blocks=blocks,
                         residuals=[m.residual for m in merges if m.residual is not None])


def find_residuals(gm: fx.GraphModule) -> list[Residual]:
    """The residual connections a traced model already has, in graph order.

    Args:
        gm: a GraphModule from ``trace_model`` (shapes in node.meta).

    Returns:
        One Residual per add or concat that one branch reaches past fewer
        weighted layers than another (``x + F(x)``, ResNet's downsample,
        DenseNet's concatenation).

    Example:
        >>> [r.name for r in find_residuals(trace_model(resnet, (x,)))]  # doctest: +SKIP
        ['layer1.0.add', 'layer1.1.add_1']
    """
    return analyze_graph(gm).residuals


def select_spans(gm: fx.GraphModule, config: SkipConfig) -> list[Span]:
    """Every candidate span of a traced graph, each chosen or rejected with a reason.

    Args:
        gm: a GraphModule from ``trace_model`` (shapes in node.meta).
        config: span length, kind, placement, include/exclude, max_skips.

    Returns:
        Candidates in graph order of their targets; ``span.chosen`` marks the tiling.

    Example:
        >>> spans = select_spans(trace_model(model, inputs), SkipConfig(span=2))  # doctest: +SKIP
    """
    analysis = analyze_graph(gm)
    nodes, dom = analysis.nodes, analysis.dominators
    parents = _layer_parents(analysis)
    heads = _head_layers(analysis)
    units = analysis.units
    covers = {u.name: frozenset((u.name, *u.covers)) for u in units}
    owner = {}  # layer or block name -> the innermost existing residual around it
    for block in reversed(analysis.blocks):  # outer blocks follow the blocks they contain
        if block.kind == "residual":
            owner.update((name, block.name) for name in covers[block.name])
    depth: dict[str, int] = {}
    candidates = []
    for unit in units:
        parent = parents.get(unit.name)
        depth[unit.name] = depth[parent.name] + 1 if parent is not None else 0
        path = [unit]
        while len(path) <= config.span and path[-1].name in parents:
            path.append(parents[path[-1].name])
        if len(path) <= config.span:
            continue  # fewer than `span` units above it: no candidate
        src = path[-1]
        inside = tuple(u.name for u in reversed(path[:-1]))
        covered = frozenset().union(*(covers[name] for name in inside))
        target = unit.out if config.placement == "post-activation" else unit.pre_act
        span = _candidate(nodes[src.out], nodes[target], src, unit, inside, config)
        met = next((owner[n] for unit_name in inside for n in covers[unit_name] if n in owner),
                   None)
        if unit.name in heads:  # says more than the shape mismatch a head usually has too
            span = replace(span, reason=Reason.HEAD)
        elif met is not None:
            span = replace(span, reason=Reason.EXISTING, residual=met)
        elif span.reason is None and not (config.allows(src.name) and config.allows(unit.name)):
            span = replace(span, reason=Reason.EXCLUDED)
        elif span.reason is None and not dom.dominates(nodes[span.source], nodes[span.target]):
            span = replace(span, reason=Reason.NOT_DOMINATED)
        candidates.append((depth[unit.name], span, covered))
    # Tiling can start at any of `span` depths; keep the one that places the most
    # shortcuts, then the most identities, then the fewest parameters.
    tilings = [_tile(candidates, config, offset) for offset in range(config.span)]
    return max(tilings, key=_tiling_score) if tilings else []


def _tile(candidates: list[tuple[int, Span, frozenset]], config: SkipConfig,
          offset: int) -> list[Span]:
    """Greedy non-overlapping choice; spans aligned with ``offset`` get the first pick.

    Two spans overlap when they share a layer, counting the layers inside the
    blocks they cross: a span around an Inception module excludes one inside a tower.
    """
    def aligned(depth: int) -> bool:
        return depth % config.span == offset

    verdicts: dict[int, Span] = {}
    used: set[str] = set()
    chosen = 0
    for first_pass in (True, False):
        for i, (depth, span, covered) in enumerate(candidates):
            if span.reason is not None or i in verdicts or aligned(depth) != first_pass:
                continue
            if not used.isdisjoint(covered):
                verdicts[i] = replace(span, reason=Reason.OVERLAPS)
                continue
            if config.max_skips is not None and chosen >= config.max_skips:
                verdicts[i] = replace(span, reason=Reason.MAX_SKIPS)
                continue
            verdicts[i] = span
            used.update(covered)
            chosen += 1
    return [verdicts.get(i, span) for i, (_, span, _) in enumerate(candidates)]


def _tiling_score(spans: list[Span]) -> tuple[int, int, int]:
    picked = [s for s in spans if s.chosen]
    return (len(picked), sum(s.kind == "identity" for s in picked),
            -sum(s.kind == "projection" for s in picked))


def mark_planned(spans: list[Span], planned: set[tuple[str, str]]) -> list[Span]:
    """The verdicts an applied plan gives: its skips chosen, every other candidate not."""
    marked = []
    for span in spans:
        if (span.source, span.target) in planned:
            marked.append(replace(span, reason=None, residual=None))
        elif span.chosen:
            marked.append(replace(span, reason=Reason.NOT_IN_PLAN))
        else:
            marked.append(span)
    return marked


def join_kind(src_shape: tuple[int, ...], dst_shape: tuple[int, ...],
              channel_axis: int) -> tuple[str, int] | None:
    """("identity" | "projection", stride) when a shortcut can join the shapes, else None.

    Identity needs equal shapes. A projection may change the channel axis
    (dim 1 for channels-first tensors of rank >= 3, the last dim otherwise) and,
    for channels-first tensors, shrink every spatial dim by one integer stride,
    as a strided 1x1 convolution does: ``out = (in - 1) // stride + 1``.
    """
    if src_shape == dst_shape:
        return "identity", 1
    if len(src_shape) != len(dst_shape) or src_shape[0] != dst_shape[0]:
        return None
    if channel_axis == 1 and len(src_shape) >= 3:
        spatial = list(zip(src_shape[2:], dst_shape[2:]))
        if any(d > s or d < 1 for s, d in spatial):
            return None
        s0, d0 = spatial[0]
        stride = 1 if s0 == d0 else -(-s0 // d0)  # the smallest stride that fits dim 0
        if all((s - 1) // stride + 1 == d for s, d in spatial):
            return "projection", stride
        return None
    if src_shape[:-1] == dst_shape[:-1]:
        return "projection", 1
    return None


def _candidate(src: fx.Node, dst: fx.Node, src_layer: Layer, dst_layer: Layer,
               inside: tuple[str, ...], config: SkipConfig) -> Span:
    src_shape, dst_shape = _shape(src), _shape(dst)
    span = Span(source=src.name, target=dst.name, source_layer=src_layer.name,
                target_layer=dst_layer.name, layers=inside, src_shape=src_shape,
                dst_shape=dst_shape, channel_axis=dst_layer.channel_axis)
    if src_shape is None or dst_shape is None:
        return replace(span, reason=Reason.NOT_TENSOR)
    if src.meta[META]["dtype"] != dst.meta[META]["dtype"]:
        return replace(span, reason=Reason.DTYPE)
    if len(src_shape) == len(dst_shape) and (
            _layout(src_layer.channel_axis, src_shape) != _layout(dst_layer.channel_axis, dst_shape)):
        return replace(span, reason=Reason.LAYOUT)
    if dst_layer.channel_axis == 1 and (_squeezed(src_shape) or _squeezed(dst_shape)):
        return replace(span, reason=Reason.SQUEEZED)
    joined = join_kind(src_shape, dst_shape, dst_layer.channel_axis)
    if joined is None:
        return replace(span, reason=Reason.SHAPE)
    kind, stride = joined
    if kind == "projection" and config.kind == "identity":
        return replace(span, kind=kind, stride=stride, reason=Reason.NEEDS_PROJECTION)
    if config.kind == "projection":
        kind = "projection"
    return replace(span, kind=kind, stride=stride)


def _layout(channel_axis: int, shape: tuple[int, ...]) -> str:
    """'first' or 'last': where a unit keeps channels (the same thing for [B, F] tensors)."""
    rank = len(shape)
    return "last" if rank <= 2 or channel_axis in (-1, rank - 1) else "first"


def _squeezed(shape: tuple[int, ...]) -> bool:
    """A channels-first tensor with every spatial dim 1, as a squeeze-excitation gate makes."""
    return len(shape) >= 3 and all(d == 1 for d in shape[2:])


def _layer_parents(analysis: GraphAnalysis) -> dict[str, Layer]:
    """Each unit's nearest unit (layer or block) whose output dominates its anchor."""
    units = analysis.units
    by_out = {u.out: u for u in units}
    dom, nodes = analysis.dominators, analysis.nodes
    memo: dict[fx.Node, Layer | None] = {}

    def nearest(start: fx.Node | None) -> Layer | None:
        walked, node = [], start
        while node is not None and node not in memo and node.name not in by_out:
            walked.append(node)
            node = dom.parent(node)
        found = None if node is None else memo.get(node, by_out.get(node.name))
        for w in walked:  # path compression keeps the whole walk linear
            memo[w] = found
        return found

    parents = {}
    for unit in units:
        above = nearest(dom.parent(nodes[unit.anchor]))
        if above is not None:
            parents[unit.name] = above
    return parents


def _head_layers(analysis: GraphAnalysis) -> set[str]:
    """Layers with no norm, no activation and no layer after them: the model's output layer."""
    anchors = {analysis.nodes[lay.anchor] for lay in analysis.layers}
    feeds_layer: set[fx.Node] = set()
    for node in reversed(list(analysis.gm.graph.nodes)):
        if any(u in anchors or u in feeds_layer for u in node.users):
            feeds_layer.add(node)
    return {lay.name for lay in analysis.layers
            if lay.out == lay.anchor and analysis.nodes[lay.out] not in feeds_layer}


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    return node.meta.get(META, {}).get("shape")


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _role(node: fx.Node, modules) -> Role | None:
    info = op_info(node, modules)
    return info.role if info else None
