"""Merges of branches: blocks (towers joined by cat/add/mul/matmul) and existing residuals.

Analysis only, like ``spans``. A *merge* is a node that reads two or more
input-dependent tensors. Its immediate dominator ``d`` is where its branches
fork, and its *region* is every node between ``d`` and the merge. A merge
whose region holds a weighted layer is a *block* (an Inception module, a
squeeze-excitation gate, an attention score): the layer tree treats it as one
unit, so a span that crosses it counts it once and never cuts one tower.

A block is an *existing residual* when it is an add or a concat and one of
its branches reaches it past fewer weighted layers than another: either no
layer at all (``x + F(x)``, DenseNet's ``cat([x, F(x)])``, a pooled pass-through)
or a shorter projection (ResNet's downsample). The pass reports these and
never adds a shortcut inside or parallel to one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import fx

from .._fx import node_label, node_order, shape_of, stack_path
from ..registry import Role, Trait, has_trait, is_getitem, op_info
from ..shortcuts import is_shortcut
from .dominators import DominatorTree


@dataclass(frozen=True)
class Residual:
    """An existing shortcut found in the model: ``target`` joins ``source`` and a branch of layers.

    Example:
        >>> [(r.name, r.kind) for r in find_residuals(trace_model(resnet, x))]  # doctest: +SKIP
        [('layer1.0.add', 'identity'), ('layer2.0.add_1', 'projection')]
    """

    name: str                    # the merge's module path and node name, e.g. "layer1.0.add"
    source: str                  # node where the branches fork (the merge's dominator)
    target: str                  # the merge node: the add or the cat
    op: str                      # "add" or "cat"
    kind: str                    # "identity": a branch without any layer; "projection": a shorter one
    layers: tuple[str, ...]      # layers on the branches, inside the residual
    shape: tuple[int, ...] | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Merge:
    """A block: a merge node whose region holds layers (``residual`` says whether it is one)."""

    name: str
    node: str
    op: str
    covers: tuple[str, ...]      # layer and block names inside the region
    channel_axis: int
    residual: Residual | None


def find_merges(gm: fx.GraphModule, layers, dom: DominatorTree,
                modules: dict[str, torch.nn.Module]) -> list[Merge]:
    """Every block of a traced graph in graph order, nested blocks first.

    Args:
        gm: traced graph with shapes in node.meta.
        layers: ``find_layers(gm)``; their anchors mark the weighted nodes.
        dom: the graph's DominatorTree.
        modules: ``dict(gm.named_modules())``, computed once by the caller.

    Returns:
        One Merge per merge node whose region holds a layer.
    """
    unit_at: dict[fx.Node, str] = {}          # weighted node or merge node -> unit name
    axis_at: dict[fx.Node, int] = {}
    nodes = {n.name: n for n in gm.graph.nodes}
    for lay in layers:
        anchor = nodes[lay.anchor]
        # a tuple-returning layer (attention) is anchored at its getitem: map the call too
        for n in (anchor, *(anchor.all_input_nodes if is_getitem(anchor) else ())):
            unit_at[n] = lay.name
            axis_at[n] = lay.channel_axis
    for node in gm.graph.nodes:
        # Opaque calls that own weights (a torch.fx.wrap'd attention, a custom leaf
        # module) are no layers of ours, but a branch through one is not weight-free.
        if node not in unit_at and _opaque_weighted(node, gm, modules):
            unit_at[node] = node_label(node)
            axis_at[node] = -1
    order = node_order(gm.graph)
    merges: list[Merge] = []
    merge_nodes: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if (node.op not in ("call_function", "call_method", "call_module") or node in unit_at
                or _is_layer_op(node, modules) or has_trait(node, modules, Trait.STATES)):
            continue  # a stack's h_n reads every layer's state, but joins no activations
        # tensors only: sizes read off a tensor (``x.reshape(b, n, c)``) join no branches
        preds = list(dict.fromkeys(a for a in node.all_input_nodes
                                   if a in dom and shape_of(a) is not None))
        if len(preds) < 2 or shape_of(node) is None:
            continue
        fork = dom.parent(node)
        region = _region(node, fork, dom)
        inner = sorted((n for n in region if n in unit_at), key=order.__getitem__)
        weighted = [n for n in inner if n not in merge_nodes]
        if not weighted:
            continue
        depth = _layer_depths(region, fork, unit_at, order)
        branch = [0 if p is fork else depth[p] for p in preds]
        op = _merge_op(node, modules)
        residual = None
        # An add is a residual when one branch is shorter (identity or projection
        # shortcut); a concat only when one branch has no layer at all (a dense
        # connection): Inception's towers of different depths are no shortcut.
        if (op == "add" and min(branch) < max(branch)) or (op == "cat" and min(branch) == 0):
            residual = Residual(
                name="", source=fork.name if fork is not None else "", target=node.name, op=op,
                kind="identity" if min(branch) == 0 else "projection",
                layers=tuple(dict.fromkeys(unit_at[n] for n in weighted)), shape=shape_of(node))
        name = _merge_name(node)
        if residual is not None:
            residual = replace(residual, name=name)
        merge = Merge(name=name, node=node.name, op=op,
                      covers=tuple(dict.fromkeys(unit_at[n] for n in inner)),
                      channel_axis=axis_at[weighted[-1]], residual=residual)
        merges.append(merge)
        merge_nodes.add(node)
        unit_at[node] = name
        axis_at[node] = merge.channel_axis
    return merges


def _region(merge: fx.Node, fork: fx.Node | None, dom: DominatorTree) -> set[fx.Node]:
    """Nodes on a data path from ``fork`` to ``merge``, both excluded (fork None: the inputs).

    Only the edges the dominator tree follows: a size read off a tensor above the
    fork (``x.reshape(b, n, c)``) must not pull the graph above it into the region.
    """
    seen: set[fx.Node] = set()
    stack = list(_data_inputs(merge, dom))
    while stack:
        n = stack.pop()
        if n is fork or n in seen:
            continue
        seen.add(n)
        stack.extend(_data_inputs(n, dom))
    return seen


def _data_inputs(node: fx.Node, dom: DominatorTree) -> list[fx.Node]:
    return dom.data_inputs(node)


def _layer_depths(region: set[fx.Node], fork, unit_at, order) -> dict[fx.Node, int]:
    """Most weighted layers on any path from the fork to each region node (itself included)."""
    depth: dict[fx.Node, int] = {}
    for n in sorted(region, key=order.__getitem__):
        above = max((depth[a] for a in n.all_input_nodes if a in depth), default=0)
        depth[n] = above + (1 if n in unit_at else 0)
    return depth


def _merge_op(node: fx.Node, modules) -> str:
    target = node.target
    if node.op == "call_module":
        module = modules[target]
        # our own shortcut is a sum too: a second pass must see the first one's work
        if is_shortcut(module):  # "add" for addition and highway joins, "cat" for concat
            return "cat" if getattr(module, "join", "add") == "concat" else "add"
        return type(module).__name__
    info = op_info(node, modules)
    if info is not None and Trait.ADD in info.traits:
        return "add"
    if info is not None and Trait.CAT in info.traits:
        return "cat"
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return getattr(target, "__name__", str(target))


def _merge_name(node: fx.Node) -> str:
    path = stack_path(node)
    return f"{path}.{node.name}" if path else node.name


def _opaque_weighted(node: fx.Node, gm: fx.GraphModule, modules) -> bool:
    """A call outside the registry that reads a weight matrix (a parameter of rank >= 2)."""
    if node.op == "call_module":
        module = modules.get(node.target)
        return (module is not None and not is_shortcut(module)
                and op_info(node, modules) is None
                and any(p.dim() >= 2 for p in module.parameters()))
    if node.op not in ("call_function", "call_method") or op_info(node, modules) is not None:
        return False
    if not any(a.op != "get_attr" and shape_of(a) is not None for a in node.all_input_nodes):
        return False  # no activation goes in (e.g. ``self.cls_token.expand(batch, -1, -1)``)
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            try:
                value = gm.get_parameter(str(arg.target))
            except AttributeError:
                continue
            if value.dim() >= 2:
                return True
    return False


def _is_layer_op(node: fx.Node, modules) -> bool:
    info = op_info(node, modules)
    return info is not None and info.role is Role.LAYER
