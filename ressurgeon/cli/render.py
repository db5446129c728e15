"""Every rich table and one-line summary the commands print. No decisions here.

Tables are laid out to fit 80 columns (what users get whenever output is
piped): long texts (reasons, why a gate stayed) go into numbered notes under
the table, shapes drop the batch size (it is the same at both ends, and the
caption gives it), and ``wide=True`` (``--wide``) adds the columns that do not
fit. A value is never cut: columns that hold names and numbers do not wrap.
"""

from __future__ import annotations

import math
from collections import Counter

from rich.table import Table
from rich.text import Text

BAR_WIDTH = 16
_EIGHTHS = " ▏▎▍▌▋▊▉"


def _table(title: str, caption: str | None = None) -> Table:
    return Table(title=title, title_justify="left", caption=caption, caption_justify="left")


def _shape(shape, batch: bool = True) -> str:
    if not shape:
        return "-"
    return "x".join(str(d) for d in (shape if batch else shape[1:])) or "scalar"


def _ends(source: str, target: str) -> str:
    return f"{source} -> {target}"


def _kind(kind: str | None, stride: int = 1) -> str:
    if kind is None:
        return "-"
    short = "proj" if kind == "projection" else kind
    return f"{short}/{stride}" if stride != 1 else short


def _shapes(src, dst, wide: bool) -> str:
    a, b = _shape(src, wide), _shape(dst, wide)
    return a if a == b else f"{a}->{b}"


