"""The highway join (Srivastava et al. 2015): a learned gate decides how much of x is carried.

``T = sigmoid(W_T x + b_T)`` per channel and position, from a 1x1 convolution
(a Linear for features-last tensors) of the span's input; ``S`` the identity
or a projection, as for addition.

- ``standard``: ``T*h + (1-T)*S(x)``, the plain highway layer; ``b_T`` starts
  at ``CARRY_BIAS`` (-2) so that early in training the layer mostly carries,
  as the paper advises.
- ``preserve``: ``h + g*(1-T)*(S(x) - h)`` with a per-channel ``g = 0``: exactly
  ``h`` at insertion, and ``g`` gets the gradient ``(1-T)(S(x)-h)`` on the
  first step (a zero gate on the carry term alone would give ``T*h``, not h).
  At ``g = 1`` it is the standard highway.
- ``rezero``: ``S(x) + g*T*(h - S(x))`` with ``g = 0``: the span starts as its
  shortcut; at ``g = 1`` the standard highway again.

The join is not a sum of fixed terms (``T`` depends on x), so fold removes a
highway only when ``g`` is still exactly zero and keeps it otherwise.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import fx

from .._fx import attr
from ..catalog import JOINS
from ..config import Init
from ..errors import ConfigError
from ..registry import Trait, lookup
from ._graph import ShortcutSite, _projection_from_graph, group_ends
from .base import JoinModule, fit_spatial, gated, strided

CARRY_BIAS = -2.0



class HighwayShortcut(JoinModule):
    """Joins ``h`` and ``S(x)`` through a transform gate ``T = sigmoid(transform(x))``.

    Args:
        init: "preserve", "standard" or "rezero" (see the module docstring).
        proj: S (None for the identity), as for an addition shortcut.
        transform: the 1x1 conv (channels-first) or Linear (features-last) computing
            the gate's logits from x; its bias is set to ``CARRY_BIAS``.
        channel_axis: where h keeps its channels (1 or -1): the per-channel ``g`` lives there.

    Example:
        >>> hw = HighwayShortcut("preserve", None, nn.Linear(3, 3), channel_axis=-1)
        >>> h, x = torch.ones(2, 3), torch.full((2, 3), 5.0)
        >>> torch.equal(hw(h, x), h)
        True
    """

    join_name = "highway"
    kept_reason = ("a highway's transform gate depends on its input "
                   "(T = sigmoid(W_T x + b_T)): no exact fold")

    def __init__(self, init: str | Init, proj: nn.Module | None, transform: nn.Module,
                 channel_axis: int):
        super().__init__()
        self.init = Init(init)
        if self.init.value not in JOINS[self.join_name].formulas:
            raise ConfigError(f"init {self.init.value} has no highway form; use preserve, "
                              "standard or rezero")
        self.proj = proj if proj is not None else nn.Identity()
        self.transform = transform
        self.channel_axis = channel_axis
        with torch.no_grad():
            if getattr(transform, "bias", None) is not None:
                transform.bias.fill_(CARRY_BIAS)
        channels = transform.weight.shape[0]
        if self.init is Init.STANDARD:
            self.register_parameter("gate", None)
        else:
            self.gate = nn.Parameter(torch.zeros(channels, dtype=transform.weight.dtype,
                                                 device=transform.weight.device))

    def reduces_to(self) -> str | None:
        """What the join computes while its gate is exactly 0: "h", "x" (S(x)), or None."""
        if self.gate is None or bool(self.gate.detach().ne(0).any()):
            return None
        return "h" if self.init is Init.PRESERVE else "x"

    def _per_channel(self, g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.channel_axis == 1 and like.dim() > 2:
            return g.view(1, -1, *([1] * (like.dim() - 2)))
        return g

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s = self.proj(x)
        t = torch.sigmoid(self.transform(x))
        if strided(self.transform):  # odd sizes: ceil(H/s) cropped to the span's size
            s, t = fit_spatial(s, h), fit_spatial(t, h)
        if self.init is Init.STANDARD:
            return t * h + (1 - t) * s
        g = self._per_channel(self.gate, h)
        if self.init is Init.PRESERVE:  # g = 0: exactly h, even where s is inf (0 * inf)
            return h + gated(g, (1 - t) * (s - h))
        return s + gated(g, t * (h - s))

    def extra_repr(self) -> str:
        return f"init={self.init.value!r}, channel_axis={self.channel_axis}"

    def constructor_args(self) -> tuple[tuple, dict]:
        return (self.init.value, self.proj, self.transform, self.channel_axis), {}

    @classmethod
    def build(cls, init: Init, planned, src_info, dst_info) -> "HighwayShortcut":
        """A highway from x to h (a strided 1x1 conv when needed) for one planned skip."""
        proj = cls.projection(planned, src_info, dst_info)
        src_shape, dst_shape = src_info.shape, dst_info.shape
        channel_axis, stride = planned.channel_axis, planned.stride
        rank = len(src_shape)
        if channel_axis == 1 and rank >= 3:
            conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[rank]
            transform: nn.Module = conv(src_shape[1], dst_shape[1], 1, stride=stride)
        else:
            transform = nn.Linear(src_shape[-1], dst_shape[-1])
        return cls(init, proj, transform, 1 if channel_axis == 1 and rank >= 3 else -1)

    @classmethod
    def from_inlined(cls, gm: fx.GraphModule, path: str,
                     nodes: list[fx.Node]) -> ShortcutSite | None:
        """Rebuild a highway torch.export inlined, sharing the graph's tensors.

        x is what the transform reads; h the other input. No gate: standard; a
        ``1 - T`` in the group: preserve; otherwise rezero.
        """
        ends = group_ends(nodes)
        if ends is None:
            return None
        out, externals = ends
        transform = proj = gate = None
        for node in nodes:
            if node.op == "get_attr" and str(node.target) == f"{path}.gate":
                gate = node
            info = lookup(node.target) if node.op == "call_function" else None
            if info is not None and Trait.LIFTABLE in info.traits and len(node.args) > 1 \
                    and isinstance(node.args[1], fx.Node):
                weight = str(node.args[1].target)
                if weight == f"{path}.transform.weight":
                    transform = node
                elif weight == f"{path}.proj.weight":
                    proj = node
        if transform is None or transform.args[0] not in externals:
            return None
        x = transform.args[0]
        h = next(e for e in externals if e is not x)
        if gate is None:
            init = Init.STANDARD
        elif any(_is_one_minus(n) for n in nodes):
            init = Init.PRESERVE
        else:
            init = Init.REZERO
        weight = attr(gm, transform.args[1].target)
        bias_node = transform.args[2] if len(transform.args) > 2 else None
        info = lookup(transform.target)
        if info.spatial_dims == 0:
            module: nn.Module = nn.Linear(weight.shape[1], weight.shape[0])
        else:
            stride = transform.args[3] if len(transform.args) > 3 else 1
            conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[info.spatial_dims]
            module = conv(weight.shape[1], weight.shape[0], 1, stride=stride)
        site = cls(init, _projection_from_graph(gm, proj), module,
                   1 if info.spatial_dims else -1)
        module.weight = weight
        if isinstance(bias_node, fx.Node):
            module.bias = attr(gm, bias_node.target)
        if gate is not None:
            site.gate = attr(gm, gate.target)
        return ShortcutSite(path=path, module=site, node=out, h=h, x=x,
                            inlined=tuple(nodes))


def _is_one_minus(node: fx.Node) -> bool:
    """``1 - t`` as torch.export writes it (rsub, or sub with the scalar 1 first)."""
    name = getattr(node.target, "__name__", str(node.target))
    if "rsub" in name:
        return True
    return "sub" in name and bool(node.args) and node.args[0] == 1
