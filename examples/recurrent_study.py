"""Shortcuts between the layers of a deep LSTM stack: do they help it train, from scratch or
retrofitted to a trained stack? (issue 24 §5)

A byte-level language model on the Python standard library's own ``*.py`` files (deepen_study's
corpus, offline on every machine): ``Embedding(256, W)`` -> one ``nn.LSTM(W, W,
num_layers=8)`` -> ``Linear(W, 256)``, no residuals. The stack is one fused module, as stacked
LSTMs are usually written; ressurgeon splits it exactly into eight one-layer LSTMs holding the
same parameters, and ``SkipConfig(span=1)`` then finds the seven identity shortcuts between
them. Several seeds; every variant of a seed sees the same batches:

(a) from scratch, every variant from the seed's initial weights: plain; ``init="standard"``
    (``x + LSTM_i(x)``); ``init="rezero"`` (``x + a*LSTM_i(x)``, a = 0);
(b) retrofit: the plain stack trained in (a), trained further for the same steps as it is, or
    after ``add_skips`` with ``init="preserve"`` (``h + a*x``, a = 0: exact) or
    ``init="morph"`` (exact, opened by ``training.ShortcutRamp``), optimizer groups from
    ``training.param_groups`` (retrofit_study's recipe).

Recorded: the validation loss (nats/byte, fixed held-out windows) along training, the training
loss, and the gradient norm at the first LSTM layer's input weights at the start of each run.

    python examples/recurrent_study.py            # the full study, ~12 min on one CPU thread
    python examples/recurrent_study.py --quick    # smoke test, seconds

Writes recurrent_study.md (the table), recurrent_study.json (settings, machine, every curve) and
recurrent_study.png (validation curves, mean ± std) into --out (default examples/results/; with
--quick examples/results/quick/), each atomically. Needs matplotlib; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ressurgeon import SkipConfig, add_skips
from ressurgeon._io import atomic_path
from ressurgeon.gates import gate_report
from ressurgeon.training import ShortcutRamp, param_groups

try:
    from .deepen_study import RESULTS, _paired, _pm, stdlib_corpus, windows
    from .retrofit_study import shared_machine, write_results
except ImportError:  # run as a script: python examples/recurrent_study.py
    from deepen_study import RESULTS, _paired, _pm, stdlib_corpus, windows
    from retrofit_study import shared_machine, write_results

NAME = "recurrent_study"
MATTERS = 0.01   # nats/byte: smaller paired differences are reported as no difference
SCRATCH = {"plain": None, "standard": "standard", "rezero": "rezero"}
RETROFIT = {"plain": None, "preserve": "preserve", "morph": "morph"}
LABELS = {("scratch", "plain"): "plain", ("scratch", "standard"): "standard shortcuts",
          ("scratch", "rezero"): "rezero shortcuts",
          ("retrofit", "plain"): "plain, trained further as it is",
          ("retrofit", "preserve"): "preserve shortcuts", ("retrofit", "morph"): "morph shortcuts"}


@dataclass
class Settings:
    """Everything that decides a run."""

    seeds: tuple[int, ...] = (0, 1, 2)
    width: int = 64
    depth: int = 8
    context: int = 64
    batch: int = 16
    steps: int = 600              # (a) from scratch; the retrofit's base is (a)'s plain run
    more_steps: int = 300         # (b) retrofit: further steps for every variant
    lr: float = 3e-3              # AdamW, linear warm-up then constant, gradient clip 1
    more_lr: float = 1e-3
    warmup: int = 30
    ramp_steps: int = 30          # morph: ShortcutRamp opens the shortcuts over these steps
    eval_every: int = 50
    eval_windows: int = 128
    val_every: int = 10           # every 10th file (sorted by name) is validation


@dataclass
class Run:
    """One variant of one seed."""

    part: str                                 # "scratch" or "retrofit"
    variant: str
    seed: int
    curve: list[tuple[int, float, float]]     # (step, seconds of training, validation loss)
    train_curve: list[tuple[int, float]]      # (step, mean training loss since the last point)
    final_loss: float
    params: int
    shortcuts: int
    grad_first: float                         # |grad| of the first LSTM's weight_ih at the start
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


class ByteLSTM(nn.Module):
    """Embedding -> one multi-layer nn.LSTM (batch first) -> a linear head over the 256 bytes."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.lstm = nn.LSTM(width, width, num_layers=depth, batch_first=True)
        self.head = nn.Linear(width, 256)

    def forward(self, x):
        return self.head(self.lstm(self.embed(x))[0])


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats/byte) of windows of context + 1 bytes."""
    return F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())


def evaluate(model: nn.Module, val: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        total = sum(lm_loss(model, val[i:i + 64]).item() * len(val[i:i + 64])
                    for i in range(0, len(val), 64))
    model.train()
    return total / len(val)


def first_grad(model: nn.Module, batch: torch.Tensor) -> float:
    """The gradient norm at the first LSTM layer's input weights (fused or split alike)."""
    weight = next(p for n, p in model.named_parameters() if n.endswith("weight_ih_l0"))
    model.zero_grad(set_to_none=True)
    lm_loss(model, batch).backward()
    norm = weight.grad.norm().item()
    model.zero_grad(set_to_none=True)
    return norm


