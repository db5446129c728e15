"""The concatenation join (DenseNet, Huang et al. 2017): x's features feed the next layer too.

The span's source features ``x`` are concatenated, along the channel axis, to
the input ``c`` of the next weighted layer after the span (the *consumer*),
and that layer is widened to accept them: ``W [c; pool(x)]``. Spatial sizes
that differ by an integer factor are brought to the consumer's size by average
pooling, as DenseNet's transition layers do.

- ``preserve``: the widened weights for the new channels start at zero, so the
  output is exactly unchanged (no gate, no approximation; x's non-finite values
  enter as 0, since 0 * inf is NaN), while those weights
  get a non-zero gradient on the first step (their input is not zero);
- ``standard``: PyTorch's default init for them (training from scratch).

``ConcatJoin`` computes the concatenation; the new weights live in the
consumer, which stays a plain Conv/Linear at its own path. fold narrows the
consumer back when its new weights are all still zero.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn
from torch import fx

from .. import recurrent
from .._fx import info, plain_instance, set_info, shape_or_val
from ..config import Init
from ..errors import ConfigError, PlanError
from ..registry import Trait, lookup
from ..verdicts import PairVerdict, Reason, Span, data_input, end_reasons, feeding, layer_call
from ._graph import ShortcutSite, group_ends
from .base import JoinModule, finite_or_zero

_POOLS = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
WIDENABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class ConcatJoin(JoinModule):
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

    join_name = "concat"
    planned_kinds = ("concat",)
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

    def forward(self, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # x's inf/NaN features enter as 0: the new weight columns start at 0, and 0 * inf
        # would make the consumer's output NaN where the original's was finite
        return torch.cat([c, finite_or_zero(self.pool(x))], dim=self.channel_axis)

    def extra_repr(self) -> str:
        init = self.init.value if self.init else "unknown"
        return f"init={init!r}, channel_axis={self.channel_axis}, stride={self.stride}"

    def constructor_args(self) -> tuple[tuple, dict]:
        dims = next((d for d, pool in _POOLS.items() if type(self.pool) is pool), 0)
        return ((self.init.value if self.init else None, self.channel_axis),
                {"stride": self.stride, "spatial_dims": dims})

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

    def openness(self, site: ShortcutSite | None, modules: dict) -> float | None:
        """max |w| over the consumer's weights for x's channels (0: still closed; None: unknown).

        The consumer is the one layer reading this join: a module call, or (in a
        graph read back from a ``.pt2``) an aten conv/linear on a get_attr weight.
        """
        users = list(site.node.users) if site is not None else []
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


    def fold_back(self, gm: fx.GraphModule, site: ShortcutSite, modules: dict) -> str | None:
        """Narrow the consumer back when its new weights are all still 0 (then "removed")."""
        users = list(site.node.users)
        consumer = modules.get(users[0].target) if len(users) == 1 and \
            users[0].op == "call_module" else None
        shape = shape_or_val(site.x)
        extra = int(shape[self.channel_axis]) if shape else None
        width = ConcatJoin.input_width(consumer) - extra if consumer is not None and extra else None
        narrow = ConcatJoin.narrow(consumer, width) if width else None
        if narrow is None:
            return "the widened layer's new weights are trained: the concatenation stays"
        gm.add_submodule(str(users[0].target), narrow)
        modules[str(users[0].target)] = narrow
        users[0].replace_input_with(site.node, site.h)
        gm.graph.erase_node(site.node)
        return "removed"

    # -- selection, plan check, rewrite ------------------------------------------------------

    @classmethod
    def verdict(cls, analysis, x: fx.Node, c_in: fx.Node, src_axis: int,
                dst_axis: int) -> PairVerdict:
        """Whether x's features can be concatenated to ``c_in`` (a consumer's input).

        Both tensors of one dtype, x dominating ``c_in``, the same rank and batch
        and layout; channels-first, every spatial dim of x an integer multiple (the
        pooling factor) of ``c_in``'s; features-last, every dim but the last equal.
        """
        a, b = info(x), info(c_in)
        reasons = end_reasons(a, b, src_axis, dst_axis)
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

    @classmethod
    def candidate(cls, chooser) -> Span:
        """DenseNet: the span's input features join the input of the next layer after the unit.

        The consumer must be the only unit after the span, a Conv1d/2d/3d or Linear
        module called once with no groups; x joins its input after average pooling
        by an integer factor when the spatial sizes differ.
        """
        analysis, src, unit, config = chooser.analysis, chooser.src, chooser.unit, chooser.config
        nodes = analysis.nodes
        feed = feeding(analysis, nodes[chooser.first.anchor])
        sources = [n for n in (feed, nodes[src.out]) if n is not None]
        after = chooser.children.get(unit.name, [])
        consumer = after[0] if len(after) == 1 and after[0].kind == "layer" else None
        anchor = layer_call(nodes[consumer.anchor]) if consumer is not None else None
        c_in = data_input(anchor)
        module = analysis.modules.get(anchor.target) if anchor is not None and \
            anchor.op == "call_module" else None
        widenable = (module is not None and c_in is not None
                     and analysis.calls.get(anchor.target) == 1
                     and cls.cannot_widen(module) is None)
        base = Span(source=sources[0].name, target=(c_in or nodes[unit.out]).name,
                    source_layer=src.name, target_layer=unit.name, layers=chooser.inside,
                    src_shape=info(sources[0]).shape,
                    dst_shape=info(c_in).shape if c_in else None,
                    channel_axis=consumer.channel_axis if consumer else unit.channel_axis,
                    consumer=anchor.name if anchor is not None else None,
                    consumer_layer=consumer.name if consumer else None)
        if not widenable:
            return replace(base, reason=Reason.CONSUMER)
        best = None
        for x in dict.fromkeys(sources):
            verdict = cls.verdict(analysis, x, c_in, src.channel_axis, consumer.channel_axis)
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

    @classmethod
    def with_consumer(cls, analysis, span: Span, consumer) -> Span:
        """x's features join the input of ``consumer``, which must read ``span.target``.

        The consumer must be a Conv1d/2d/3d or Linear module called once with no
        groups (else ``Reason.CONSUMER``), as for the chain's spans.
        """
        nodes = analysis.nodes
        anchor = nodes[consumer.anchor] if consumer is not None else None
        module = analysis.modules.get(anchor.target) if anchor is not None and \
            anchor.op == "call_module" else None
        span = replace(span, consumer=anchor.name if anchor is not None else None,
                       consumer_layer=consumer.name if consumer is not None else None)
        if (module is None or analysis.calls.get(anchor.target) != 1
                or cls.cannot_widen(module) is not None
                or data_input(anchor) is not nodes[span.target]):
            return replace(span, reason=span.reason or Reason.CONSUMER)
        return span

    @classmethod
    def check_planned(cls, analysis, skip, src: fx.Node, dst: fx.Node, src_axis: int,
                      where: str) -> tuple[PairVerdict, str | None]:
        """The consumer must be a widenable Conv/Linear module, called once, reading ``dst``."""
        node = analysis.nodes.get(skip.consumer)
        if node is None:
            raise PlanError(f"{where}: the plan names consumer node '{skip.consumer}', which "
                            "this model's graph lacks; write a fresh plan with --plan-out")
        module = analysis.modules.get(node.target) if node.op == "call_module" else None
        why = "it is not a module call" if module is None else cls.cannot_widen(module)
        if why is None and analysis.calls.get(node.target) != 1:
            why = "the module is called more than once"
        if why is None and (not node.args or node.args[0] is not dst):
            why = f"it does not read node '{dst.name}'"
        if why:
            raise PlanError(f"{where}: consumer '{skip.consumer}' cannot take the features: "
                            f"{why}")
        unit = analysis.unit_anchors.get(node.name)
        verdict = cls.verdict(analysis, src, dst, src_axis, skip.channel_axis)
        return verdict, (unit.name if unit is not None else str(node.target))

    @classmethod
    def insert(cls, gm: fx.GraphModule, name: str, planned, init: Init, src: fx.Node,
               c_in: fx.Node, consumer: fx.Node | None) -> tuple[fx.Node, fx.Node, int]:
        """``consumer(cat([c_in, pool(src)]))`` with the consumer widened."""
        src_info, c_info = info(src), info(c_in)
        axis = planned.channel_axis
        spatial = len(c_info.shape) - 2 if axis == 1 and len(c_info.shape) >= 3 else 0
        join = cls(init, axis, planned.stride, spatial)
        gm.add_submodule(name, join.to(device=src_info.device))
        with gm.graph.inserting_before(consumer):
            cat = gm.graph.call_module(name, (c_in, src))
        extra = src_info.shape[axis]
        shape = list(c_info.shape)
        shape[axis] += extra
        set_info(cat, **{**c_info.__dict__, "shape": tuple(shape), "skip": name})
        consumer.replace_input_with(c_in, cat)
        layer = gm.get_submodule(str(consumer.target))
        wide = cls.widen(layer, extra, init)
        gm.add_submodule(str(consumer.target), wide)
        # the consumer reads the concatenation; later shortcuts still read c_in itself
        added = sum(p.numel() for p in wide.parameters()) - sum(p.numel() for p in layer.parameters())
        return c_in, c_in, added

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
        pooled = [n for n in nodes if n is not cat and n.op == "call_function"   # not the guard
                  and "pool" in getattr(n.target, "__name__", str(n.target))]
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
