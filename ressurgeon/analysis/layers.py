"""The layer tree of a traced graph, computed once per graph and passed forward.

Analysis only: nothing here touches weights or edits the graph.

The graph is grouped into *layers* (a weighted op from the registry, the norms
that follow it, then its activation). Merges of branches (``blocks.py``) are
units of the tree too. A unit's parent is the nearest unit whose output
dominates its anchor, so a span between a unit and an ancestor is always a
single-entry region of the graph.

``analyze_graph`` returns a ``GraphAnalysis`` holding all of it (the layers,
blocks, residuals, dominator tree, parents, heads, the node and module
tables); span selection, plan checking, the rewrite and the reports all read
the same object.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property

import torch.nn as nn
from torch import fx

from .._fx import call_counts, node_label, node_order, op_name, shape_of
from ..registry import Role, is_getitem, op_info, role_of
from ..shortcuts import exported_shortcut_path
from .blocks import Residual, find_merges
from .dominators import DominatorTree


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

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GraphAnalysis:
    """Everything the passes learn about one traced graph, computed once by ``analyze_graph``.

    ``layers`` are the weighted layers, ``blocks`` the merges of branches (kind
    "block" or "residual"), ``units`` both in graph order: the layer tree's
    nodes; ``parents`` maps a unit's name to its parent unit, ``heads`` names
    the output layers. ``nodes`` and ``modules`` are the graph's name tables.
    """

    gm: fx.GraphModule
    layers: list[Layer]
    dominators: DominatorTree
    nodes: dict[str, fx.Node]
    modules: dict[str, nn.Module]
    blocks: list[Layer] = field(default_factory=list)
    residuals: list[Residual] = field(default_factory=list)
    units: list[Layer] = field(default_factory=list)
    parents: dict[str, Layer] = field(default_factory=dict)
    heads: set[str] = field(default_factory=set)

    @cached_property
    def calls(self) -> dict[str, int]:
        """How many call sites each submodule has."""
        return call_counts(self.gm)

    @cached_property
    def unit_anchors(self) -> dict[str, Layer]:
        """Node name -> the unit anchored there (its weighted op, or a block's merge)."""
        return {u.anchor: u for u in self.units}

    @cached_property
    def units_at(self) -> dict[str, list[tuple[int, Layer]]]:
        """Node name -> (position in ``units``, unit) for every unit anchored there."""
        found: dict[str, list[tuple[int, Layer]]] = {}
        for i, u in enumerate(self.units):
            found.setdefault(u.anchor, []).append((i, u))
        return found

    @cached_property
    def unit_ends(self) -> dict[str, Layer]:
        """Node name -> the unit whose output (or pre-activation value) it is."""
        return {u.out: u for u in self.units} | {u.pre_act: u for u in self.units}


def find_layers(gm: fx.GraphModule, modules: dict[str, nn.Module] | None = None) -> list[Layer]:
    """Group the traced graph into layers, in graph order.

    Args:
        gm: a GraphModule from ``trace_model`` (shapes in node.meta).
        modules: ``dict(gm.named_modules())`` when the caller has it already.

    Returns:
        One Layer per weighted op (projections inside our own shortcuts excluded).
    """
    modules = modules if modules is not None else dict(gm.named_modules())
    layers: list[Layer] = []
    seen: dict[str, int] = {}
    for node in gm.graph.nodes:
        info = op_info(node, modules)
        if info is None or info.role is not Role.LAYER:
            continue
        if exported_shortcut_path(node) is not None:
            continue  # a projection of ours, inlined by torch.export: part of a shortcut
        anchor = node
        if shape_of(node) is None:  # e.g. MultiheadAttention returns (out, weights)
            firsts = [u for u in node.users if is_getitem(u, 0)]
            if len(firsts) != 1 or shape_of(firsts[0]) is None:
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
    while nxt is not None and role_of(nxt, modules) is Role.NORM and shape_of(nxt) is not None:
        pre_act, has_norm = nxt, True
        nxt = _single_user(pre_act)
    out = pre_act
    if nxt is not None and role_of(nxt, modules) is Role.ACTIVATION and shape_of(nxt) is not None:
        out = nxt
    return pre_act, out, has_norm


def analyze_graph(gm: fx.GraphModule) -> GraphAnalysis:
    """Layers, blocks, residuals, dominators, parents and heads of a traced graph.

    Args:
        gm: a GraphModule from ``trace_model`` (shapes in node.meta).

    Returns:
        A GraphAnalysis; pass it to ``select_spans`` and ``apply_plan`` instead of
        letting each compute it again.
    """
    modules = dict(gm.named_modules())
    layers = find_layers(gm, modules)
    dom = DominatorTree(gm.graph, modules)
    nodes = {n.name: n for n in gm.graph.nodes}
    merges = find_merges(gm, layers, dom, modules)
    blocks = []
    for merge in merges:
        pre_act, out, has_norm = _tail(nodes[merge.node], modules)
        blocks.append(Layer(name=merge.name, op=merge.op, anchor=merge.node,
                            pre_act=pre_act.name, out=out.name,
                            channel_axis=merge.channel_axis, has_norm=has_norm,
                            kind="residual" if merge.residual else "block",
                            covers=merge.covers))
    order = node_order(gm.graph)
    units = sorted(layers + blocks, key=lambda u: order[nodes[u.anchor]])
    analysis = GraphAnalysis(gm=gm, layers=layers, dominators=dom, nodes=nodes, modules=modules,
                             blocks=blocks, units=units,
                             residuals=[m.residual for m in merges if m.residual is not None])
    analysis.parents = _layer_parents(analysis)
    analysis.heads = _head_layers(analysis)
    return analysis


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


def _layer_parents(analysis: GraphAnalysis) -> dict[str, Layer]:
    """Each unit's nearest unit (layer or block) whose output dominates its anchor."""
    by_out = {u.out: u for u in analysis.units}
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
    for unit in analysis.units:
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


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None
