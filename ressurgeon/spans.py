"""Stage 3, find spans: graph analysis + config -> every candidate, chosen or rejected.

Analysis only: nothing here touches weights or edits the graph.

A candidate span covers ``span`` units of the layer tree (``analysis/layers.py``)
and ends at the last one's output (before its activation with pre-activation
placement). It reads what feeds its first layer, after any pooling, flattening
or dropout between the layers, as a designer would (ResNet's first block reads
the stem's pooled output); the source layer's own output only when that joins
the target more cheaply. Either way the source dominates the target and the
span is a single-entry region of the graph. Non-overlapping
spans are then chosen by tiling each path of the tree, ``span`` units each.

Whether two nodes may be joined at all is decided by one function,
``pair_verdict``, used both here and when a plan is checked: the ends must be
tensors of one dtype, the source must dominate the target, and the shapes must
join (identity, or a 1x1 projection with one integer stride). Two more
rules are heuristics that a hand-edited plan may override: each end keeps
channels on the same axis (``layout``), and neither end is a 1x1-spatial gate
tensor (``squeezed``). Merges of branches count as one unit, and a merge the
model already uses as a shortcut (an existing residual) rejects every
candidate that covers its layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import StrEnum

import torch
from torch import fx

from ._fx import info, node_label
from .analysis.blocks import Residual
from .analysis.layers import GraphAnalysis, Layer, analyze_graph, find_layers, find_residuals
from .config import Join, Kind, Placement, SkipConfig
from .registry import is_getitem
from .shortcuts import ConcatJoin

__all__ = ["Reason", "Span", "PairVerdict", "pair_verdict", "select_spans", "join_kind",
           "mark_planned", "end_name", "units_between",
           # the layer tree's names, documented here before analysis/ existed
           "Layer", "GraphAnalysis", "analyze_graph", "find_layers", "find_residuals", "Residual"]


class Reason(StrEnum):
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
    NON_FINITE = "non-finite"
    CONSUMER = "no-consumer"

    @property
    def text(self) -> str:
        return _REASON_TEXT[self]

    @property
    def overridable(self) -> bool:
        """A heuristic that an edited plan may override (reported as an override)."""
        return self in OVERRIDABLE


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
    Reason.NON_FINITE: ("the shortcut path S(x) is NaN or infinite on the example inputs "
                        "(a zero gate would turn it into NaN and cut the gate's gradient)"),
    Reason.CONSUMER: ("concat: no single Conv/Linear/LSTM/GRU/RNN after the span can be "
                      "widened to take the features (none, several, grouped, shared, "
                      "functional or multi-layer)"),
}
OVERRIDABLE = frozenset({Reason.LAYOUT, Reason.SQUEEZED, Reason.OVERLAPS, Reason.HEAD,
                         Reason.EXISTING})


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
    kind: str | None = None          # "identity", "projection", or "concat"
    stride: int = 1                  # projection stride, or concat's pooling factor
    reason: Reason | None = None
    residual: str | None = None      # for Reason.EXISTING: the model's own residual it meets
    consumer: str | None = None      # concat: the node of the layer that takes the features
    consumer_layer: str | None = None

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
            "residual": self.residual, "consumer": self.consumer,
            "consumer_layer": self.consumer_layer,
        }


@dataclass(frozen=True)
class PairVerdict:
    """Whether a shortcut may join ``src`` to ``dst``: the kind and stride, and what is wrong.

    ``reasons`` lists every rule the pair breaks, in the order reports give
    them; ``enforced`` those that no plan can override.
    """

    kind: str | None
    stride: int
    reasons: tuple[Reason, ...]

    @property
    def enforced(self) -> tuple[Reason, ...]:
        return tuple(r for r in self.reasons if not r.overridable)


def pair_verdict(analysis: GraphAnalysis, src: fx.Node, dst: fx.Node,
                 src_axis: int, dst_axis: int) -> PairVerdict:
    """The one rule for "may these two nodes be joined by a shortcut".

    Args:
        analysis: the graph's analysis (for the dominator tree).
        src, dst: the node the shortcut reads and the node whose value the sum replaces.
        src_axis, dst_axis: the channel axis each end keeps (1 or -1).

    Returns:
        A PairVerdict: kind "identity" or "projection" and its stride when the
        shapes join, and every reason the pair is not a valid residual.
    """
    a, b = info(src), info(dst)
    reasons = _end_reasons(a, b, src_axis, dst_axis)
    kind, stride = None, 1
    if Reason.NOT_TENSOR not in reasons:
        if dst_axis == 1 and (_squeezed(a.shape) or _squeezed(b.shape)):
            reasons.append(Reason.SQUEEZED)
        joined = join_kind(a.shape, b.shape, dst_axis)
        if joined is None:
            reasons.append(Reason.SHAPE)
        else:
            kind, stride = joined
            if _overflows(a, kind, src_axis):
                reasons.append(Reason.NON_FINITE)
    if src is dst or not analysis.dominators.dominates(src, dst):
        reasons.append(Reason.NOT_DOMINATED)
    return PairVerdict(kind=kind, stride=stride, reasons=tuple(reasons))


def _end_reasons(a, b, src_axis: int, dst_axis: int) -> list[Reason]:
    """What every join asks of its two ends: single tensors, one dtype, one layout."""
    if a.shape is None or b.shape is None:
        return [Reason.NOT_TENSOR]
    reasons = []
    if a.dtype != b.dtype:
        reasons.append(Reason.DTYPE)
    if len(a.shape) == len(b.shape) and _layout(src_axis, a.shape) != _layout(dst_axis, b.shape):
        reasons.append(Reason.LAYOUT)
    return reasons


def select_spans(graph: fx.GraphModule | GraphAnalysis, config: SkipConfig) -> list[Span]:
    """Every candidate span of a traced graph, each chosen or rejected with a reason.

    Args:
        graph: the ``analyze_graph`` result (preferred: computed once and passed
            on), or a GraphModule from ``trace_model`` (analysed here).
        config: span length, kind, placement, include/exclude, max_skips.

    Returns:
        Candidates in graph order of their targets; ``span.chosen`` marks the tiling.

    Example:
        >>> spans = select_spans(analyze_graph(trace_model(model, inputs)), SkipConfig())  # doctest: +SKIP
    """
    analysis = graph if isinstance(graph, GraphAnalysis) else analyze_graph(graph)
    nodes, parents = analysis.nodes, analysis.parents
    children: dict[str, list[Layer]] = {}
    for unit in analysis.units:
        if unit.name in parents:
            children.setdefault(parents[unit.name].name, []).append(unit)
    covers = {u.name: frozenset((u.name, *u.covers)) for u in analysis.units}
    owner = {}  # layer or block name -> the innermost existing residual around it
    for block in reversed(analysis.blocks):  # outer blocks follow the blocks they contain
        if block.kind == "residual":
            owner.update((name, block.name) for name in covers[block.name])
    # Tiling enumerates `span` offsets: a span longer than the tree is deep finds no
    # candidate anyway, so the work stays bounded by the number of units.
    span_len = min(config.span, len(analysis.units) + 1)
    depth: dict[str, int] = {}
    candidates = []
    for unit in analysis.units:
        parent = parents.get(unit.name)
        depth[unit.name] = depth[parent.name] + 1 if parent is not None else 0
        path = [unit]
        while len(path) <= span_len and path[-1].name in parents:
            path.append(parents[path[-1].name])
        if len(path) <= span_len:
            continue  # fewer than `span` units above it: no candidate
        src = path[-1]
        inside = tuple(u.name for u in reversed(path[:-1]))
        covered = frozenset().union(*(covers[name] for name in inside))
        target = unit.out if config.placement is Placement.POST else unit.pre_act
        if config.join is Join.CONCAT:
            span = _concat_candidate(analysis, src, path[-2], unit, inside, children, config)
        else:
            span = _best_source(analysis, src, path[-2], nodes[target], unit, inside, config)
        met = next((owner[n] for unit_name in inside for n in covers[unit_name] if n in owner),
                   None)
        if unit.name in analysis.heads:  # says more than the shape mismatch a head usually has
            span = replace(span, reason=Reason.HEAD)
        elif met is not None:
            span = replace(span, reason=Reason.EXISTING, residual=met)
        candidates.append((depth[unit.name], span, covered))
    offsets = range(min(config.span, max(depth.values(), default=0) + 1))
    # Tiling can start at any of `span` depths; keep the one that places the most
    # shortcuts, then the most identities, then the fewest parameters.
    tilings = [_tile(candidates, config, offset) for offset in offsets]
    return max(tilings, key=_tiling_score) if tilings else []


def _best_source(analysis: GraphAnalysis, src: Layer, first: Layer, dst: fx.Node, unit: Layer,
                 inside: tuple[str, ...], config: SkipConfig) -> Span:
    """The span from where a designer would read its input, else from the source layer's output.

    A designer reads the tensor that feeds the span's first layer, after the
    pooling, flattening or dropout between the two layers (ResNet reads its first
    block's input after the stem's max-pool): that tensor is taken when it joins
    the target at no greater cost (an identity, or an unstrided or smaller
    projection) than the source layer's own output, or when only it joins.
    """
    early = _candidate(analysis, analysis.nodes[src.out], dst, src, unit, inside, config)
    feed = _feeding(analysis, analysis.nodes[first.anchor])
    if feed is None or feed is analysis.nodes[src.out]:
        return early
    late = _candidate(analysis, feed, dst, src, unit, inside, config)
    if late.reason is None and (early.reason is not None or _cost(late) <= _cost(early)):
        return late
    return early


def _concat_candidate(analysis: GraphAnalysis, src: Layer, first: Layer, unit: Layer,
                      inside: tuple[str, ...], children: dict[str, list[Layer]],
                      config: SkipConfig) -> Span:
    """DenseNet: the span's input features join the input of the next layer after ``unit``.

    The consumer must be the only unit after the span, a Conv1d/2d/3d or Linear
    module called once with no groups; x joins its input after average pooling
    by an integer factor when the spatial sizes differ.
    """
    nodes = analysis.nodes
    feed = _feeding(analysis, nodes[first.anchor])
    sources = [n for n in (feed, nodes[src.out]) if n is not None]
    after = children.get(unit.name, [])
    consumer = after[0] if len(after) == 1 and after[0].kind == "layer" else None
    anchor = _layer_call(nodes[consumer.anchor]) if consumer is not None else None
    c_in = _data_input(anchor)
    module = analysis.modules.get(anchor.target) if anchor is not None and \
        anchor.op == "call_module" else None
    widenable = (module is not None and c_in is not None
                 and analysis.calls.get(anchor.target) == 1
                 and ConcatJoin.cannot_widen(module) is None)
    base = Span(source=sources[0].name, target=(c_in or nodes[unit.out]).name,
                source_layer=src.name, target_layer=unit.name, layers=inside,
                src_shape=info(sources[0]).shape, dst_shape=info(c_in).shape if c_in else None,
                channel_axis=consumer.channel_axis if consumer else unit.channel_axis,
                consumer=anchor.name if anchor is not None else None,
                consumer_layer=consumer.name if consumer else None)
    if not widenable:
        return replace(base, reason=Reason.CONSUMER)
    best = None
    for x in dict.fromkeys(sources):
        verdict = concat_verdict(analysis, x, c_in, src.channel_axis, consumer.channel_axis)
        span = replace(base, source=x.name, src_shape=info(x).shape, kind=verdict.kind,
                       stride=verdict.stride)
        if verdict.reasons:
            span = replace(span, reason=verdict.reasons[0])
        elif not (config.allows(src.name) and config.allows(unit.name)):
            span = replace(span, reason=Reason.EXCLUDED)
        if best is None or (best.reason is not None and span.reason is None):
            best = span
        if best.reason is None:
            break
    return best


def concat_verdict(analysis: GraphAnalysis, x: fx.Node, c_in: fx.Node, src_axis: int,
                   dst_axis: int) -> PairVerdict:
    """Whether x's features can be concatenated to ``c_in`` (a consumer's input).

    Both tensors of one dtype, x dominating ``c_in``, the same rank and batch
    and layout; channels-first, every spatial dim of x an integer multiple (the
    pooling factor) of ``c_in``'s; features-last, every dim but the last equal.
    """
    a, b = info(x), info(c_in)
    reasons = _end_reasons(a, b, src_axis, dst_axis)
    kind, stride = None, 1
    if Reason.NOT_TENSOR not in reasons:
        fit = concat_fit(a.shape, b.shape, dst_axis)
        if fit is None:
            reasons.append(Reason.SHAPE)
        else:
            kind, stride = "concat", fit
        if a.absmax is not None and not math.isfinite(a.absmax):
            reasons.append(Reason.NON_FINITE)
    if x is c_in or not analysis.dominators.dominates(x, c_in):
        reasons.append(Reason.NOT_DOMINATED)
    return PairVerdict(kind=kind, stride=stride, reasons=tuple(reasons))


def concat_fit(src_shape: tuple[int, ...], dst_shape: tuple[int, ...],
               channel_axis: int) -> int | None:
    """The average-pooling factor that brings x's spatial size to the consumer's, else None."""
    if len(src_shape) != len(dst_shape) or src_shape[0] != dst_shape[0]:
        return None
    if channel_axis == 1 and len(src_shape) >= 3:
        spatial = list(zip(src_shape[2:], dst_shape[2:]))
        factor = spatial[0][0] // spatial[0][1] if spatial[0][1] else 0
        if factor >= 1 and all(d * factor == s for s, d in spatial):
            return factor
        return None
    return 1 if src_shape[:-1] == dst_shape[:-1] else None


def _layer_call(anchor: fx.Node) -> fx.Node:
    """The call of a layer: its anchor, or the module call whose tuple's item 0 it is (LSTM)."""
    call = anchor.args[0] if is_getitem(anchor, 0) else None
    return call if isinstance(call, fx.Node) and call.op == "call_module" else anchor


