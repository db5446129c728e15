"""Rendering: rich tables for people, plain dicts for --json. No decisions here."""

from __future__ import annotations

from collections import Counter

from rich.markup import escape
from rich.table import Table

from .rewrite import Skip
from .spans import Layer, Span


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape) if shape else "-"


def skips_table(skips: list[Skip], title: str = "Shortcuts inserted") -> Table:
    """One row per shortcut: source -> target, kind, shapes, stride, parameters; totals below."""
    inits = sorted({s.init for s in skips})
    if inits:
        title = f"{title} (init {', '.join(inits)})"
    caption = (f"total: {len(skips)} shortcut(s), {_kinds(skips)}; "
               f"{sum(s.params for s in skips):,} parameters added") if skips else None
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    table.add_column("#", justify="right")
    table.add_column("source -> target", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("shapes", no_wrap=True)
    table.add_column("stride", justify="right")
    table.add_column("params", justify="right", no_wrap=True)
    for i, s in enumerate(skips, 1):
        table.add_row(str(i), f"{s.source_layer or s.source} -> {s.target_layer or s.target}",
                      s.kind, f"{_shape(s.src_shape)} -> {_shape(s.dst_shape)}",
                      str(s.stride), f"{s.params:,}")
    return table


def _kinds(skips: list[Skip]) -> str:
    counts = Counter(s.kind for s in skips)
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def spans_table(spans: list[Span], *, rejected: bool = True) -> Table:
    """Every candidate span with its verdict: chosen, or the reason it was not."""
    table = Table(title="Candidate spans", title_justify="left")
    table.add_column("source -> target", no_wrap=True)
    table.add_column("layers", justify="right")
    table.add_column("shapes", no_wrap=True)
    table.add_column("kind")
    table.add_column("verdict")
    for s in spans:
        if not rejected and not s.chosen:
            continue
        text = s.reason.text if s.reason else ""
        if s.residual:
            text += f" ({s.residual})"
        verdict = "[green]chosen[/]" if s.chosen else f"[dim]{escape(text)}[/]"
        table.add_row(f"{s.source_layer} -> {s.target_layer}", str(len(s.layers)),
                      f"{_shape(s.src_shape)} -> {_shape(s.dst_shape)}", s.kind or "-", verdict)
    return table


def residuals_table(residuals) -> Table:
    """The residual connections the model already has (no shortcut is added beside them)."""
    table = Table(title="Existing residuals", title_justify="left")
    table.add_column("merge")
    table.add_column("op")
    table.add_column("kind")
    table.add_column("layers inside", justify="right")
    table.add_column("shape")
    for r in residuals:
        table.add_row(r.name, r.op, r.kind, str(len(r.layers)), _shape(r.shape))
    return table


def layers_table(layers: list[Layer]) -> Table:
    """The graph as ressurgeon sees it: one row per layer."""
    table = Table(title="Layers", title_justify="left")
    table.add_column("layer")
    table.add_column("op")
    table.add_column("pre-activation node")
    table.add_column("output node")
    for lay in layers:
        table.add_row(lay.name, lay.op, lay.pre_act, lay.out)
    return table


def rejection_summary(spans: list[Span]) -> str:
    """'3 rejected: 2 overlaps a chosen span, 1 ...' in one line ('' when none)."""
    counts = Counter(s.reason for s in spans if not s.chosen)
    if not counts:
        return ""
    parts = [f"{n} {r.text}" for r, n in counts.most_common()]
    return f"{sum(counts.values())} candidate(s) not chosen: " + "; ".join(parts)
