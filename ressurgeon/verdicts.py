"""The one rule for "may these two tensors be joined", and the records every method reports with.

Analysis only: nothing here edits a graph. ``pair_verdict`` is the verdict a
two-ended join (add, highway) gives, used both by selection and when a plan is
checked: the ends must be tensors of one dtype, the source must dominate the
target, and the shapes must join (identity, or a 1x1 projection with one
integer stride). Two more rules are heuristics that a hand-edited plan may
override: each end keeps channels on the same axis (``layout``), and neither end
is a 1x1-spatial gate tensor (``squeezed``). A join with other needs (concat's
consumer) states its own verdict on its class, from the same parts.

``Reason`` is the one reason type of both methods (add-skips and deepen): every
candidate ends chosen, or rejected with one of these.

The ``analysis`` these functions take is duck-typed (``dominators`` with
``dominates``/``parent``), so the join classes, which sit below the analysis
stage, can call them with the analysis a later stage hands them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import fx

from ._fx import info
from .registry import is_getitem

__all__ = ["Reason", "Span", "PairVerdict", "pair_verdict", "end_reasons", "join_kind",
           "feeding", "data_input", "layer_call", "OVERRIDABLE"]


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
    LARGE_PROJECTION = "large-projection"
    # deepen's: why a position gets no new block
    NO_RESIDUAL = "no-residual"
    CHANGES_SHAPE = "changes-shape"
    NOT_IDENTITY = "not-identity"
    NO_BRANCH_END = "no-branch-end"
    SHARED = "shared"
    OUTPUTS = "several-outputs"
    UNSUPPORTED = "unsupported-layer"
    SPREAD = "spread"
    # the mirror pattern's: why an encoder-decoder pair is not joined
    NO_MIRROR = "no-mirror"
    LEVELS = "unequal-levels"

    @property
    def text(self) -> str:
        return _REASON_TEXT[self]

    @property
    def overridable(self) -> bool:
        """A heuristic that an edited plan may override (reported as an override)."""
        return self in OVERRIDABLE


_REASON_TEXT = {
    Reason.NOT_TENSOR: "an end (deepen: the layer's output) is not a single floating-point "
                       "tensor",
    Reason.NOT_DOMINATED: "a path bypasses the source, so the sum would not be a residual",
    Reason.HEAD: "at the output layer (a shortcut into the logits, or a new block after them, "
                 "is no residual block)",
    Reason.EXCLUDED: "excluded by the include/exclude (deepen: where) patterns",
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
    Reason.LARGE_PROJECTION: ("the projection would add 1M+ parameters, more than "
                              "max_projection_share of the model's (allow it: --max-projection-share 1, or a "
                              "larger share; SkipConfig(max_projection_share=None))"),
    Reason.NO_RESIDUAL: "the block has no residual connection of its own",
    Reason.CHANGES_SHAPE: "the block changes its input's shape or has a projection shortcut, "
                          "so no copy of it is the identity",
    Reason.NOT_IDENTITY: "something besides residual adds lies on the block's main path (a "
                         "post-norm, a scaled shortcut), so a zeroed copy is not the identity",
    Reason.NO_BRANCH_END: "a residual branch ends in an op that no zeroed parameter makes "
                          "exactly zero",
    Reason.SHARED: "a parameter to zero is shared with layers outside the block",
    Reason.OUTPUTS: "the block's values are read outside it at more than one place",
    Reason.UNSUPPORTED: "no new layer can be shaped like this op (conv and linear only)",
    Reason.SPREAD: "other positions were picked to spread the new blocks evenly",
    Reason.NO_MIRROR: "mirror: the resolution never goes down and up again around this tensor "
                      "(no decoder tensor at this encoder tensor's resolution, or no encoder "
                      "tensor before this decoder tensor)",
    Reason.LEVELS: "mirror: unequal levels: this upsampling does not undo the downsampling at "
                   "the mirrored depth (e.g. one x8 upsampling after three x2 downsamplings)",
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
    fit: bool = False                # x is cropped or zero-padded to the join's size at run time

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
            "consumer_layer": self.consumer_layer, "fit": self.fit,
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


def pair_verdict(analysis, src: fx.Node, dst: fx.Node,
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
    reasons = end_reasons(a, b, src_axis, dst_axis)
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


def end_reasons(a, b, src_axis: int, dst_axis: int) -> list[Reason]:
    """What every join asks of its two ends: single tensors, one dtype, one layout."""
    if a.shape is None or b.shape is None:
        return [Reason.NOT_TENSOR]
    reasons = []
    if a.dtype != b.dtype:
        reasons.append(Reason.DTYPE)
    if len(a.shape) == len(b.shape) and _layout(src_axis, a.shape) != _layout(dst_axis, b.shape):
        reasons.append(Reason.LAYOUT)
    return reasons


def layer_call(anchor: fx.Node) -> fx.Node:
    """The call of a layer: its anchor, or the module call whose tuple's item 0 it is (LSTM)."""
    call = anchor.args[0] if is_getitem(anchor, 0) else None
    return call if isinstance(call, fx.Node) and call.op == "call_module" else anchor


def data_input(node: fx.Node | None) -> fx.Node | None:
    """The tensor a layer call reads (its first argument)."""
    if node is None or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    return node.args[0]


def feeding(analysis, anchor: fx.Node) -> fx.Node | None:
    """The latest tensor that dominates ``anchor``: what feeds a layer, past sizes and Nones."""
    node = analysis.dominators.parent(anchor)
    while node is not None and (info(node).shape is None or info(node).nodata):
        node = analysis.dominators.parent(node)
    return node


def join_kind(src_shape: tuple[int, ...], dst_shape: tuple[int, ...],
              channel_axis: int) -> tuple[str, int] | None:
    """("identity" | "projection", stride) when a shortcut can join the shapes, else None.

    Identity needs equal shapes. A projection may change the channel axis
    (dim 1 for channels-first tensors of rank >= 3, the last dim otherwise) and,
    for channels-first tensors, shrink every spatial dim by one integer stride,
    as a strided 1x1 convolution does: ``out = (in - 1) // stride + 1``. The stride is
    the span's (the ratio of the sizes, rounded): where the span gives one position
    less (``MaxPool2d(2)`` at odd sizes: floor(H/2)), the join crops the projection's
    last one (``shortcuts.base.fit_spatial``), at every input size.
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
        if s0 != d0:  # the span's own stride: floor(H/s) (pools) or ceil(H/s) or a border less
            stride = max(2, round(s0 / d0))
            if all(d <= -(-s // stride) <= d + 1 for s, d in spatial):
                return "projection", stride   # ceil(H/s), cropped to the span's size at run time
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


