"""The mirror pattern: U-Net's long skips, each encoder level joined to its decoder level.

Analysis only: nothing here touches weights or edits the graph.

In a network whose resolution goes down and then up again, every encoder
tensor is paired with the decoder tensor of its resolution at the mirrored
depth, the outermost encoder level with the outermost decoder level, as U-Net
(Ronneberger et al. 2015) concatenates them and LinkNet adds them
(``--join concat`` / ``--join add``).

How the pairs are found, on the *spine*: the tensors every path from the
input to the output passes through (the dominators of the output), in graph
order. Each tensor's resolution is its spatial size (the dims after the
channels, channels-first; between batch and channels, channels-last); tensors
without one (a flattened bottleneck, sizes) are passed over.

- A *downsampling* is a step along the spine to a smaller resolution (a pool,
  a strided conv); it opens an encoder level whose *tap* is the last spine
  tensor before it.
- An *upsampling* is a step to a larger resolution (a transposed conv,
  ``Upsample``/``interpolate``, a pixel shuffle). It closes the innermost open
  level it exactly undoes (from the resolution that level went down to, back
  to the one it came from); levels opened inside it and never closed stay
  unpaired. Its *join point* is the tensor the decoder level's first weighted
  layer reads (the upsampling's output, after any norm and activation of the
  upsampling layer): add joins there, and concat widens that layer (its
  *consumer*).
- Tie-break when levels hold unequal numbers of convs: the ends are fixed by
  the level boundaries, never by counting convs: the tap is the encoder level's
  last tensor and the join point the decoder level's first, whatever the convs
  between.

Pairs are matched at the example size; at sizes the pooling does not divide
(15 -> 7 -> 14) the encoder tensor is cropped, or zero-padded, at the end of
each spatial dim to the decoder's size at run time (``Span.fit``, done by the
rewrite with ``shortcuts._graph.Fit``), so the model's output size never
changes. Projections appear where only channels differ (add). The join of
``config.join`` judges each pair (``judge_pair``, the chain's rule) and
completes it with the consumer (``JoinModule.with_consumer``).

Every candidate is reported: a decoder level that undoes no encoder level is
``Reason.LEVELS`` (FCN's single x8 upsampling after three x2
downsamplings), an encoder level no decoder level comes back to is
``Reason.NO_MIRROR``, and a network whose resolution never goes down and up
again gets one ``NO_MIRROR`` span from its input to its output (or
``EXISTING`` when it has skips of its own, such as a U-Net already).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

from torch import fx

from .._fx import info, node_order
from ..analysis.layers import GraphAnalysis, Layer
from ..catalog import join_class
from ..config import SkipConfig
from ..verdicts import Reason, Span, data_input
from .patterns import Pattern
from .select import end_name, judge_pair, units_between


class _End(NamedTuple):
    """What ``judge_pair`` reads of a span's end: its unit's name and channel axis."""

    name: str
    channel_axis: int


@dataclass(frozen=True)
class _Level:
    """An encoder level: the tap, and the resolutions before and after its downsampling."""

    tap: fx.Node
    above: tuple[int, ...]
    below: tuple[int, ...]


class Mirror(Pattern):
    """U-Net's pairs: each encoder level's last tensor joined to its decoder level's first."""

    name = "mirror"
    #: the pairs nest (the outermost holds the others): no overlap between them
    nests = True

    @classmethod
    def select(cls, analysis: GraphAnalysis, config: SkipConfig) -> list[Span]:
        join = join_class(config.join)
        spine = _spine(analysis)
        readers = _readers(analysis)
        open_levels: list[_Level] = []
        levels: list[_Level] = []
        paired: set[fx.Node] = set()
        spans: list[Span] = []
        for i in range(1, len(spine)):
            (a, above), (b, below) = spine[i - 1], spine[i]
            if above == below:
                continue
            if len(above) != len(below) or not (_within(above, below) or _within(below, above)):
                open_levels.clear()  # a reshape to another spatial rank: no pair crosses it
                continue
            if _within(below, above):  # downsampling: an encoder level opens
                level = _Level(tap=a, above=above, below=below)
                open_levels.append(level)
                levels.append(level)
                continue
            # upsampling: it closes the innermost open level at the resolution it reaches
            d, consumer, read = _join_point(spine, i, readers)
            at = next((k for k in reversed(range(len(open_levels)))
                       if open_levels[k].above == below), None)
            if at is not None and open_levels[at].below == above:
                level = open_levels[at]
                spans.append(_pair(analysis, join, level.tap, d, consumer, read, config))
            elif open_levels:
                level = open_levels[at if at is not None else -1]
                spans.append(_rejected(analysis, level.tap, d, Reason.LEVELS))
            else:
                spans.append(_rejected(analysis, spine[0][0], d, Reason.NO_MIRROR))
                continue
            paired.add(level.tap)
            if at is not None:
                del open_levels[at:]  # deeper levels left open get no decoder level
        if spine:
            last = spine[-1][0]
            spans += [_rejected(analysis, level.tap, last, Reason.NO_MIRROR)
                      for level in levels if level.tap not in paired and level.tap is not last]
            if not spans and len(spine) > 1:
                spans.append(_whole(analysis, spine[0][0], last))
        order = node_order(analysis.gm.graph)
        spans.sort(key=lambda s: order[analysis.nodes[s.target]])
        return _cap(spans, config.max_skips)