def with_shortcuts(model: nn.Module, init: str | None, example: torch.Tensor):
    """(a copy of ``model`` with shortcuts between its LSTM layers, how many, its largest output
    change at insertion); ``init`` None: a plain copy."""
    model = copy.deepcopy(model)
    if init is None:
        return model, 0, 0.0
    result = add_skips(model.eval(), (example,), SkipConfig(span=1, init=init))
    return result.module.train(), len(result.skips), result.parity.max_abs_diff


def train(model: nn.Module, data: torch.Tensor, val: torch.Tensor, s: Settings, steps: int,
          lr: float, seed: int, ramp_steps: int = 0):
    """AdamW over ``param_groups`` (gates at their init's rate), warm-up, clipping; the batches
    come from ``seed``. Returns the validation curve (with training seconds) and the training
    loss curve."""
    opt = torch.optim.AdamW(param_groups(model, lr), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / s.warmup))
    ramp = ShortcutRamp(model, steps=ramp_steps) if ramp_steps else None
    gen = torch.Generator().manual_seed(seed)
    spent, since = 0.0, []
    curve, train_curve = [(0, 0.0, evaluate(model, val))], []
    model.train()
    for step in range(1, steps + 1):
        start = time.perf_counter()
        batch = windows(data, s.batch, s.context + 1, gen)
        if ramp is not None:
            ramp.step()              # before the forward: the first step already sees c > 0
        loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        spent += time.perf_counter() - start
        since.append(loss.item())
        if step % s.eval_every == 0 or step == steps:
            curve.append((step, spent, evaluate(model, val)))
            train_curve.append((step, statistics.fmean(since)))
            since = []
    return curve, train_curve


def study(s: Settings, log=print) -> tuple[list[Run], dict]:
    data, val_data, info = stdlib_corpus(s)
    val = windows(val_data, s.eval_windows, s.context + 1, torch.Generator().manual_seed(1234))
    probe = windows(data, s.batch, s.context + 1, torch.Generator().manual_seed(999))
    example = val[:2, :-1]
    log(f"corpus: {info['files']} files under {info['root']}, {info['train_bytes'] / 1e6:.2f} MB "
        f"training, {info['val_bytes'] / 1e6:.2f} MB validation ({info['val_files']} files)")
    runs: list[Run] = []

    def record(part, variant, seed, model, shortcuts, change, steps, lr, batches, ramp=0):
        start = time.perf_counter()
        grad = first_grad(model, probe)
        curve, train_curve = train(model, data, val, s, steps, lr, batches, ramp)
        gates = {k: v for k, v in gate_report(model).values.items() if v is not None} \
            if shortcuts else {}
        run = Run(part, variant, seed, curve, train_curve, curve[-1][2],
                  sum(p.numel() for p in model.parameters()), shortcuts, grad,
                  time.perf_counter() - start,
                  {"change_at_insertion": change, "gates_at_end": gates})
        runs.append(run)
        opened = (f", mean |gate| {statistics.fmean(map(abs, gates.values())):.3f}"
                  if gates else "")
        log(f"{part:8s} seed {seed} {variant:9s} val {curve[0][2]:.4f} -> {run.final_loss:.4f} "
            f"nats/byte, |grad first LSTM| {grad:.2e}, {shortcuts} shortcuts{opened} "
            f"({run.seconds:.0f} s)")
        return model

    for seed in s.seeds:
        torch.manual_seed(seed)
        init = ByteLSTM(s.width, s.depth)
        trained = None
        for variant, how in SCRATCH.items():   # (a): same initial weights, same batches
            model, count, change = with_shortcuts(init, how, example)
            model = record("scratch", variant, seed, model, count, change, s.steps, s.lr,
                           seed + 100)
            trained = model if how is None else trained
        for variant, how in RETROFIT.items():  # (b): from (a)'s trained plain stack
            model, count, change = with_shortcuts(trained, how, example)
            record("retrofit", variant, seed, model, count, change, s.more_steps, s.more_lr,
                   seed + 200, s.ramp_steps if how == "morph" else 0)
    return runs, info