def _count(n: int, noun: str) -> str:
    """``1 parameter``, ``1,024 parameters``."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _batch_note(items) -> str:
    batches = sorted({s.src_shape[0] for s in items if s.src_shape})
    return f"shapes without the batch ({', '.join(map(str, batches))})" if batches else ""


# -- add-skips ----------------------------------------------------------------------------------

def skips_table(skips, *, wide: bool = False, title: str = "Shortcuts inserted",
                module: str | None = None) -> Table:
    """One row per shortcut: ends, kind (with its stride), shapes, parameters; totals below.

    ``module``: the submodule the shortcuts went into (``--module``); the ends are its
    layers, and the title says so.
    """
    inits = sorted({s.init for s in skips})
    if module:
        title = f"{title} in {module}"
    if inits:
        title = f"{title} (init {', '.join(inits)})"
    caption = None
    if skips:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(Counter(s.kind for s in skips).items()))
        caption = (f"total: {len(skips)} shortcut(s), {kinds}; "
                   f"{_count(sum(s.params for s in skips), 'parameter')} added")
        if not wide:
            # the legend explains only the strides the table shows
            strides = sorted({s.stride for s in skips if s.kind == "projection" and s.stride != 1})
            notes = [_batch_note(skips), *(f"proj/{n}: a projection of stride {n}"
                                           for n in strides)]
            caption += "".join(f"; {note}" for note in notes if note)
    table = _table(title, caption)
    table.add_column("#", justify="right", no_wrap=True)
    if wide:
        table.add_column("module", no_wrap=True)
    table.add_column("source -> target", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("shapes", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    if wide:
        table.add_column("overrides", no_wrap=True)
    for i, s in enumerate(skips, 1):
        row = [str(i), *([s.name] if wide else []), _ends(s.source_layer, s.target_layer),
               _kind(s.kind, s.stride), _shapes(s.src_shape, s.dst_shape, wide), f"{s.params:,}"]
        if wide:
            row.append(", ".join(s.overrides) or "-")
        table.add_row(*row)
    return table


def rejection_summary(spans) -> str:
    """'3 rejected: 2 overlaps a chosen span, 1 ...' in one line ('' when none)."""
    counts = Counter(s.reason for s in spans if not s.chosen)
    if not counts:
        return ""
    parts = [f"{n} {r.text}" for r, n in counts.most_common()]
    return f"{sum(counts.values())} candidate(s) not chosen: " + "; ".join(parts)


def overrides_note(skips) -> str:
    """'plan overrides: skip_a__b (layout-mismatch)...' when a plan overrode heuristics."""
    over = [f"{s.name} ({', '.join(s.overrides)})" for s in skips if s.overrides]
    return "the plan overrides heuristics for: " + "; ".join(over) if over else ""


# -- inspect ------------------------------------------------------------------------------------

def spans_table(spans, *, wide: bool = False) -> Table:
    """Every candidate span with its verdict: chosen, or the reason's code (explained below)."""
    table = _table("Candidate spans", _batch_note(spans) if not wide else None)
    table.add_column("source -> target", no_wrap=True)
    table.add_column("n", justify="right", no_wrap=True)
    table.add_column("shapes", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    for s in spans:
        verdict = Text("chosen", style="green") if s.chosen else Text(s.reason.value, style="dim")
        table.add_row(_ends(s.source_layer, s.target_layer), str(len(s.layers)),
                      _shapes(s.src_shape, s.dst_shape, wide), _kind(s.kind, s.stride), verdict)
    return table


def reasons_legend(spans) -> list[str]:
    """One line per reason in the table: its code, what it means, and residuals met."""
    lines = []
    for reason, n in Counter(s.reason for s in spans if not s.chosen).most_common():
        line = f"  {reason.value} ({n}): {reason.text}"
        met = sorted({s.residual for s in spans if s.reason is reason and s.residual})
        if met:
            line += f" ({', '.join(met)})"
        lines.append(line)
    return lines


def residuals_table(residuals) -> Table:
    """The residual connections the model already has (no shortcut is added beside them)."""
    table = _table("Existing residuals")
    table.add_column("merge", no_wrap=True)
    table.add_column("op", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("layers inside", justify="right", no_wrap=True)
    table.add_column("shape", no_wrap=True)
    for r in residuals:
        table.add_row(r.name, r.op, r.kind, str(len(r.layers)), _shape(r.shape))
    return table


def layers_table(layers) -> Table:
    """The graph as ressurgeon sees it: one row per layer."""
    table = _table("Layers")
    table.add_column("layer", no_wrap=True)
    table.add_column("op", no_wrap=True)
    table.add_column("pre-activation node", no_wrap=True)
    table.add_column("output node", no_wrap=True)
    for lay in layers:
        table.add_row(lay.name, lay.op, lay.pre_act, lay.out)
    return table


# -- fold ---------------------------------------------------------------------------------------

def fold_table(result, *, wide: bool = False) -> tuple[Table, list[str]]:
    """One row per shortcut: what fold did with it; why a gate stayed goes into numbered notes."""
    inits = sorted({s.init for s in result.skips})
    title = "Shortcuts folded" + (f" (init {inits[0]})" if len(inits) == 1 else "")
    table = _table(title)
    table.add_column("shortcut", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    if len(inits) > 1:
        table.add_column("init", no_wrap=True)
    table.add_column("gate", justify="right", no_wrap=True)
    table.add_column("outcome", no_wrap=True)
    table.add_column("fusion", no_wrap=True)
    notes: list[str] = []
    for s in result.skips:
        row = [s.name, _kind(s.kind)] + ([s.init] if len(inits) > 1 else [])
        row += ["-" if s.gate is None else f"{s.gate:.4g}", _noted(s.outcome.value, s.reason,
                                                                  notes), s.fusion or "-"]
        table.add_row(*row)
    return table, [f"  [{i}] {text}" for i, text in enumerate(notes, 1)]


def _noted(outcome: str, reason: str | None, notes: list[str]) -> str:
    """``outcome`` with the number of its reason among ``notes`` (added when new)."""
    if not reason:
        return outcome
    if reason not in notes:
        notes.append(reason)
    return f"{outcome} [{notes.index(reason) + 1}]"


def fold_rewired_table(result) -> tuple[Table, list[str]]:
    """One row per block ``rewire`` wrapped: removed (back to the plain residual) or kept; why a
    block stayed goes into numbered notes."""
    table = _table("Rewired blocks folded", "removed: its new parameters were still at their "
                   "initial values, so the plain residual computes the same")
    for col in ("block", "kind", "new params", "outcome"):
        table.add_column(col, no_wrap=True, justify="right" if col == "new params" else "left")
    notes: list[str] = []
    for r in result.rewired:
        table.add_row(r.name, r.kind, f"{r.params:,}", _noted(r.outcome.value, r.reason, notes))
    return table, [f"  [{i}] {text}" for i, text in enumerate(notes, 1)]


def fold_summary(result) -> str:
    diff = "not checked" if result.max_abs_diff is None else f"within {result.max_abs_diff:.3g}"
    zeros = (f"{len(result.branches_removed)} still-zero residual branch(es) removed; "
             if result.branches_removed else "")
    if result.rewired:
        removed = sum(r.outcome.value == "removed" for r in result.rewired)
        zeros += (f"{removed} of {len(result.rewired)} rewired block(s) back to the plain "
                  "residual; ")
    return (f"{result.ops_before} ops -> {result.ops_after}; {len(result.batchnorms_folded)} "
            f"BatchNorm folded; {zeros}{result.fusion_eligible} Add(s) fusable into a conv; "
            f"outputs {diff} of the unfolded model (eval mode)")


def onnx_summary(report) -> str:
    """One line: what was written and how close it is to PyTorch."""
    head = (f"wrote {report.path} ({report.exporter} exporter, opset {report.opset}, "
            f"{report.dtype}, {'dynamic' if report.dynamic_batch else 'static'} batch)")
    if report.parity_checked:
        diffs = ", ".join(f"batch {b}: {d:.3g}" for b, d in report.parity.items())
        return (f"{head}; ONNX Runtime vs PyTorch max abs diff {diffs} "
                f"(tolerance {report.tolerance:.3g})")
    return f"{head}; {report.parity_note}"


# -- diagnose -----------------------------------------------------------------------------------

def flow_table(report, width: int = 80) -> Table:
    """One row per layer: gradient norm with a log-scale bar, original beside rewritten."""
    grads = [v for r in report.layers for v in (r.original.grad_norm, r.rewritten.grad_norm)
             if v is not None and v > 0]
    lo, hi = (math.log10(min(grads)), math.log10(max(grads))) if grads else (0.0, 0.0)
    names = max((len(r.layer) + (3 if r.skip else 0) for r in report.layers), default=5)
    gains = max((len(_gain(r.gain)) for r in report.layers), default=1)
    stds = max((len(_std(r)) for r in report.layers), default=1)
    index = len(str(len(report.layers)))
    # 6 columns: 7 borders and 12 cells of padding; each bar cell holds "9.99e-99 " + bar
    fixed = 19 + index + max(names, 5) + max(gains, 4) + max(stds, 7) + 2 * 9
    bars = max(3, min(BAR_WIDTH, (width - fixed) // 2))
    table = _table(f"Gradient flow, {report.mode} mode (weight-gradient norm, bars on a log "
                   f"scale {_decades(lo, hi)})")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("layer", no_wrap=True)
    table.add_column("grad, original", no_wrap=True)
    table.add_column("with skips", no_wrap=True)
    table.add_column("gain", justify="right", no_wrap=True)
    table.add_column("act std", justify="right", no_wrap=True)
    for i, r in enumerate(report.layers, 1):
        layer = Text(r.layer)
        if r.skip:
            layer.append(" <+", style="cyan")  # a shortcut's sum lands on this layer's output
        table.add_row(str(i), layer, _bar(r.original.grad_norm, lo, hi, "grey62", bars),
                      _bar(r.rewritten.grad_norm, lo, hi, "blue", bars),
                      Text(_gain(r.gain), style=_gain_style(r.gain)), _std(r))
    return table


def flow_summary(report) -> str:
    gain = report.first_gain
    first = (f"first layer's gradient x{gain:,.3g}" if gain is not None
             else "no first-layer gradient")
    return (f"{report.skips} shortcut(s), init {report.init or 'unknown'}: {first}; loss "
            f"{report.loss_original:.4g} -> {report.loss_rewritten:.4g}. '<+': a shortcut's sum "
            "lands on this layer's output; act std: original→with shortcuts")


def _decades(lo: float, hi: float) -> str:
    return f"1e{math.floor(lo)}..1e{math.ceil(hi)}"


def _bar(value: float | None, lo: float, hi: float, style: str, width: int) -> Text:
    if value is None:
        return Text("no grad", style="red")
    if value <= 0:
        return Text(f"{0.0:8.2e}", style="red")
    frac = 1.0 if hi <= lo else (math.log10(value) - lo) / (hi - lo)
    eighths = max(1, round(frac * width * 8))
    bar = "█" * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else "")
    text = Text(f"{value:8.2e} ")
    text.append(bar.ljust(width), style=style)
    return text


def _gain(gain: float | None) -> str:
    return "-" if gain is None else f"x{gain:,.3g}"


def _gain_style(gain: float | None) -> str:
    if gain is None:
        return ""
    return "green" if gain >= 10 else ("red" if gain < 0.1 else "")


def _std(row) -> str:
    return f"{_num(row.original.act_std)}→{_num(row.rewritten.act_std)}"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


# -- gates --------------------------------------------------------------------------------------

_GATE_MEANING = {"preserve": "a far from 0: fine-tuning adopted the shortcut",
                 "rezero": "a near 0: the span is still bypassed",
                 "morph": "c is how far the ramp opened the shortcut; at c=1, a near 0: bypassed",
                 "standard": "no gate"}


def gates_table(report, *, width: int = 80, wide: bool = False) -> Table:
    """One row per shortcut: its ends, kind, init, and the gate's value with a bar of |a|."""
    values = [abs(g.value) for g in report.gates if g.value is not None]
    top = max(values, default=0.0)
    ends = max((len(_ends(g.source_layer, g.target_layer)) for g in report.gates), default=16)
    name = max((len(g.name) for g in report.gates), default=8) if wide else 0
    index = len(str(len(report.gates)))
    # 6 or 7 columns: borders and padding, then '#', ends, kind, init, value, the bar
    fixed = 22 + index + max(ends, 16) + 4 + 8 + 8 + (name + 3 if wide else 0)
    bars = max(3, min(BAR_WIDTH, width - fixed))
    table = _table("Shortcut gates")
    table.add_column("#", justify="right", no_wrap=True)
    if wide:
        table.add_column("shortcut", no_wrap=True)
    table.add_column("source -> target", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("init", no_wrap=True)
    table.add_column("gate a", justify="right", no_wrap=True)
    table.add_column("|a|", no_wrap=True)
    for i, g in enumerate(report.gates, 1):
        if g.value is None:
            value, bar = Text("-"), Text("")
        else:
            value = Text(f"{g.value:+.4f}")
            n = round(abs(g.value) / top * bars) if top > 0 else 0
            bar = Text("█" * n, style="blue")
        init = g.init or "?"
        if g.ramp is not None:
            init += f" c={g.ramp:.2g}"
        table.add_row(str(i), *([g.name] if wide else []),
                      _ends(g.source_layer, g.target_layer), _kind(g.kind), init, value, bar)
    return table


def gates_legend(report) -> str:
    """What a gate multiplies, for the inits present."""
    inits = [i for i in _GATE_MEANING if any(g.init == i for g in report.gates)]
    formulas = {g.init: g.formula for g in report.gates if g.init}
    return "; ".join(f"{i}: {formulas[i]} ({_GATE_MEANING[i]})" for i in inits)


# -- deepen -------------------------------------------------------------------------------------

def deepen_table(result, *, wide: bool = False) -> Table:
    """One row per new block: its module, the position it follows, its kind, its parameters."""
    caption = (f"total: {len(result.blocks)} new block(s), "
               f"{_count(result.params_added, 'parameter')} added; each starts as exactly the "
               "identity")
    table = _table(f"New blocks ({result.how.value})", caption)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("new block", no_wrap=True)
    table.add_column("after", no_wrap=True)
    table.add_column("zeroed", justify="right", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    if wide:
        table.add_column("layer" if result.how.value == "new" else "zeroed tensors")
    for i, b in enumerate(result.blocks, 1):
        row = [str(i), b.name, b.after, str(len(b.zeroed)), f"{b.params:,}"]
        if wide:
            row.append(b.layer or ", ".join(b.zeroed))
        table.add_row(*row)
    return table


def expansion_table(report) -> Table:
    """A checkpoint folder's expansion: one row per new layer, the layer it copies, its rule."""
    table = _table(f"New layers in {report.prefix} ({report.layers_before} -> "
                   f"{report.layers_after})",
                   f"{len(report.zeroed)} tensor(s) zeroed; later layers renumbered")
    table.add_column("new layer", justify="right", no_wrap=True)
    table.add_column("copy of", justify="right", no_wrap=True)
    table.add_column("zero rule", no_wrap=True)
    for new, src, rule in zip(report.new_layers, report.copied_from, report.zero_rules):
        table.add_row(str(new), str(src), rule)
    return table