def _spine(analysis: GraphAnalysis) -> list[tuple[fx.Node, tuple[int, ...]]]:
    """(tensor, resolution) for the output's dominators that have a spatial size, in graph order."""
    output = next(n for n in reversed(analysis.gm.graph.nodes) if n.op == "output")
    chain, node = [], analysis.dominators.parent(output)
    while node is not None:
        chain.append(node)
        node = analysis.dominators.parent(node)
    found = []
    for node in reversed(chain):
        resolution = _resolution(analysis, node)
        if resolution is not None:
            found.append((node, resolution))
    return found


def _resolution(analysis: GraphAnalysis, node: fx.Node) -> tuple[int, ...] | None:
    """A floating-point tensor's spatial size (None: no tensor, or no spatial dims)."""
    value = info(node)
    if value.shape is None or value.nodata or len(value.shape) < 3 \
            or value.dtype is None or not value.dtype.is_floating_point:
        return None
    axis = end_name(analysis, node)[1]
    return tuple(value.shape[2:]) if axis == 1 else tuple(value.shape[1:-1])


def _within(small: tuple[int, ...], large: tuple[int, ...]) -> bool:
    """Every dim of ``small`` at most ``large``'s, and one smaller."""
    return small != large and all(s <= t for s, t in zip(small, large))


def _readers(analysis: GraphAnalysis) -> dict[fx.Node, list[Layer]]:
    """Tensor -> the weighted layers whose op reads it as its input."""
    found: dict[fx.Node, list[Layer]] = {}
    for layer in analysis.layers:
        source = data_input(analysis.nodes[layer.anchor])
        if source is not None:
            found.setdefault(source, []).append(layer)
    return found


def _join_point(spine, start: int, readers) -> tuple[fx.Node, Layer | None, bool]:
    """(the decoder level's join tensor, its one reading layer or None, whether a layer reads it).

    The first spine tensor at the new resolution that a weighted layer reads;
    the upsampling's own output when no layer of the level reads one (then the
    join would land on the model's output).
    """
    resolution = spine[start][1]
    for node, res in spine[start:]:
        if res != resolution:
            break
        layers = readers.get(node, [])
        if layers:
            return node, (layers[0] if len(layers) == 1 else None), True
    return spine[start][0], None, False


def _pair(analysis: GraphAnalysis, join, tap: fx.Node, d: fx.Node, consumer: Layer | None,
          read: bool, config: SkipConfig) -> Span:
    """The matched pair, judged by the join (verdict, consumer) and the config."""
    inside = tuple(u.name for u in units_between(analysis, tap, d))
    span = judge_pair(analysis, join, tap, d, _End(*end_name(analysis, tap)),
                      _End(*end_name(analysis, d)), inside, config)
    span = replace(span, fit=True)
    if not read:  # nothing but the output follows: a shortcut into the logits
        span = replace(span, reason=span.reason or Reason.HEAD)
    return join.with_consumer(analysis, span, consumer)


def _rejected(analysis: GraphAnalysis, src: fx.Node, dst: fx.Node, reason: Reason,
              residual: str | None = None) -> Span:
    (src_name, _), (dst_name, axis) = end_name(analysis, src), end_name(analysis, dst)
    return Span(source=src.name, target=dst.name, source_layer=src_name, target_layer=dst_name,
                layers=tuple(u.name for u in units_between(analysis, src, dst)),
                src_shape=info(src).shape, dst_shape=info(dst).shape, channel_axis=axis,
                reason=reason, residual=residual)


def _whole(analysis: GraphAnalysis, first: fx.Node, last: fx.Node) -> Span:
    """The one span of a network whose resolution never goes down and up again."""
    if analysis.residuals:  # e.g. a U-Net already: its skips hide the levels from the spine
        return _rejected(analysis, first, last, Reason.EXISTING, analysis.residuals[0].name)
    return _rejected(analysis, first, last, Reason.NO_MIRROR)


def _cap(spans: list[Span], max_skips: int | None) -> list[Span]:
    """At most ``max_skips`` chosen, the earliest in the graph first."""
    chosen, capped = 0, []
    for span in spans:
        if span.chosen:
            if max_skips is not None and chosen >= max_skips:
                span = replace(span, reason=Reason.MAX_SKIPS)
            else:
                chosen += 1
        capped.append(span)
    return capped
