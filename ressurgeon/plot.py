"""Figures: gradient flow before and after surgery, and the surgery diagram.

matplotlib is an optional extra (``pip install 'ressurgeon[plot]'``) and is
imported inside the functions, so ``import ressurgeon`` never loads it. The
figures are drawn on a bare ``matplotlib.figure.Figure`` (no pyplot state, no
GUI backend) and written atomically: a failed plot leaves no partial file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from ._io import atomic_path
from .errors import ConfigError

IDENTITY = "#1f77b4"      # blue
PROJECTION = "#e6550d"    # orange
REJECTED = "#b0b0b0"
ORIGINAL = "#7f7f7f"
REWRITTEN = "#1f77b4"
BOX = "#f2f2f2"


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError("plotting needs matplotlib: pip install 'ressurgeon[plot]'") from exc
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    fmt = path.suffix[1:].lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise ConfigError(f"cannot write a figure as {path.suffix or 'a file without suffix'}; "
                          "use .png, .svg or .pdf")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi)
    return path


def _tick_step(n: int, room: int = 40) -> int:
    return max(1, math.ceil(n / room))


def plot_gradient_flow(report, path: str | Path, *, title: str | None = None,
                       dpi: int = 150) -> Path:
    """Draw a GradientFlowReport: gradient norm and activation std per layer, log scale.

    Two panels share the layer axis: the norm of each layer's weight gradient
    (top) and the standard deviation of its output (bottom), the original
    model in grey, the rewritten one in blue; dotted lines mark the layers
    where a shortcut ends.

    Args:
        report: a GradientFlowReport from ``gradient_flow``.
        path: where to write the figure (.png, .svg or .pdf); written atomically.
        title: figure title; default names the init and the number of shortcuts.
        dpi: resolution of raster formats.

    Returns:
        The path written.

    Raises:
        ConfigError: matplotlib is not installed, or the suffix is not a figure format.
        ExportError: the output folder does not exist.

    Example:
        >>> plot_gradient_flow(gradient_flow(model, (x,)), "grad.png")   # doctest: +SKIP
    """
    rows = report.layers
    n = len(rows)
    fig = _figure(min(max(6.0, 0.17 * n + 3.0), 14.0), 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True)
    xs = list(range(n))
    series = [
        (top, "weight gradient norm", lambda s: s.grad_norm),
        (bottom, "activation std", lambda s: s.act_std),
    ]
    init = f"init {report.init}" if report.init else "rewritten"
    for ax, label, get in series:
        for which, colour, marker, name in (("original", ORIGINAL, "o", "original"),
                                            ("rewritten", REWRITTEN, "s",
                                             f"with shortcuts ({init})")):
            ys = [_positive(get(getattr(r, which))) for r in rows]
            ax.plot(xs, ys, color=colour, marker=marker, markersize=3.5, linewidth=1.6,
                    label=name)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(True, which="major", axis="y", alpha=0.3)
        for i, r in enumerate(rows):
            if r.skip:
                ax.axvline(i, color=IDENTITY, alpha=0.15, linestyle=":", linewidth=1)
    top.legend(loc="best", fontsize=9, frameon=False)
    step = _tick_step(n)
    bottom.set_xticks(xs[::step])
    bottom.set_xticklabels([r.layer for r in rows][::step], rotation=90 if n > 12 else 0,
                           fontsize=8)
    bottom.set_xlabel("layer (input → output); dotted: a shortcut ends here")
    gain = report.first_gain
    fig.suptitle(title or (f"Gradient flow, one batch: {report.skips} shortcuts"
                           + (f", first layer's gradient x{gain:,.3g}" if gain else "")),
                 fontsize=11)
    return _save(fig, path, dpi)


def _positive(v: float | None) -> float:
    return v if v is not None and v > 0 else math.nan


def plot_surgery(layers: Sequence | None, spans_or_skips: Sequence, path: str | Path, *,
                 gates=None, show_rejected: bool = False, title: str | None = None,
                 dpi: int = 150) -> Path:
    """Draw the layer chain left to right with every shortcut as an arc above it.

    Identity shortcuts are blue, projections orange; with ``gates`` each arc
    is labelled with its gate's value and drawn thicker the more the gate has
    opened (|a| relative to the largest); with ``show_rejected`` rejected
    candidate spans appear as faint dashed arcs.

    Args:
        layers: the layer chain, in graph order: Layer records (``find_layers``,
            or ``analyze_graph(gm).units`` for models whose spans can end at a
            merge of branches) or plain names; None derives it from the spans.
        spans_or_skips: Span records (``find_spans``/``select_spans``; chosen
            ones are drawn, rejected ones with ``show_rejected``) or Skip
            records (``SurgeryResult.skips``), or a mix.
        path: where to write the figure (.png, .svg or .pdf); written atomically.
        gates: a GateReport (``gate_report``) or {shortcut name: value}; Skip
            records match by name, spans by their source and target layers.
        show_rejected: also draw rejected candidates, faint.
        title: figure title.
        dpi: resolution of raster formats.

    Returns:
        The path written.

    Raises:
        ConfigError: matplotlib is missing, a span names a layer that is not in
            ``layers``, or the suffix is not a figure format.
        ExportError: the output folder does not exist.

    Example:
        >>> gm = trace_model(model, (x,))                                         # doctest: +SKIP
        >>> plot_surgery(find_layers(gm), select_spans(gm, SkipConfig()), "s.png")  # doctest: +SKIP
    """
    items = list(spans_or_skips)
    names = _layer_names(layers, items)
    ops = _layer_ops(layers)
    index = {name: i for i, name in enumerate(names)}
    values, by_ends = _gate_values(gates)
    arcs = []  # (start, end, colour, chosen, gate value)
    for item in items:
        chosen = getattr(item, "chosen", True)
        if not chosen and not show_rejected:
            continue
        for end in (item.source_layer, item.target_layer):
            if end not in index:
                raise ConfigError(f"shortcut {item.source_layer} -> {item.target_layer} names "
                                  f"layer {end!r}, which is not in the layer list; pass every "
                                  "unit a span can end at, merges of branches included "
                                  "(spans.analyze_graph(gm).units)")
        value = values.get(getattr(item, "name", None))
        if value is None:
            value = by_ends.get((item.source_layer, item.target_layer))
        kind = getattr(item, "kind", None)
        colour = (PROJECTION if kind == "projection" else IDENTITY) if chosen else REJECTED
        arcs.append((index[item.source_layer], index[item.target_layer], colour, chosen, value))

    n = max(len(names), 1)
    dense = n > 24                      # no op names inside the boxes, narrower spacing
    unit = min(0.28 if dense else 0.5, 38.0 / (n + 2))   # inches per layer
    longest = max((a[1] - a[0] for a in arcs), default=1)
    top = 0.24 + _rise(longest) + (0.3 if values or by_ends else 0.12)
    rotate = 90 if dense else (40 if max(map(len, names), default=0) * 0.075 > unit else 0)
    label_in = 0.15 + (0.068 * min(max(map(len, names), default=1), 18) *
                       (1.0 if rotate == 90 else 0.7 if rotate else 0.0)) + (0 if rotate else 0.12)
    width = (n + 1.8) * unit + 0.6
    height = (top + 0.32) * unit + label_in + 0.75
    fig = _figure(width, height)
    ax = fig.subplots()
    _draw_boxes(ax, names, ops, dense, rotate)
    top_value = max((abs(a[4]) for a in arcs if a[4] is not None), default=0.0)
    for start, end, colour, chosen, value in sorted(arcs, key=lambda a: a[3]):
        _draw_arc(ax, start, end, colour, chosen, value, top_value)
    ax.set_xlim(-1.2, n + 0.2)
    ax.set_ylim(-0.32, top)
    ax.set_aspect("equal")
    ax.set_yticks([])
    ax.tick_params(axis="x", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    _legend(ax, arcs, _gate_formula(gates))
    chosen = sum(1 for a in arcs if a[3])
    ops_seen = sorted(set(filter(None, ops)))
    kinds = f" ({', '.join(ops_seen)})" if dense and ops_seen else ""
    fig.suptitle(title or f"{chosen} shortcut{'s' if chosen != 1 else ''} over {len(names)} "
                 f"layers{kinds}", fontsize=11)
    return _save(fig, path, dpi)


def _layer_names(layers, items) -> list[str]:
    if layers is not None:
        return [getattr(lay, "name", lay) for lay in layers]
    names: dict[str, None] = {}
    for item in items:
        for name in (item.source_layer, *getattr(item, "layers", ()), item.target_layer):
            names.setdefault(name, None)
    return list(names)


def _layer_ops(layers) -> list[str]:
    if layers is None:
        return []
    return [getattr(lay, "op", "") for lay in layers]


def _gate_values(gates) -> tuple[dict, dict]:
    """({shortcut name: value}, {(source, target): value}) from a GateReport or a mapping."""
    if gates is None:
        return {}, {}
    if isinstance(gates, Mapping):
        return {k: float(v) for k, v in gates.items() if v is not None}, {}
    rows = getattr(gates, "gates", gates)
    values = {g.name: g.value for g in rows if g.value is not None}
    ends = {(g.source_layer, g.target_layer): g.value for g in rows if g.value is not None}
    return values, ends


def _gate_formula(gates) -> str | None:
    """The legend entry explaining 'a=' labels (None: no gates to show)."""
    if gates is None:
        return None
    rows = [g for g in getattr(gates, "gates", ()) if g.value is not None]
    formulas = {(g.init, g.formula) for g in rows}
    if len(formulas) == 1 and (pair := formulas.pop())[1]:
        return f"a = gate, {pair[0]}: {pair[1].replace('*', '·')}"
    return "a = gate value"


def _draw_boxes(ax, names: list[str], ops: list[str], dense: bool, rotate: int) -> None:
    from matplotlib.patches import FancyBboxPatch

    half = 0.3 if dense else 0.39
    for i in range(len(names)):
        ax.add_patch(FancyBboxPatch((i - half, -0.22), 2 * half, 0.44,
                                    boxstyle="round,pad=0.02,rounding_size=0.08",
                                    facecolor=BOX, edgecolor="#555555", linewidth=0.8, zorder=2))
        op = ops[i] if i < len(ops) else ""
        if op and not dense:
            ax.text(i, 0, _short_op(op), ha="center", va="center", fontsize=6.5, zorder=3,
                    color="#333333")
        if i:
            ax.plot([i - 1 + half, i - half], [0, 0], color="#888888", linewidth=0.8, zorder=1)
    ax.annotate("", xy=(-half, 0), xytext=(-1.1, 0),
                arrowprops={"arrowstyle": "-|>", "color": "#888888", "linewidth": 0.8})
    ax.text(-1.15, 0.05, "in", ha="left", va="bottom", fontsize=7, color="#666666")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n if len(n) <= 18 else "…" + n[-17:] for n in names],
                       rotation=rotate, ha="right" if rotate == 40 else "center",
                       rotation_mode="anchor" if rotate == 40 else "default",
                       fontsize=6.5 if dense else 7.5)


def _short_op(op: str) -> str:
    return {"MultiheadAttention": "MHA", "ConvTranspose2d": "ConvT2d",
            "ConvTranspose1d": "ConvT1d", "ConvTranspose3d": "ConvT3d"}.get(op, op)


def _rise(span: int) -> float:
    """Arc height: long jumps arch higher, short ones stay low enough to read."""
    return 0.42 * (1 + math.log2(max(span, 1)))


def _draw_arc(ax, start: int, end: int, colour: str, chosen: bool, value: float | None,
              top_value: float) -> None:
    from matplotlib.patches import Arc

    rise = _rise(end - start) * (1.0 if chosen else 0.8)
    width = 2.2
    if value is not None and top_value > 0:
        width = 1.0 + 3.0 * abs(value) / top_value
    ax.add_patch(Arc(((start + end) / 2, 0.24), end - start, 2 * rise, theta1=0, theta2=180,
                     color=colour, linewidth=width if chosen else 1.0,
                     linestyle="-" if chosen else (0, (3, 2)), alpha=1.0 if chosen else 0.6,
                     zorder=4 if chosen else 1))
    if chosen:
        for x in (start, end):
            ax.plot([x], [0.24], marker="o", markersize=3, color=colour, zorder=5)
    if value is not None and chosen:
        ax.text((start + end) / 2, 0.24 + rise + 0.04, f"a={value:.3g}", ha="center", va="bottom",
                fontsize=7.5, color=colour, zorder=6,
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none",
                      "alpha": 0.8})


def _legend(ax, arcs, gate_label: str | None) -> None:
    from matplotlib.lines import Line2D

    handles = []
    kinds = {a[2] for a in arcs if a[3]}
    if IDENTITY in kinds:
        handles.append(Line2D([], [], color=IDENTITY, linewidth=2.2, label="identity"))
    if PROJECTION in kinds:
        handles.append(Line2D([], [], color=PROJECTION, linewidth=2.2, label="projection (1x1)"))
    if any(not a[3] for a in arcs):
        handles.append(Line2D([], [], color=REJECTED, linewidth=1.0, linestyle=(0, (3, 2)),
                              label="rejected candidate"))
    if gate_label:
        handles.append(Line2D([], [], color="none", label=f"{gate_label}; thicker: larger |a|"))
    if handles:
        ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8,
                  frameon=False, ncol=len(handles), borderaxespad=0.2)