def _data_input(node: fx.Node | None) -> fx.Node | None:
    """The tensor a layer call reads (its first argument)."""
    if node is None or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    return node.args[0]


def _feeding(analysis: GraphAnalysis, anchor: fx.Node) -> fx.Node | None:
    """The latest tensor that dominates ``anchor``: what feeds a layer, past sizes and Nones."""
    node = analysis.dominators.parent(anchor)
    while node is not None and (info(node).shape is None or info(node).nodata):
        node = analysis.dominators.parent(node)
    return node


def _cost(span: Span) -> tuple[int, int, int]:
    """How much a shortcut costs: a projection over an identity, a stride, then parameters."""
    if span.kind == "identity":
        return (0, 0, 0)
    axis = span.channel_axis
    return (1, int(span.stride > 1), span.src_shape[axis] * span.dst_shape[axis])


def _candidate(analysis: GraphAnalysis, src: fx.Node, dst: fx.Node, src_layer: Layer,
               dst_layer: Layer, inside: tuple[str, ...], config: SkipConfig) -> Span:
    verdict = pair_verdict(analysis, src, dst, src_layer.channel_axis, dst_layer.channel_axis)
    span = Span(source=src.name, target=dst.name, source_layer=src_layer.name,
                target_layer=dst_layer.name, layers=inside, src_shape=info(src).shape,
                dst_shape=info(dst).shape, channel_axis=dst_layer.channel_axis)
    shape_reasons = [r for r in verdict.reasons if r is not Reason.NOT_DOMINATED]
    if shape_reasons:
        return replace(span, reason=shape_reasons[0])
    kind, stride = verdict.kind, verdict.stride
    if kind == "projection" and config.kind is Kind.IDENTITY:
        return replace(span, kind=kind, stride=stride, reason=Reason.NEEDS_PROJECTION)
    if config.kind is Kind.PROJECTION:
        kind = "projection"
    span = replace(span, kind=kind, stride=stride)
    if not (config.allows(src_layer.name) and config.allows(dst_layer.name)):
        return replace(span, reason=Reason.EXCLUDED)
    if verdict.reasons:
        return replace(span, reason=verdict.reasons[0])
    return span


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


