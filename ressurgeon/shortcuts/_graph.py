"""Graph helpers the shortcut classes share: a shortcut's place in a graph, projections."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
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


class Fit(nn.Module):
    """``x`` cropped or zero-padded at the end of each spatial dim to ``ref``'s size.

    What a long skip across a downsampling and an upsampling needs at sizes the
    pooling does not divide (U-Net crops the encoder's map): a 15-wide encoder
    tensor meets a 14-wide decoder tensor (15 -> 7 -> 14), of which it keeps
    the first 14 columns, the ones a floor-rounding downsampling covered; a
    decoder tensor wider than the encoder's (ceil-mode pooling) gets zeros at
    the end. The decoder's size, and so the model's output, never changes; at
    the size the pair was matched with it is the identity. One ``F.pad`` with
    negative amounts where it crops: no branch on sizes, so exporters keep
    symbolic dims symbolic.

    Example:
        >>> Fit(channel_axis=1, spatial_dims=2)(torch.ones(1, 2, 15, 15),
        ...                                     torch.ones(1, 5, 14, 16)).shape
        torch.Size([1, 2, 14, 16])
    """

    def __init__(self, channel_axis: int, spatial_dims: int):
        super().__init__()
        self.channel_axis = channel_axis
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        first = 2 if self.channel_axis == 1 else 1  # [B, C, *S] or [B, *S, C]
        pad: list = []
        for dim in reversed(range(first, first + self.spatial_dims)):  # F.pad: last dim first
            pad += [0, ref.shape[dim] - x.shape[dim]]
        if self.channel_axis != 1:
            pad = [0, 0] + pad  # channels-last: the last dim keeps its size
        return F.pad(x, pad)

    def extra_repr(self) -> str:
        return f"channel_axis={self.channel_axis}, spatial_dims={self.spatial_dims}"

    def constructor_args(self) -> tuple[tuple, dict]:
        """What ``save_code`` passes to the constructor to rebuild this module."""
        return (self.channel_axis, self.spatial_dims), {}
