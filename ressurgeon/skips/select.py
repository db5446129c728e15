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

from dataclasses import dataclass, replace

from torch import fx

from .._fx import info, node_label
from ..analysis.blocks import Residual
from ..analysis.layers import GraphAnalysis, Layer, analyze_graph, find_layers, find_residuals
from ..catalog import join_class, pattern_class
from ..config import Kind, Placement, SkipConfig
from ..verdicts import (OVERRIDABLE, PairVerdict, Reason, Span, data_input, end_reasons,
                        feeding, join_kind, pair_verdict)

__all__ = ["Reason", "Span", "PairVerdict", "pair_verdict", "select_spans", "chain_spans", "join_kind", "Chooser",
           "judge_pair",
           "mark_planned", "end_name", "units_between",
           # the layer tree's names, documented here before analysis/ existed
           "Layer", "GraphAnalysis", "analyze_graph", "find_layers", "find_residuals", "Residual"]














def select_spans(graph: fx.GraphModule | GraphAnalysis, config: SkipConfig) -> list[Span]:
    """Every candidate span of a traced graph, each chosen or rejected with a reason.

    The config's pattern (``ressurgeon.catalog.PATTERNS``) proposes the pairs;
    its join judges each pair.

    Args:
        graph: the ``analyze_graph`` result (preferred: computed once and passed
            on), or a GraphModule from ``trace_model`` (analysed here).
        config: pattern, join, span length, kind, placement, include/exclude, max_skips.

    Returns:
        Candidates in graph order of their targets; ``span.chosen`` marks the choice.

    Example:
        >>> spans = select_spans(analyze_graph(trace_model(model, inputs)), SkipConfig())  # doctest: +SKIP
    """
    analysis = graph if isinstance(graph, GraphAnalysis) else analyze_graph(graph)
    return pattern_class(config.pattern).select(analysis, config)


def chain_spans(analysis: GraphAnalysis, config: SkipConfig) -> list[Span]:
    """The chain pattern: spans of ``config.span`` units along the layer tree, tiled."""
    nodes, parents = analysis.nodes, analysis.parents
    join = join_class(config.join)
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
    total = sum(p.numel() for p in analysis.gm.parameters()) + sum(
        b.numel() for b in analysis.gm.buffers() if b.is_floating_point())
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
        span = join.candidate(Chooser(analysis, src, path[-2], nodes[target], unit, inside,
                                      children, config))
        met = next((owner[n] for unit_name in inside for n in covers[unit_name] if n in owner),
                   None)
        if unit.name in analysis.heads:  # says more than the shape mismatch a head usually has
            span = replace(span, reason=Reason.HEAD)
        elif met is not None:
            span = replace(span, reason=Reason.EXISTING, residual=met)
        elif span.reason is None and _too_large(span, config, total):
            span = replace(span, reason=Reason.LARGE_PROJECTION)
        candidates.append((depth[unit.name], span, covered))
    offsets = range(min(config.span, max(depth.values(), default=0) + 1))
    # Tiling can start at any of `span` depths; keep the one that places the most
    # shortcuts, then the most identities, then the fewest parameters.
    tilings = [_tile(candidates, config, offset) for offset in offsets]
    return max(tilings, key=_tiling_score) if tilings else []


@dataclass(frozen=True)
class Chooser:
    """What a join's ``candidate`` hook sees of one unit of the layer tree.

    ``src`` is the layer ``span`` units above ``unit``, ``first`` the first layer
    inside the span, ``dst`` the node the sum would replace (the unit's output or
    pre-activation value), ``inside`` the names of the units the span covers.
    """

    analysis: GraphAnalysis
    src: Layer
    first: Layer
    dst: fx.Node
    unit: Layer
    inside: tuple[str, ...]
    children: dict
    config: SkipConfig

    def best_source(self, join) -> Span:
        """The span from where a designer would read its input, else from the source layer's output.

        A designer reads the tensor that feeds the span's first layer, after the
        pooling, flattening or dropout between the two layers (ResNet reads its first
        block's input after the stem's max-pool): that tensor is taken when it joins
        the target at no greater cost (an identity, or an unstrided or smaller
        projection) than the source layer's own output, or when only it joins.
        """
        analysis, src = self.analysis, self.src
        early = self.pair(join, analysis.nodes[src.out])
        feed = feeding(analysis, analysis.nodes[self.first.anchor])
        if feed is None or feed is analysis.nodes[src.out]:
            return early
        late = self.pair(join, feed)
        if late.reason is None and (early.reason is not None or _cost(late) <= _cost(early)):
            return late
        return early

    def pair(self, join, x: fx.Node) -> Span:
        """The span from ``x`` to ``dst``, with the join's verdict and the config's rules."""
        return judge_pair(self.analysis, join, x, self.dst, self.src, self.unit, self.inside,
                          self.config)












def _cost(span: Span) -> tuple[int, int, int]:
    """How much a shortcut costs: a projection over an identity, a stride, then parameters."""
    if span.kind == "identity":
        return (0, 0, 0)
    axis = span.channel_axis
    return (1, int(span.stride > 1), span.src_shape[axis] * span.dst_shape[axis])


#: projections smaller than this are never skipped for their share (a toy model's 16x24)
LARGE_PROJECTION_FLOOR = 2 ** 20


def _too_large(span: Span, config: SkipConfig, total: int) -> bool:
    """A projection of 1M+ parameters over ``config.max_projection_share`` of the model's."""
    if span.kind != "projection" or config.max_projection_share is None or not total:
        return False
    params = _cost(span)[2]
    return params >= LARGE_PROJECTION_FLOOR and params > config.max_projection_share * total


def judge_pair(analysis: GraphAnalysis, join, src: fx.Node, dst: fx.Node, src_layer: Layer,
               dst_layer: Layer, inside: tuple[str, ...], config: SkipConfig) -> Span:
    """The span from ``src`` to ``dst``: the join's verdict, then the config's kind and globs.

    ``src_layer``/``dst_layer`` need only ``name`` and ``channel_axis``.
    """
    verdict = join.verdict(analysis, src, dst, src_layer.channel_axis, dst_layer.channel_axis)
    span = Span(source=src.name, target=dst.name, source_layer=src_layer.name,
                target_layer=dst_layer.name, layers=inside, src_shape=info(src).shape,
                dst_shape=info(dst).shape, channel_axis=dst_layer.channel_axis)
    shape_reasons = [r for r in verdict.reasons if r is not Reason.NOT_DOMINATED]
    if shape_reasons:
        return replace(span, reason=shape_reasons[0])
    kind, stride = verdict.kind, verdict.stride
    if kind == "projection" and config.kind is Kind.IDENTITY:
        return replace(span, kind=kind, stride=stride, reason=Reason.NEEDS_PROJECTION)
    if config.kind is Kind.PROJECTION and kind == "identity":  # a concat keeps its kind
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








