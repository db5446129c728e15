"""The concatenation join (DenseNet, Huang et al. 2017): x's features feed the next layer too.

The span's source features ``x`` are concatenated, along the channel axis, to
the input ``c`` of the next weighted layer after the span (the *consumer*),
and that layer is widened to accept them: ``W [c; pool(x)]``. Spatial sizes
that differ by an integer factor are brought to the consumer's size by average
pooling, as DenseNet's transition layers do.

- ``preserve``: the widened weights for the new channels start at zero, so the
  output is exactly unchanged (no gate, no approximation), while those weights
  get a non-zero gradient on the first step (their input is not zero);
- ``standard``: PyTorch's default init for them (training from scratch).

``ConcatJoin`` computes the concatenation; the new weights live in the
consumer, which stays a plain Conv/Linear at its own path. fold narrows the
consumer back when its new weights are all still zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import fx

from .._fx import plain_instance, shape_or_val
from ..config import Init, Join
from ..errors import ConfigError
from .. import recurrent
from ..registry import Trait, lookup
from ._graph import ShortcutSite, group_ends

_POOLS = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
WIDENABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class ConcatJoin(nn.Module):
    """``cat([c, pool(x)], dim=channel_axis)``: what the consumer of a DenseNet-style join reads.

    Args:
        init: "preserve" or "standard" (how the consumer's new weights started;
            None when unknown, e.g. read back from an archive).
        channel_axis: 1 for channels-first tensors, -1 for features-last ones.
        stride: the average-pooling factor bringing x to c's spatial size (1: none).
        spatial_dims: 1-3 for channels-first tensors (the pooling's kind), 0 otherwise.

    Example:
        >>> join = ConcatJoin("preserve", channel_axis=1)
        >>> join(torch.ones(2, 3, 4, 4), torch.zeros(2, 5, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
    """

    join = Join.CONCAT
    kind = "concat"

    def __init__(self, init: str | Init | None, channel_axis: int, stride: int = 1,
                 spatial_dims: int = 0):
        super().__init__()
        self.init = None if init is None else Init(init)
        if self.init is not None and self.init not in (Init.PRESERVE, Init.STANDARD):
            raise ConfigError(f"init {self.init.value} has no concat form; use preserve "
                              "(zero weights, exact) or standard")
        self.channel_axis = channel_axis
        self.stride = stride
        self.pool = (_POOLS[spatial_dims](stride, stride) if stride > 1 and spatial_dims
                     else nn.Identity())
        self.register_parameter("gate", None)

    @property
    def formula(self) -> str:
        return "W [h; pool(x)]: x's features join the next layer's input (new weights from 0)"

    def terms(self):
        """None: a concatenation is no sum of terms (fold narrows the consumer instead)."""
        return None

    def forward(self, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([c, self.pool(x)], dim=self.channel_axis)

    def extra_repr(self) -> str:
        init = self.init.value if self.init else "unknown"
        return f"init={init!r}, channel_axis={self.channel_axis}, stride={self.stride}"

    @staticmethod
    def widen(consumer: nn.Module, extra: int, init: Init) -> nn.Module:
        """A copy of ``consumer`` that also reads ``extra`` appended input channels.

        A single-layer LSTM/GRU/RNN widens its input weights (``recurrent.widen``).

        preserve: their weights are zero (the output is exactly the consumer's);
        standard: PyTorch's default init for a layer of the new width.

        Raises:
            ConfigError: the consumer cannot be widened (see ``can_widen``).
        """
        if isinstance(consumer, recurrent.RECURRENT):  # weight_ih_l0 (both directions) widens
            return recurrent.widen(consumer, extra, init)
        why = ConcatJoin.cannot_widen(consumer)
        if why:
            raise ConfigError(f"cannot widen {type(consumer).__name__}: {why}")
        weight = consumer.weight
        shape = list(weight.shape)
        shape[1] += extra
        new = torch.empty(shape, dtype=weight.dtype, device=weight.device)
        if init is Init.PRESERVE:
            new.zero_()
        else:  # the bound nn.Linear/ConvNd.reset_parameters gives a layer of this fan-in
            fan_in = shape[1] * math.prod(shape[2:])
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(new, -bound, bound)
        with torch.no_grad():
            new[:, :weight.shape[1]] = weight
        wide = _copy_layer(consumer, shape[1])
        wide.weight = nn.Parameter(new, requires_grad=weight.requires_grad)
        if consumer.bias is not None:
            wide.bias = consumer.bias
        return wide

    @staticmethod
    def cannot_widen(consumer: nn.Module) -> str | None:
        """Why ``consumer`` cannot take appended input channels (None: it can)."""
        if isinstance(consumer, recurrent.RECURRENT):
            return recurrent.cannot_widen(consumer)
        if not plain_instance(consumer, WIDENABLE):
            return (f"a {type(consumer).__name__} is not a plain Conv1d/2d/3d or Linear (its "
                    "forward is its own)")
        if getattr(consumer, "groups", 1) != 1:
            return "a grouped or depthwise convolution mixes no channels across groups"
        padding = getattr(consumer, "padding", 0)
        if isinstance(padding, str) and padding not in ("valid", "same"):
            return f"padding={consumer.padding!r}"
        return None

    @staticmethod
    def input_width(consumer: nn.Module) -> int:
        """How many input channels (features) the consumer reads."""
        if isinstance(consumer, recurrent.RECURRENT):
            return consumer.input_size
        return consumer.weight.shape[1]

    @staticmethod
    def narrow(consumer: nn.Module, width: int) -> nn.Module | None:
        """``consumer`` without its appended input channels, if their weights are all zero."""
        if isinstance(consumer, recurrent.RECURRENT):
            return recurrent.narrow(consumer, width)
        if not plain_instance(consumer, WIDENABLE) or consumer.weight.shape[1] <= width:
            return None
        if bool(consumer.weight.detach()[:, width:].ne(0).any()):
            return None
        narrow = _copy_layer(consumer, width)
        narrow.weight = nn.Parameter(consumer.weight.detach()[:, :width].clone(),
                                     requires_grad=consumer.weight.requires_grad)
        if consumer.bias is not None:
            narrow.bias = consumer.bias
        return narrow

    def consumer_openness(self, site: ShortcutSite, modules: dict) -> float | None:
        """max |w| over the consumer's weights for x's channels (0: still closed; None: unknown).

        The consumer is the one layer reading this join: a module call, or (in a
        graph read back from a ``.pt2``) an aten conv/linear on a get_attr weight.
        """
        users = list(site.node.users)
        if len(users) != 1:
            return None
        user = users[0]
        layer = modules.get(user.target) if user.op == "call_module" else None
        if isinstance(layer, recurrent.RECURRENT):  # both directions' input weights
            weight = torch.cat([getattr(layer, n) for n in layer._flat_weights_names
                                if n.startswith("weight_ih")])
        elif layer is not None and hasattr(layer, "weight"):
            weight = layer.weight
        elif user.op == "call_function" and len(user.args) > 1 and \
                getattr(user.args[1], "op", None) == "get_attr":
            owner, _, leaf = str(user.args[1].target).rpartition(".")
            weight = getattr(modules.get(owner) if owner else modules[""], leaf, None)
        else:
            return None
        shape = shape_or_val(site.x)
        extra = shape[self.channel_axis] if shape is not None else None
        if weight is None or extra is None:
            return None
        columns = weight.detach()[:, weight.shape[1] - extra:]
        return float(columns.abs().max()) if columns.numel() else 0.0

    @classmethod
    def from_inlined(cls, gm: fx.GraphModule, path: str,
                     nodes: list[fx.Node]) -> ShortcutSite | None:
        """``cat([c, pool(x)])`` torch.export inlined: c is the list's first tensor, x the other."""
        ends = group_ends(nodes)
        if ends is None:
            return None
        cat, externals = ends
        info = lookup(cat.target) if cat.op == "call_function" else None
        if info is None or Trait.CAT not in info.traits or not isinstance(cat.args[0], (list, tuple)):
            return None
        c = cat.args[0][0]
        if c not in externals:
            return None
        x = next(e for e in externals if e is not c)
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        val = c.meta.get("val")
        rank = val.dim() if val is not None else 0
        axis = 1 if rank > 2 and dim % max(rank, 1) == 1 else -1
        pooled = [n for n in nodes if n is not cat and n.op == "call_function"]
        stride = 1
        if pooled and pooled[0].args and len(pooled[0].args) > 1:
            kernel = pooled[0].args[1]
            stride = int(kernel[0] if isinstance(kernel, (list, tuple)) else kernel)
        module = cls(None, axis, stride, rank - 2 if axis == 1 else 0)
        return ShortcutSite(path=path, module=module, node=cat, h=c, x=x, inlined=tuple(nodes))


def _copy_layer(layer: nn.Module, in_channels: int) -> nn.Module:
    """A fresh layer like ``layer`` with ``in_channels`` inputs (weights set by the caller)."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(in_channels, layer.out_features, bias=layer.bias is not None,
                         device=layer.weight.device, dtype=layer.weight.dtype)
    return type(layer)(in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                       padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                       bias=layer.bias is not None, padding_mode=layer.padding_mode,
                       device=layer.weight.device, dtype=layer.weight.dtype)