# -- reporting ----------------------------------------------------------------------------------

def table(runs: list[Run], s: Settings) -> str:
    lines = ["| part | variant | shortcuts | params | validation loss (nats/byte) | "
             "minus plain (paired) | lower in | grad at first LSTM, start | s per run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for part, variants in (("scratch", SCRATCH), ("retrofit", RETROFIT)):
        mine = [r for r in runs if r.part == part]
        for variant in variants:
            sel = [r for r in mine if r.variant == variant]
            if not sel:
                continue
            steps = s.steps if part == "scratch" else s.more_steps
            lines.append(f"| {part} ({steps} steps) | {LABELS[part, variant]} | "
                         f"{sel[0].shortcuts} | {sel[0].params:,} | "
                         f"{_pm([r.final_loss for r in sel])} | "
                         f"{_paired(mine, variant, against='plain')} | "
                         f"{_pm([r.grad_first for r in sel], '.2e')} | "
                         f"{statistics.fmean(r.seconds for r in sel):.0f} |")
        if part == "retrofit" and mine:
            base = [r.curve[0][2] for r in mine if r.variant == "plain"]
            lines.append(f"| retrofit, before | *plain trained {s.steps} steps* | | | "
                         f"{_pm(base)} | | | | |")
    return "\n".join(lines)


def mean_gate(run: Run) -> float | None:
    gates = run.extra["gates_at_end"]
    return statistics.fmean(abs(v) for v in gates.values()) if gates else None


def findings(runs: list[Run], s: Settings) -> list[str]:
    """One sentence per variant against plain: the paired difference and its spread."""
    lines = []
    for part, variants in (("scratch", SCRATCH), ("retrofit", RETROFIT)):
        mine = [r for r in runs if r.part == part]
        plain = {r.seed: r.final_loss for r in mine if r.variant == "plain"}
        for variant in list(variants)[1:]:
            diffs = [r.final_loss - plain[r.seed] for r in mine if r.variant == variant]
            if not diffs:
                continue
            m = statistics.fmean(diffs)
            sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            # a difference counts when it exceeds its spread, has one sign in every seed and
            # is not negligible (below MATTERS nats/byte it changes no prediction noticeably)
            clear = (abs(m) > max(sd, MATTERS) and all((d < 0) == (m < 0) for d in diffs))
            verdict = (("lower than" if m < 0 else "higher than") if clear else
                       "no different from" if abs(m) < MATTERS else "within noise of")
            gates = [mean_gate(r) for r in mine if r.variant == variant and mean_gate(r)]
            opened = f"; mean gate magnitude at the end {_pm(gates, '.3f')}" if gates else ""
            lines.append(f"- {part}, {LABELS[part, variant]}: validation loss {m:+.4f} ± "
                         f"{sd:.4f} nats/byte against plain (paired over {len(diffs)} seeds, "
                         f"lower in {sum(d < 0 for d in diffs)}), {verdict} plain{opened}.")
    return lines


COLOURS = {"plain": "tab:gray", "standard": "tab:blue", "rezero": "tab:green",
           "preserve": "tab:orange", "morph": "tab:purple"}


def plot(runs: list[Run], s: Settings, path: Path) -> Path:
    """Validation loss per step (solid) and training loss (dotted), mean ± std over seeds."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (part, variants) in zip(axes, (("scratch", SCRATCH), ("retrofit", RETROFIT))):
        for variant in variants:
            sel = [r for r in runs if r.part == part and r.variant == variant]
            if not sel:
                continue
            colour = COLOURS[variant]
            xs = [p[0] for p in sel[0].curve]
            ys = [[p[2] for p in r.curve] for r in sel]
            mean = [statistics.fmean(col) for col in zip(*ys)]
            sd = [statistics.stdev(col) if len(col) > 1 else 0.0 for col in zip(*ys)]
            plain = variant == "plain"   # wide and underneath: preserve can hide it
            ax.plot(xs, mean, color=colour, label=LABELS[part, variant],
                    linewidth=3.0 if plain else 1.6, zorder=1 if plain else 2)
            ax.fill_between(xs, [m - d for m, d in zip(mean, sd)],
                            [m + d for m, d in zip(mean, sd)], color=colour, alpha=0.15)
            train_mean = [statistics.fmean(col) for col in
                          zip(*[[p[1] for p in r.train_curve] for r in sel])]
            ax.plot([p[0] for p in sel[0].train_curve], train_mean, color=colour,
                    linestyle=":", linewidth=1.0)
        ax.set_title(f"from scratch, {s.steps} steps" if part == "scratch" else
                     f"retrofit: {s.more_steps} more steps after {s.steps} plain", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/byte): validation solid, training dotted")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7.5, frameon=False)
    fig.suptitle(f"Byte-level LSTM, {s.depth} layers of width {s.width}: shortcuts between "
                 f"layers (mean ± std over {len(s.seeds)} seeds)", fontsize=11)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def main(argv: list[str] | None = None) -> list[Run]:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the results (default examples/results/; with --quick "
                        "examples/results/quick/)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: width 16, context 16, 2 seeds, a few steps")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps from scratch (default 600); the retrofit trains half as many")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    s = Settings()
    if args.quick:
        s = replace(s, seeds=(0, 1), width=16, context=16, batch=4, steps=6, more_steps=4,
                    warmup=2, ramp_steps=2, eval_every=3, eval_windows=16)
    if args.seeds is not None:
        s = replace(s, seeds=tuple(range(args.seeds)))
    if args.steps is not None:
        s = replace(s, steps=args.steps, more_steps=max(1, args.steps // 2),
                    ramp_steps=max(1, args.steps // 20))
    if not s.seeds or s.steps < 1:
        parser.error("--seeds and --steps take integers >= 1")
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    start, load = time.perf_counter(), os.getloadavg()[0]
    runs, corpus = study(s)
    seconds = time.perf_counter() - start
    command = " ".join(["python examples/recurrent_study.py", *argv])
    machine = shared_machine(args.threads, load)
    changes = [r.extra["change_at_insertion"] for r in runs if r.part == "retrofit"]
    text = "\n".join([
        f"Command: `{command}`; {seconds / 60:.1f} min wall on {machine}.", "",
        f"Byte-level LSTM language model: `Embedding(256, {s.width})` -> `nn.LSTM({s.width}, "
        f"{s.width}, num_layers={s.depth})` -> `Linear({s.width}, 256)`, no residuals. Corpus: "
        f"the {corpus['files']} top-level `*.py` files of {corpus['root']} (every "
        f"{s.val_every}th by name held out: {corpus['val_bytes'] / 1e6:.2f} MB; training "
        f"{corpus['train_bytes'] / 1e6:.2f} MB). AdamW (groups from `param_groups`), batch "
        f"{s.batch} x {s.context} bytes, {s.warmup}-step warm-up, gradient clip 1. From "
        f"scratch: {s.steps} steps at lr {s.lr:g}, every variant from the seed's initial "
        f"weights and batches, shortcuts from `add_skips(..., SkipConfig(span=1, init=...))` "
        "(the fused LSTM split exactly; identities between its layers). Retrofit: the plain "
        f"stack trained in (a), then {s.more_steps} more steps at lr {s.more_lr:g} for every "
        f"variant (the same batches); morph's `ShortcutRamp` opens over {s.ramp_steps} steps; "
        f"largest output change at insertion {max(changes, default=0.0):g}. Validation: "
        f"{s.eval_windows} fixed held-out windows, nats/byte; seeds "
        f"{', '.join(map(str, s.seeds))}; mean ± std over seeds, differences paired per seed. "
        "Gradient: the norm at the first LSTM layer's `weight_ih_l0` on one fixed batch, "
        "before the run's first step.", "",
        table(runs, s), "", *findings(runs, s), ""])
    report = {"command": command, "machine": machine, "seconds": seconds,
              "settings": asdict(s), "corpus": corpus, "runs": [asdict(r) for r in runs]}
    write_results(out, NAME, report, text, lambda path: plot(runs, s, path))
    return runs


if __name__ == "__main__":
    main()