def end_name(analysis: GraphAnalysis, node: fx.Node) -> tuple[str, int]:
    """(name, channel axis) of the unit a span end belongs to.

    The unit whose output (or pre-activation value) the node is; otherwise the
    nearest unit above it whose output dominates it (a pooled tensor belongs to
    the layer it pools); otherwise the node's own label, channels last for
    rank <= 2 tensors and at dim 1 for the rest.
    """
    ends = analysis.unit_ends
    walk = node
    while walk is not None:
        unit = ends.get(walk.name)
        if unit is not None:
            return unit.name, unit.channel_axis
        walk = analysis.dominators.parent(walk)
    shape = info(node).shape
    return node_label(node), (-1 if shape is None or len(shape) <= 2 else 1)


def units_between(analysis: GraphAnalysis, src: fx.Node, dst: fx.Node) -> list[Layer]:
    """The units whose anchor lies on a path from ``src`` to ``dst`` (``src`` excluded)."""
    dom = analysis.dominators
    seen: set[fx.Node] = set()
    stack = [dst]
    while stack:
        n = stack.pop()
        if n is src or n in seen or not dom.dominates(src, n):
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    at = analysis.units_at  # only the nodes the span covers: linear in the graph overall
    return [u for _, u in sorted(iu for n in seen for iu in at.get(n.name, ()))]


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


def _overflows(a, kind: str, axis: int) -> bool:
    """Whether S(x) may not be finite: x itself is not, or a projection's sum may overflow.

    A 1x1 projection at PyTorch's default init has |w| <= 1/sqrt(C_in), so each
    output is at most sqrt(C_in) * max|x|; past the dtype's largest value it can
    be infinite (float16 activations of ~6e4 already are).
    """
    if a.absmax is None:
        return False
    if not math.isfinite(a.absmax):
        return True
    if kind == "identity":
        return False
    channels = a.shape[axis] if a.shape else 1
    return a.absmax * math.sqrt(channels) > torch.finfo(a.dtype).max


def _layout(channel_axis: int, shape: tuple[int, ...]) -> str:
    """'first' or 'last': where a unit keeps channels (the same thing for [B, F] tensors)."""
    rank = len(shape)
    return "last" if rank <= 2 or channel_axis in (-1, rank - 1) else "first"


def _squeezed(shape: tuple[int, ...]) -> bool:
    """A channels-first tensor with every spatial dim 1, as a squeeze-excitation gate makes."""
    return len(shape) >= 3 and all(d == 1 for d in shape[2:])
