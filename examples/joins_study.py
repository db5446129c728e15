"""Which join: add, concat or highway shortcuts on deep plain networks trained from scratch (issue 14 §5).

The deep plain networks of ``train_digits.py`` (MLP and CNN, depth 20 and 40,
PyTorch's default init, no normalisation; plain training fails or struggles at
these depths) are trained from scratch on scikit-learn's digits as they are
and after ``add_skips(net, (x,), SkipConfig(span=2, join=..., init=...))``:

- plain: no surgery;
- add standard (``h + S(x)``, ResNet) and add rezero (``S(x) + a*h``, a = 0);
- concat standard (DenseNet: the span's input is concatenated to the next
  Conv/Linear's input, which is widened; new weights at PyTorch's default init)
  and concat preserve (the same with the new weights at zero: the dense
  connections start closed and the net starts as the plain one);
- highway standard (``T*h + (1-T)*S(x)``, ``T = sigmoid(W_T x + b_T)``, b_T = -2)
  and highway preserve (``h + g*(1-T)*(S(x)-h)``, per-channel g = 0: the plain
  net at insertion).

Every variant of a (net, seed) starts from the same plain weights and sees the
same batches (``train_digits.train``: Adam lr 1e-3, batch 64, cross-entropy;
gates on the weights' learning rate, ``ressurgeon.training.param_groups``'
default for these inits). Recorded per run: test accuracy, the training-loss
curve, epochs to a training loss below 0.5, parameters added, the output
change at insertion (0 for the exact inits), what ``fold`` does at insertion
and after training, and how far the zero-initialised parts opened.

Inference cost: the seed-0 model of every variant is exported with
``export_onnx`` as trained and after ``fold``, and all of one net's files run
in one process on ONNX Runtime's CPU provider (1 thread, ORT_ENABLE_ALL), the
way ``benchmarks/bench_onnx.py`` measures: warm-up, then alternating rounds in
rotating order, the fastest of a few back-to-back runs per model per round,
and the median over rounds of each model's time divided by the plain net's
time in the same round. A second session of the plain net's own file gives the
noise floor.

    python examples/joins_study.py            # the full study (~30 min on one CPU thread)
    python examples/joins_study.py --quick    # smoke test (~30 s): depth 4, 2 seeds, 2 epochs

Writes into --out (default examples/results/; --quick: examples/results/quick/),
each file atomically: joins_study.json (every per-seed number and loss curve,
the latency rounds' summary), joins_study.md (the tables) and joins_study.png
(training loss per join, mean +- std over seeds). Needs scikit-learn,
matplotlib, onnx and onnxruntime; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ressurgeon import SkipConfig, add_skips, export_onnx, fold, fusion_report
from ressurgeon.gates import gate_report

try:
    from . import train_digits as td
    from .retrofit_study import json_ready, mean_std, pct, write_atomic
except ImportError:  # run as a script: python examples/joins_study.py
    import train_digits as td
    from retrofit_study import json_ready, mean_std, pct, write_atomic

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "joins_study"
NETS = ("mlp20", "mlp40", "cnn20", "cnn40")
QUICK_NETS = ("mlp4", "cnn4")
QUICK_LATENCY = ("add_rezero", "concat_preserve", "highway_preserve")


@dataclass(frozen=True)
class Variant:
    """A join and its init (None: the plain net), as ``SkipConfig`` takes them."""

    name: str
    join: str | None
    init: str | None
    label: str
    exact: bool = False           # the plain net's function at insertion


VARIANTS = {v.name: v for v in (
    Variant("plain", None, None, "plain (no surgery)"),
    Variant("add_standard", "add", "standard", "add, standard: h + S(x)"),
    Variant("add_rezero", "add", "rezero", "add, rezero: S(x) + a*h"),
    Variant("concat_standard", "concat", "standard", "concat, standard (new weights random)"),
    Variant("concat_preserve", "concat", "preserve", "concat, preserve (new weights 0)",
            exact=True),
    Variant("highway_standard", "highway", "standard", "highway, standard"),
    Variant("highway_preserve", "highway", "preserve", "highway, preserve (g = 0)", exact=True),
)}


@dataclass
class Budget:
    """What every run gets; one instance per study."""

    epochs: int = 30
    seeds: int = 3
    threshold: float = 0.5        # "epochs to a training loss below this"
    span: int = 2
    train_samples: int | None = None   # --quick: only the first ones (the split is shuffled)
    latency_batches: tuple[int, ...] = (1, 64)
    latency_rounds: int = 40
    latency_runs: int = 5         # back-to-back runs per model per round; the fastest counts
    latency_warmup: int = 10
    latency_nets: tuple[str, ...] | None = None   # None: every net
    latency_variants: tuple[str, ...] | None = None   # None: every variant (plain always)


def parse_net(name: str) -> tuple[str, int]:
    """("mlp", 20) from "mlp20"."""
    m = re.fullmatch(r"(mlp|cnn)(\d+)", name)
    if not m or int(m.group(2)) < 2:
        raise ValueError(f"a net is mlp<depth> or cnn<depth> with depth >= 2, got {name!r}")
    return m.group(1), int(m.group(2))


# -- one run ---------------------------------------------------------------------------

def build(net: str, variant: Variant, data: dict, budget: Budget, seed: int):
    """(plain net, model to train, add_skips result or None): seed for the plain weights,
    seed + 1 for what the surgery adds (as train_digits.build)."""
    family, depth = parse_net(net)
    torch.manual_seed(seed)
    plain = (td.digits_mlp(depth, td.Settings.width) if family == "mlp"
             else td.digits_cnn(depth, td.Settings.channels))
    if variant.join is None:
        return plain, plain, None
    torch.manual_seed(seed + 1)
    example = (td.shaped(family, data["x_train"][:8]),)
    config = SkipConfig(span=budget.span, join=variant.join, init=variant.init)
    result = add_skips(plain, example, config, verify=False)
    return plain, result.module, result


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def opened(model: nn.Module, plain: nn.Module, variant: Variant) -> float | None:
    """How far the zero-started part opened: max |new weight| of the widened layers (concat),
    max |g| or |a| over the gates (highway, rezero); None where nothing starts at zero."""
    if variant.join == "concat":
        # read from the weights: gate_report gives None for a concat of an add_skips module
        # (ConcatJoin.consumer_openness reads only meta["val"], which fx tracing does not set)
        base = dict(plain.named_parameters())
        new = [w.detach()[:, base[n].shape[1]:].abs().max().item()
               for n, w in model.named_parameters()
               if n.endswith("weight") and n in base and w.shape[1] > base[n].shape[1]]
        return max(new) if new else None
    values = [g.value for g in gate_report(model).gates if g.value is not None]
    return max(abs(v) for v in values) if values else None


def fold_counts(model: nn.Module, example: tuple) -> dict[str, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fold(model, example).counts()


def run_one(net: str, variant: Variant, data: dict, budget: Budget, seed: int,
            keep: dict | None = None) -> dict:
    """Build, check at insertion, train, measure; one record. ``keep``: store the model there."""
    family, depth = parse_net(net)
    plain, model, result = build(net, variant, data, budget, seed)
    example = (td.shaped(family, data["x_train"][:8]),)
    # the change at insertion is measured on training images: two test images carry a pixel
    # that is constant in the training split, which _digits.split standardises to 1e6
    probe = td.shaped(family, data["x_train"][:512])
    record: dict = {"net": net, "family": family, "depth": depth, "variant": variant.name,
                    "seed": seed, "skips": len(result.skips) if result else 0,
                    "params": n_params(model), "params_added": n_params(model) - n_params(plain)}
    if result is not None:
        with torch.no_grad():
            record["max_change"] = (model.eval()(probe) - plain.eval()(probe)).abs().max().item()
        record["fold_at_insertion"] = fold_counts(model, example)
        record["opened_at_insertion"] = opened(model, plain, variant)
    else:
        record.update(max_change=0.0, fold_at_insertion={}, opened_at_insertion=None)
    plain_weights = {k: v.clone() for k, v in plain.state_dict().items()}
    settings = td.Settings(epochs=budget.epochs, seed=seed, span=budget.span)
    losses, seconds, cpu = td.train(model, family, data, settings)
    record.update(losses=losses, final_loss=losses[-1], test_acc=td.accuracy(model, family, data),
                  epochs_to=next((i + 1 for i, v in enumerate(losses) if v < budget.threshold),
                                 None),
                  seconds=seconds, cpu=cpu)
    if result is not None:
        plain.load_state_dict(plain_weights)   # the reference widths for opened()
        record["fold_after"] = fold_counts(model, example)
        record["opened_after"] = opened(model, plain, variant)
    else:
        record.update(fold_after={}, opened_after=None)
    if keep is not None:
        keep[(net, variant.name)] = model.eval()
    return record


# -- inference cost --------------------------------------------------------------------

def ort_session(path: Path):
    """ONNX Runtime CPU session as benchmarks/bench_onnx.py makes it: 1 thread, ORT_ENABLE_ALL."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_rounds(sessions: dict, feed: dict, budget: Budget) -> dict[str, list[float]]:
    """Warm every session up, then alternating rounds (order rotates): the fastest of
    ``latency_runs`` back-to-back runs per model per round, in seconds."""
    for s in sessions.values():
        for _ in range(budget.latency_warmup):
            s.run(None, feed)
    names = list(sessions)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(budget.latency_rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            s, best = sessions[name], math.inf
            for _ in range(budget.latency_runs):
                start = time.perf_counter()
                s.run(None, feed)
                best = min(best, time.perf_counter() - start)
            times[name].append(best)
    return times


def latency(net: str, models: dict, data: dict, budget: Budget, log=print) -> dict:
    """Export every variant of ``net`` as trained and folded; time them against plain.

    Returns {"plain_ms": {batch: ms}, "noise_floor": {batch: ratio}, "variants": {variant:
    {form: {"ratio": {batch: r}, "fold": counts, "ort_nodes": n, ...}}}}.
    """
    family, _ = parse_net(net)
    example = (td.shaped(family, data["x_train"][:1]),)
    files: dict[str, Path] = {}
    out: dict = {"variants": {}}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, variant in VARIANTS.items():
            model = models.get((net, name))
            if model is None or (budget.latency_variants is not None and name != "plain"
                                 and name not in budget.latency_variants):
                continue
            forms = {"trained": (model, None)}
            if variant.join is not None:
                folded = fold(model, (td.shaped(family, data["x_train"][:8]),))
                forms["folded"] = (folded.module, folded)
            entry = out["variants"].setdefault(name, {})
            for form, (module, folded) in forms.items():
                path = Path(tmp) / f"{name}_{form}.onnx"
                report = export_onnx(module, path, example)
                fusion = fusion_report(path)
                files[f"{name}/{form}"] = path
                entry[form] = {"exporter": report.exporter, "parity": report.max_abs_diff,
                               "ort_nodes": sum(fusion.ops.values()),
                               "ort_ops": fusion.ops, "fused_add": fusion.fused_add}
                if folded is not None:
                    entry[form]["fold"] = folded.counts()
                    entry[form]["fold_reasons"] = sorted({s.reason for s in folded.skips
                                                          if s.reason})
        files["plain/again"] = files["plain/trained"]   # a second session: the noise floor
        sessions = {key: ort_session(path) for key, path in files.items()}
        for batch in budget.latency_batches:
            x = td.shaped(family, data["x_test"][:batch]).numpy()
            feed = {sessions["plain/trained"].get_inputs()[0].name: x}
            times = time_rounds(sessions, feed, budget)
            base = times["plain/trained"]
            out.setdefault("plain_ms", {})[batch] = statistics.median(base) * 1e3
            for key, t in times.items():
                ratio = statistics.median(a / b for a, b in zip(t, base))
                name, form = key.split("/")
                if key == "plain/again":
                    out.setdefault("noise_floor", {})[batch] = ratio
                    continue
                slot = out["variants"][name][form]
                slot.setdefault("ratio", {})[batch] = ratio
                slot.setdefault("ms", {})[batch] = statistics.median(t) * 1e3
    ratios = ", ".join(f"{n} {v['trained']['ratio'][budget.latency_batches[0]]:.2f}"
                       for n, v in out["variants"].items() if n != "plain")
    log(f"[{net}] ONNX Runtime latency vs plain, batch {budget.latency_batches[0]}: {ratios} "
        f"(noise floor {out['noise_floor'][budget.latency_batches[0]]:.2f})")
    return out


# -- summaries -------------------------------------------------------------------------

def summarise(runs: list[dict], budget: Budget) -> dict:
    """{net: {variant: stats}}; stats as [mean, std] over seeds."""
    out: dict = {}
    for net in dict.fromkeys(r["net"] for r in runs):
        mine = [r for r in runs if r["net"] == net]
        plain = {r["seed"]: r for r in mine if r["variant"] == "plain"}
        rows: dict = {}
        for name in VARIANTS:
            rs = [r for r in mine if r["variant"] == name]
            if not rs:
                continue
            reached = [r["epochs_to"] for r in rs if r["epochs_to"] is not None]
            row = {"n": len(rs), "skips": rs[0]["skips"], "params_added": rs[0]["params_added"],
                   "test_acc": mean_std([r["test_acc"] for r in rs]),
                   "final_loss": mean_std([r["final_loss"] for r in rs]),
                   "epochs_to": mean_std(reached), "reached": len(reached),
                   "seconds": mean_std([r["seconds"] for r in rs]),
                   "max_change": max(r["max_change"] for r in rs),
                   "opened_after": mean_std([r["opened_after"] for r in rs
                                             if r["opened_after"] is not None]),
                   "fold_at_insertion": rs[0]["fold_at_insertion"],
                   "fold_after": rs[0]["fold_after"]}
            paired = [r["test_acc"] - plain[r["seed"]]["test_acc"] for r in rs
                      if r["seed"] in plain]
            row["delta"] = mean_std(paired)
            a = [r["test_acc"] for r in rs]
            b = [plain[r["seed"]]["test_acc"] for r in rs if r["seed"] in plain]
            pooled = (math.sqrt((statistics.variance(a) + statistics.variance(b)) / 2)
                      if len(a) > 1 and len(b) > 1 else math.nan)
            diff = statistics.fmean(a) - statistics.fmean(b) if a and b else math.nan
            row["pooled_std"] = pooled
            row["beats_plain"] = name != "plain" and diff >= 0.02 and diff > pooled
            row["worse_than_plain"] = name != "plain" and diff <= -0.02 and -diff > pooled
            rows[name] = row
        out[net] = rows
    return out


def _num(ms, digits: int = 3) -> str:
    m, s = ms
    return "-" if m is None or not math.isfinite(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def _epochs(row: dict) -> str:
    if not row["reached"]:
        return f"never (0/{row['n']})"
    m, s = row["epochs_to"]
    return f"{m:.1f} ± {s:.1f} ({row['reached']}/{row['n']})"


def _counts(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def training_table(summary: dict) -> str:
    head = ("| net | variant | shortcuts | params added | test acc, % | Δ acc vs plain "
            "(paired) | beats plain | final train loss | epochs to loss < threshold "
            "(seeds reaching it) | max \\|Δ out\\| at insertion | opened after training | "
            "train s / run |")
    lines = [head, "|---|---|---:|---:|---:|---:|:-:|---:|---:|---:|---:|---:|"]
    for net, rows in summary.items():
        for name, row in rows.items():
            beats = "-" if name == "plain" else (
                "**yes**" if row["beats_plain"] else "worse" if row["worse_than_plain"] else "no")
            change = row["max_change"]
            change = "0" if change == 0 else f"{change:.3g}"
            openness = row["opened_after"]
            openness = "-" if not math.isfinite(openness[0]) else f"{openness[0]:.3g}"
            lines.append(
                f"| {net} | {VARIANTS[name].label} | {row['skips']} | {row['params_added']:,} | "
                f"{pct(row['test_acc'])} | "
                f"{'-' if name == 'plain' else pct(row['delta'], True)} | {beats} | "
                f"{_num(row['final_loss'])} | {_epochs(row)} | "
                f"{'-' if name == 'plain' else change} | {openness} | "
                f"{row['seconds'][0]:.1f} |")
    return "\n".join(lines)


def latency_table(cost: dict, budget: Budget) -> str:
    batches = budget.latency_batches
    head = ["net", "variant", "fold outcome (trained)", "ORT nodes, trained / folded"]
    head += [f"×plain, batch {b}, {form}" for b in batches for form in ("trained", "folded")]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|---:" + "|---:|---:" * len(batches) + "|"]
    for net, c in cost.items():
        floor = ", ".join(f"batch {b}: {c['plain_ms'][b]:.3f} ms" for b in batches)
        noise = " / ".join(f"{c['noise_floor'][b]:.3f}" for b in batches)
        lines.append(f"| {net} | plain ({floor}); a second session of it: ×{noise} | - | "
                     f"{c['variants']['plain']['trained']['ort_nodes']} / - "
                     + "| 1 | - " * len(batches) + "|")
        for name, forms in c["variants"].items():
            if name == "plain":
                continue
            t, f = forms["trained"], forms["folded"]
            cells = "".join(f"| {t['ratio'][b]:.3f} | {f['ratio'][b]:.3f} " for b in batches)
            lines.append(f"| {net} | {VARIANTS[name].label} | {_counts(f['fold'])} | "
                         f"{t['ort_nodes']} / {f['ort_nodes']} {cells}|")
    return "\n".join(lines)


def findings(summary: dict, cost: dict, budget: Budget) -> list[str]:
    """Plain sentences from the numbers: per net what helps, what does not, and what it costs."""
    lines = []
    for net, rows in summary.items():
        plain = rows["plain"]
        others = {n: r for n, r in rows.items() if n != "plain"}
        better = [n for n, r in others.items() if r["beats_plain"]]
        neutral = [n for n, r in others.items() if not r["beats_plain"]
                   and not r["worse_than_plain"]]
        worse = [n for n, r in others.items() if r["worse_than_plain"]]
        best = max(others, key=lambda n: others[n]["test_acc"][0]) if others else None
        def d(n: str, others: dict = others) -> str:
            return f"{n} {others[n]['delta'][0] * 100:+.1f}"
        text = (f"- **{net}**: plain {pct(plain['test_acc'])}% (final loss "
                f"{plain['final_loss'][0]:.3f}, loss < {budget.threshold:g} in "
                f"{plain['reached']}/{plain['n']} seeds). ")
        text += (f"Beat plain: {', '.join(map(d, better))}. " if better
                 else "No join beats plain. ")
        if neutral:
            text += f"Not distinguishable from plain: {', '.join(map(d, neutral))}. "
        if worse:
            text += f"Worse than plain: {', '.join(map(d, worse))}. "
        if best:
            text += f"Best: {best} at {pct(others[best]['test_acc'])}%."
        c = cost.get(net)
        if c:
            b = budget.latency_batches[0]
            dear = max((n for n in c["variants"] if n != "plain"),
                       key=lambda n: c["variants"][n]["trained"]["ratio"][b])
            text += (f" Latency at batch {b}: the costliest join is {dear} at "
                     f"×{c['variants'][dear]['trained']['ratio'][b]:.2f} of plain "
                     f"(noise floor ×{c['noise_floor'][b]:.2f}).")
        lines.append(text)
    return lines


# -- figure and files ------------------------------------------------------------------

COLOURS = {"plain": "#7f7f7f", "add_standard": "#1f77b4", "add_rezero": "#2ca02c",
           "concat_standard": "#d62728", "concat_preserve": "#ff9896",
           "highway_standard": "#9467bd", "highway_preserve": "#c5b0d5"}
STYLES = {"concat_preserve": "--", "highway_preserve": "--"}


def plot(runs: list[dict], summary: dict, path: Path) -> Path:
    """Training loss per epoch, one panel per net, mean +- std over seeds per variant; log y."""
    from matplotlib.figure import Figure

    nets = list(summary)
    cols = 2 if len(nets) > 1 else 1
    rows = math.ceil(len(nets) / cols)
    fig = Figure(figsize=(5.6 * cols, 3.6 * rows + 1.1), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    for ax, net in zip(axes.flat, nets):
        for name in summary[net]:
            curves = torch.tensor([r["losses"] for r in runs
                                   if r["net"] == net and r["variant"] == name])
            epochs = range(1, curves.shape[1] + 1)
            mean = curves.mean(0)
            std = curves.std(0) if len(curves) > 1 else torch.zeros_like(mean)
            wide = name == "plain"   # wide and underneath: an exact join can hide it
            ax.plot(epochs, mean, color=COLOURS[name], linestyle=STYLES.get(name, "-"),
                    linewidth=3.0 if wide else 1.5, zorder=1 if wide else 2,
                    label=f"{VARIANTS[name].label}")
            ax.fill_between(epochs, (mean - std).clamp(min=1e-4), mean + std,
                            color=COLOURS[name], alpha=0.12, linewidth=0)
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
        n = summary[net]["plain"]["n"]
        ax.set_title(f"{net.upper()[:3]}, depth {parse_net(net)[1]} ({n} seeds)", fontsize=9.5)
        ax.set_xlabel("epoch", fontsize=8.5)
        ax.set_ylabel("training loss (cross-entropy)", fontsize=8.5)
    for ax in list(axes.flat)[len(nets):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("Digits, deep plain nets trained from scratch with each join: training loss "
                 "(mean ± std over seeds; same weights and batches per seed)", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return write_atomic(path, buffer.getvalue())


def markdown(summary: dict, cost: dict, budget: Budget, header: str, n_test: int) -> str:
    b = budget
    method = (
        f"Each net is trained from scratch for {b.epochs} epochs (Adam lr "
        f"{td.Settings.lr:g}, batch {td.Settings.batch}, cross-entropy; the loop of "
        "`train_digits.py`), plain and after `add_skips(net, (x,), SkipConfig(span="
        f"{b.span}, join=..., init=...))`, for {b.seeds} seeds; seed s sets the plain weights, "
        "s + 1 what the surgery adds, s + 2 the batch order, so every variant of a seed starts "
        "from the same plain weights and sees the same batches. Gates train at the weights' "
        "learning rate (`param_groups`' default for these inits). MLPs: hidden width "
        f"{td.Settings.width}; CNNs: {td.Settings.channels[0]} then {td.Settings.channels[1]} "
        "channels, max-pool halfway, global average pooling; PyTorch's default init, no "
        f"normalisation. Digits: 1,797 8x8 images, stratified 80/20 split ({n_test} test "
        "images), standardised.")
    metrics = (
        "Mean ± std over seeds. *Δ acc vs plain*: test accuracy minus the plain net's of the "
        "same seed, in points. *Beats plain*: difference of means >= 2 points and above the "
        "pooled std; *worse*: the same the other way. *Epochs to loss < "
        f"{b.threshold:g}*: first epoch whose mean training loss is below {b.threshold:g}, "
        "mean ± std over the seeds that reach it within the budget; *never* when none does. "
        "*Max |Δ out| at insertion*: the largest change of any logit on 512 training images between "
        "the plain net and the rewritten one before training, over all seeds (0: exact). "
        "*Opened after training*: max |new weight| of the widened layers (concat), max |a| or "
        "|g| over the gates (add rezero, highway preserve); the largest in the net, mean over "
        "seeds.")
    cost_text = (
        "ONNX Runtime CPU latency of seed 0's trained models, exported with `export_onnx` "
        "(dynamo exporter, parity-checked) as trained and after `fold`, relative to the plain "
        "net: one process, 1 intra-op thread, ORT_ENABLE_ALL, warm-up "
        f"{b.latency_warmup} runs per session, then {b.latency_rounds} alternating rounds in "
        f"rotating order, the fastest of {b.latency_runs} back-to-back runs per model per round; "
        "the ratio is the median over rounds of the model's time over the plain net's in the "
        "same round (`benchmarks/bench_onnx.py`'s method). Inputs: the first test images "
        f"(batch {', '.join(map(str, b.latency_batches))}). *ORT nodes*: nodes in ONNX Runtime's "
        "optimized graph. After training, `fold` removes nothing: the gates of add rezero are "
        "no longer 0, so they are absorbed into the weights (the Adds remain, now fused into "
        "the convolutions); add standard has no gate to fold (its Adds remain, `plain`); a "
        "concat's widened layer has trained non-zero new weights, so the concatenation stays "
        "and the layer stays widened (`plain`); a highway keeps its transform gate "
        "(`kept`: T = sigmoid(W_T x + b_T) depends on the input, no exact fold). At insertion, "
        "before any training, the exact inits fold away completely (`removed`; the insertion "
        "column of the JSON).")
    parts = [header, "", method, "", metrics, "",
             "![training loss per join, mean ± std](joins_study.png)", "",
             "## Findings", "", *findings(summary, cost, budget), "",
             "## Training from scratch", "", training_table(summary), ""]
    if cost:
        parts += ["## Inference cost (ONNX Runtime, CPU, 1 thread)", "", cost_text, "",
                  latency_table(cost, budget), ""]
    return "\n".join(parts)


# -- command line ----------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the results (default examples/results/; with --quick "
                        "examples/results/quick/, so a smoke run never replaces them)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test (~30 s): mlp4 and cnn4, 2 seeds, 2 epochs, 256 "
                        "training samples; latency of mlp4 only, 3 rounds, one variant per join "
                        f"({', '.join(QUICK_LATENCY)})")
    parser.add_argument("--nets", default=None,
                        help=f"comma-separated mlp<depth>/cnn<depth> (default "
                        f"{','.join(NETS)}; --quick: {','.join(QUICK_NETS)})")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)} (default: all; "
                        "plain is always run)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 30)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="latency rounds (default 40; 0 skips the latency measurement)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: steady on a shared machine)")
    args = parser.parse_args(argv)
    nets = [n.strip() for n in (args.nets or ",".join(QUICK_NETS if args.quick else NETS))
            .split(",") if n.strip()]
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        for n in nets:
            parse_net(n)
    except ValueError as exc:
        parser.error(str(exc))
    if not nets or not set(chosen) <= set(VARIANTS):
        parser.error(f"--variants takes {', '.join(VARIANTS)}")
    variants = [v for name, v in VARIANTS.items() if name in {"plain", *chosen}]

    budget = Budget()
    if args.quick:
        budget.epochs, budget.seeds, budget.train_samples = 2, 2, 256
        budget.latency_rounds, budget.latency_warmup = 3, 2
        budget.latency_nets = (nets[0],)
        # each export costs ~2 s (torch.onnx's dynamo exporter): one variant per join
        budget.latency_variants = QUICK_LATENCY
    budget.seeds = args.seeds if args.seeds is not None else budget.seeds
    budget.epochs = args.epochs if args.epochs is not None else budget.epochs
    budget.latency_rounds = args.rounds if args.rounds is not None else budget.latency_rounds
    if budget.seeds < 1 or budget.epochs < 1 or budget.latency_rounds < 0:
        parser.error("--seeds and --epochs take integers >= 1, --rounds >= 0")
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    start, cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    data = td.load_data(0)
    if budget.train_samples is not None:
        data["x_train"] = data["x_train"][:budget.train_samples]
        data["y_train"] = data["y_train"][:budget.train_samples]
    runs, keep = [], {}
    for net in nets:
        for seed in range(budget.seeds):
            for variant in variants:
                r = run_one(net, variant, data, budget, seed, keep if seed == 0 else None)
                runs.append(r)
                print(f"[{net} seed {seed}] {variant.name:16s} acc {r['test_acc']:6.1%}  loss "
                      f"{r['final_loss']:.4f}  to<{budget.threshold:g}: "
                      f"{r['epochs_to'] or 'never':>5}  +{r['params_added']:,} params  "
                      f"change {r['max_change']:.3g}  {r['seconds']:.1f} s", flush=True)
    train_seconds = time.perf_counter() - start
    cost = {}
    if budget.latency_rounds:
        for net in budget.latency_nets or nets:
            cost[net] = latency(net, keep, data, budget)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu

    import onnxruntime

    summary = summarise(runs, budget)
    command = " ".join(["python examples/joins_study.py", *argv])
    machine = (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs shared with "
               f"other jobs (load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end), "
               f"Python {platform.python_version()}, torch {torch.__version__}, onnxruntime "
               f"{onnxruntime.__version__}, {args.threads} torch thread(s)")
    header = (f"Command: `{command}`; {seconds / 60:.1f} min wall ({train_seconds / 60:.1f} min "
              f"training), {cpu / 60:.1f} min CPU, on {machine}.")
    report = {"command": command, "machine": machine, "seconds": seconds,
              "train_seconds": train_seconds, "cpu_seconds": cpu, "budget": asdict(budget),
              "variants": {v.name: asdict(v) for v in variants}, "summary": summary,
              "latency": cost, "runs": runs}
    paths = [write_atomic(out / f"{NAME}.json", json.dumps(json_ready(report), indent=1,
                                                            allow_nan=False)),
             write_atomic(out / f"{NAME}.md", markdown(summary, cost, budget, header,
                                                      len(data["y_test"])) + "\n"),
             plot(runs, summary, out / f"{NAME}.png")]
    print()
    print(training_table(summary))
    if cost:
        print()
        print(latency_table(cost, budget))
    print()
    print("\n".join(findings(summary, cost, budget)))
    print(f"\n{header}")
    for p in paths:
        print(f"wrote {p}")
    return report


if __name__ == "__main__":
    main()
