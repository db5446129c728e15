"""Graph helpers the shortcut classes share: a shortcut's place in a graph, projections."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn
from torch import fx

from .._fx import attr
from ..registry import lookup


@dataclass(frozen=True)
class ShortcutSite:
    """One shortcut in a graph: its module, the node whose value is the sum, and its operands.

    ``inlined`` holds the plain ops torch.export made of it (empty for a module
    call); ``module`` is then rebuilt from them, sharing the graph's tensors.
    """

    path: str
    module: nn.Module
    node: fx.Node
    h: fx.Node
    x: fx.Node
    inlined: tuple[fx.Node, ...] = field(default=())


def group_ends(nodes: list[fx.Node]) -> tuple[fx.Node, list[fx.Node]] | None:
    """(the one node read outside the group, the two tensors it reads from outside), else None.

    What every join torch.export inlined looks like from outside: two inputs (h
    and x, in some order) and one output.
    """
    inside = set(nodes)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    externals = _external_inputs(nodes)
    if len(outputs) != 1 or len(externals) != 2:
        return None
    return outputs[0], externals


def _external_inputs(nodes: list[fx.Node]) -> list[fx.Node]:
    """Tensors a group of nodes reads from outside the group (parameters excluded)."""
    inside = set(nodes)
    found: dict[fx.Node, None] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a.op != "get_attr":
                found[a] = None
    return list(found)


def _projection_from_graph(gm: fx.GraphModule, node: fx.Node | None) -> nn.Module | None:
    """The 1x1 conv or Linear module an inlined projection call computes, sharing its weight."""
    if node is None:
        return None
    weight = attr(gm, node.args[1].target)
    info = lookup(node.target)
    if info.spatial_dims == 0:
        module: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    else:
        stride = node.args[3] if len(node.args) > 3 else 1
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[info.spatial_dims]
        module = conv(weight.shape[1], weight.shape[0], kernel_size=1, stride=stride, bias=False)
    module.weight = weight
    return module


def build_projection(src_shape: tuple[int, ...], dst_shape: tuple[int, ...],
                     channel_axis: int, stride: int) -> nn.Module:
    """A 1x1 projection that maps a tensor of src_shape onto dst_shape.

    Channels-first tensors of rank 3-5 get a (strided) 1x1 ConvNd, as in ResNet's
    option B; features-last tensors (and rank-2 [B, F]) get a Linear on the last dim.
    """
    rank = len(src_shape)
    if channel_axis == 1 and rank >= 3:
        conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[rank]
        return conv(src_shape[1], dst_shape[1], kernel_size=1, stride=stride, bias=False)
    if stride != 1:
        raise ValueError("a features-last projection cannot change spatial size")
    return nn.Linear(src_shape[-1], dst_shape[-1], bias=False)


def projection_module(gm: fx.GraphModule, node: fx.Node | None) -> nn.Module | None:
    """The public name of the inlined-projection rebuild (shared by every join class)."""
    return _projection_from_graph(gm, node)
