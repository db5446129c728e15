"""Rewiring the residual stream with ``rewire``: does DWA or hyper-connections pay on a small
byte-level Llama, from scratch or as a retrofit of a trained model?

The corpus, the model and the training loop are deepen_study.py's (the Python standard
library's own ``*.py`` files as bytes, offline; a small transformers Llama; AdamW with a
linear warm-up). Several seeds, each variant of a seed seeing the same batches:

(a) from scratch: plain vs ``dwa`` vs ``hyper`` (n = 4), each rewired at initialisation
    (exact, so every variant of a seed starts from the same function), trained for the same
    steps; the validation loss is reported at equal steps and, from each curve, at the wall
    time the plain model needed (equal wall time);
(b) retrofit: a plain model trained first, then trained further for the same steps as it
    is, or rewired (``dwa``, ``hyper``) first.

    python examples/rewire_study.py            # the full study (FULL): about 15 min, 1 thread
    python examples/rewire_study.py --quick    # smoke test, about a minute

The full run uses deepen_study's model and corpus, narrower and with fewer steps (``FULL``:
width 64, 400 steps from scratch, 250 more for the retrofit, 3 seeds), so that it fits in 20
minutes on one thread of a shared 2-core machine. Writes rewire_study.md (tables),
rewire_study.json (every curve) and rewire_study.png (validation loss vs step and vs wall
time, scratch and retrofit) into --out (default examples/results/; with --quick
examples/results/quick/), each atomically. Needs transformers and matplotlib.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

try:
    from .deepen_study import (RESULTS, Settings, _paired, _pm, lm_eval, lm_model,
                               mean_std, stdlib_corpus, windows, write_text)
except ImportError:  # run as a script: python examples/rewire_study.py
    from deepen_study import (RESULTS, Settings, _paired, _pm, lm_eval, lm_model,
                              mean_std, stdlib_corpus, windows, write_text)
from ressurgeon import RewireConfig, rewire
from ressurgeon._io import atomic_path

KINDS = {"plain": None, "dwa": RewireConfig(kind="dwa"),
         "hyper": RewireConfig(kind="hyper", n=4)}
COLOURS = {"plain": "tab:gray", "dwa": "tab:blue", "hyper": "tab:orange"}

# deepen_study's model and corpus, narrower (width 64, not 96) and with fewer steps than its
# 600 + 400, so that the full run fits in 20 minutes on one thread of the shared 2-core machine:
# a first full run at 500 + 300 steps took 5.5 to 10 minutes a seed there under load (over 20 in
# all), so 400 + 250, about 4.5 minutes a seed on a moderately loaded machine
FULL = replace(Settings(), width=64, base_steps=400, more_steps=250)
QUICK = replace(Settings(), seeds=(0, 1), width=32, layers=2, context=32, lm_batch=4,
                base_steps=6, more_steps=4, eval_every=3, eval_windows=16, warmup=2)


@dataclass
class Run:
    """One variant of one seed: its validation curve with the wall time of each point."""

    part: str                                 # "scratch" or "retrofit"
    variant: str
    seed: int
    curve: list[tuple[int, float, float]]     # (step, seconds, validation loss)
    final_loss: float
    params: int
    extra: dict = field(default_factory=dict)


def train(model, train_data, val, s: Settings, steps: int, lr: float, seed: int
          ) -> list[tuple[int, float, float]]:
    """deepen_study's loop (AdamW, warm-up, clipping), timing the training steps only."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / s.warmup))
    gen = torch.Generator().manual_seed(seed)
    spent, curve = 0.0, [(0, 0.0, lm_eval(model, val))]
    for step in range(1, steps + 1):
        start = time.perf_counter()
        model.train()
        batch = windows(train_data, s.lm_batch, s.context, gen)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        spent += time.perf_counter() - start
        if step % s.eval_every == 0 or step == steps:
            curve.append((step, spent, lm_eval(model, val)))
    return curve


def at_time(curve, seconds: float) -> float:
    """The validation loss of the last evaluation at or before ``seconds`` of training."""
    return [loss for _, t, loss in curve if t <= seconds + 1e-9][-1]


def plain_loss(runs: list[Run], seed: int) -> float:
    return next(r.final_loss for r in runs if r.part == "scratch" and r.seed == seed
                and r.variant == "plain")


def rewired(model, example, kind: str):
    return model if KINDS[kind] is None else rewire(model, (example,), KINDS[kind]).module


def study(s: Settings, log=print) -> tuple[list[Run], dict]:
    import transformers

    transformers.logging.set_verbosity_error()
    train_data, val_data, info = stdlib_corpus(s)
    val = windows(val_data, s.eval_windows, s.context, torch.Generator().manual_seed(1234))
    runs = []
    for seed in s.seeds:
        torch.manual_seed(seed)
        init = lm_model(s)
        trained = {}
        for kind in KINDS:   # (a) from scratch, every variant from the same initial function
            model = rewired(copy.deepcopy(init), val[:2], kind)
            curve = train(model, train_data, val, s, s.base_steps, s.base_lr, seed + 100)
            trained[kind] = model
            runs.append(Run("scratch", kind, seed, curve, curve[-1][2],
                            sum(p.numel() for p in model.parameters())))
            log(f"scratch seed {seed} {kind:6s} val {curve[-1][2]:.4f} ({curve[-1][1]:.0f} s)")
        plain_time = next(r for r in runs if r.part == "scratch" and r.seed == seed
                          and r.variant == "plain").curve[-1][1]
        for r in runs:
            if r.part == "scratch" and r.seed == seed:
                r.extra["at_plain_time"] = at_time(r.curve, plain_time)
        base = trained["plain"]   # (b) retrofit of the plain model trained in (a)
        for kind in KINDS:
            model = rewired(copy.deepcopy(base), val[:2], kind)
            curve = train(model, train_data, val, s, s.more_steps, s.more_lr, seed + 200)
            runs.append(Run("retrofit", kind, seed, curve, curve[-1][2],
                            sum(p.numel() for p in model.parameters()),
                            {"base_loss": plain_loss(runs, seed)}))
            log(f"retrofit seed {seed} {kind:6s} val {curve[-1][2]:.4f}")
    return runs, info


def table(runs: list[Run], s: Settings) -> str:
    lines = ["| part | variant | params | val loss at equal steps | minus plain (paired) | "
             "lower in | val loss at plain's wall time |", "|---|---|---|---|---|---|---|"]
    for part in ("scratch", "retrofit"):
        mine = [r for r in runs if r.part == part]
        for kind in KINDS:
            rs = [r for r in mine if r.variant == kind]
            timed = (_pm([r.extra["at_plain_time"] for r in rs]) if part == "scratch"
                     else "-")
            lines.append(f"| {part} | {kind} | {rs[0].params:,} | "
                         f"{_pm([r.final_loss for r in rs])} | "
                         f"{_paired(mine, kind, against='plain')} | {timed} |")
    return "\n".join(lines)


# a paired difference smaller than this (nats/byte) is not a gain worth a rewiring, whatever
# its sign: the seeds' own spread at this size is of that order
MATTERS = 0.005


def verdict(diffs: list[float]) -> str:
    m, sd = mean_std(diffs)
    if all(d < 0 for d in diffs) and -m >= max(MATTERS, sd):
        return "pays"
    if all(d > 0 for d in diffs) and m >= max(MATTERS, sd):
        return "is worse"
    return "does not pay (no difference beyond the seeds' spread or 0.005)"


def findings(runs: list[Run]) -> list[str]:
    """One sentence per rewired variant and part: the paired difference against plain at equal
    steps (and, from scratch, at the plain model's wall time), and whether it pays."""
    lines = []
    for part in ("scratch", "retrofit"):
        plain = {r.seed: r for r in runs if r.part == part and r.variant == "plain"}
        for kind in [k for k in KINDS if k != "plain"]:
            mine = [r for r in runs if r.part == part and r.variant == kind]
            diffs = [r.final_loss - plain[r.seed].final_loss for r in mine]
            m, sd = mean_std(diffs)
            line = (f"- {part}, {kind}: {m:+.4f} ± {sd:.4f} nats/byte against plain at equal "
                    f"steps, lower in {sum(d < 0 for d in diffs)}/{len(diffs)} seeds: "
                    f"{verdict(diffs)}")
            if part == "scratch":
                timed = [r.extra["at_plain_time"] - plain[r.seed].final_loss for r in mine]
                tm, tsd = mean_std(timed)
                slower = statistics.fmean(r.curve[-1][1] / plain[r.seed].curve[-1][1]
                                          for r in mine)
                line += (f"; at the plain model's wall time {tm:+.4f} ± {tsd:.4f}: "
                         f"{verdict(timed)} (its {mine[0].curve[-1][0]} steps took "
                         f"{slower:.2f}x the plain model's time)")
            lines.append(line + ".")
    return lines


def plot(runs: list[Run], s: Settings, path: Path) -> Path:
    """Validation loss (mean ± std over seeds) vs step and vs wall time, scratch and retrofit."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2)
    for row, part in zip(axes, ("scratch", "retrofit")):
        for kind in KINDS:
            sel = [r for r in runs if r.part == part and r.variant == kind]
            if not sel:
                continue
            steps = [p[0] for p in sel[0].curve]
            ys = [[p[2] for p in r.curve] for r in sel]
            mean = [statistics.fmean(col) for col in zip(*ys)]
            sd = [statistics.stdev(col) if len(col) > 1 else 0.0 for col in zip(*ys)]
            secs = [statistics.fmean(col) for col in zip(*[[p[1] for p in r.curve]
                                                             for r in sel])]
            for ax, xs in zip(row, (steps, secs)):
                ax.plot(xs, mean, color=COLOURS[kind], label=kind, linewidth=1.6)
                ax.fill_between(xs, [m - d for m, d in zip(mean, sd)],
                                [m + d for m, d in zip(mean, sd)], color=COLOURS[kind],
                                alpha=0.15)
        what = ("from scratch" if part == "scratch" else
                f"retrofit (after {s.base_steps} plain steps)")
        for ax, xlabel in zip(row, ("training step", "training wall time (s, mean over seeds)")):
            ax.set_title(f"{what}, vs {xlabel.split(' (')[0]}", fontsize=10)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation loss (nats/byte)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8, frameon=False)
            low = min(p[2] for r in runs if r.part == part for p in r.curve[1:]) \
                if any(len(r.curve) > 1 for r in runs if r.part == part) else None
            if low is not None and part == "scratch":   # the first point (8 nats) flattens it
                ax.set_ylim(top=low + 1.5 * (statistics.fmean(
                    r.curve[1][2] for r in runs if r.part == part) - low) + 1e-3)
    fig.suptitle(f"rewire on a byte-level Llama ({s.layers} layers, width {s.width}): "
                 f"mean ± std over {len(s.seeds)} seeds", fontsize=11)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def main(argv: list[str] | None = None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings, one seed pair")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the results (default examples/results/, with --quick "
                        "examples/results/quick/ so a smoke run never replaces the committed "
                        "results)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    start, load = time.perf_counter(), os.getloadavg()[0]
    try:
        runs, info = study(s)
    finally:
        torch.set_num_threads(before)
    total = time.perf_counter() - start
    command = "python examples/rewire_study.py" + (" --quick" if args.quick else "") + (
        f" --threads {args.threads}" if args.threads != 1 else "")
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs (load "
               f"average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end), torch "
               f"{torch.__version__}, {args.threads} torch thread(s)")
    text = (f"# rewire study\n\nCommand: `{command}` ({total / 60:.1f} min in all on {machine})."
            f"\n\nByte-level Llama ({s.layers} layers, width {s.width}, context {s.context}, "
            f"batch {s.lm_batch}) on {info['files']} standard-library files; seeds "
            f"{list(s.seeds)}; from scratch {s.base_steps} steps at lr {s.base_lr:g}, retrofit "
            f"{s.more_steps} more steps at lr {s.more_lr:g} after the plain model's "
            f"{s.base_steps}. Validation loss in nats/byte on {s.eval_windows} fixed windows, "
            "mean ± std over seeds; paired differences per seed (every variant of a seed sees "
            "the same batches and starts from the same function). The wall-time column reads "
            "each curve at the plain model's training time; those times were taken on a shared "
            "2-core machine under load (other jobs running), so they are noisy and only the "
            "order of magnitude of a time ratio means anything."
            f"\n\n{table(runs, s)}\n\n" + "\n".join(findings(runs)) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "rewire_study.md", text)
    write_text(out / "rewire_study.json", json.dumps(
        {"settings": asdict(s), "command": command, "machine": machine, "seconds": total,
         "corpus": info, "runs": [asdict(r) for r in runs]}, indent=1))
    plot(runs, s, out / "rewire_study.png")
    print(text)
    return runs


if __name__ == "__main__":
    main()
