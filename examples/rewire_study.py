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

    python -m examples.rewire_study            # the full study; long on a shared CPU
    python -m examples.rewire_study --quick    # smoke test, about a minute

Writes rewire_study.md (tables) and rewire_study.json (every curve) into --out (default
examples/results/; with --quick examples/results/quick/), each atomically. Needs transformers.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

try:
    from .deepen_study import (RESULTS, Settings, _paired, _pm, lm_eval, lm_model,
                               stdlib_corpus, windows, write_text)
except ImportError:  # run as a script: python examples/rewire_study.py
    from deepen_study import (RESULTS, Settings, _paired, _pm, lm_eval, lm_model,
                              stdlib_corpus, windows, write_text)
from ressurgeon import RewireConfig, rewire

KINDS = {"plain": None, "dwa": RewireConfig(kind="dwa"),
         "hyper": RewireConfig(kind="hyper", n=4)}


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


def main(argv: list[str] | None = None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings, one seed pair")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    s = Settings()
    if args.quick:
        s = replace(s, seeds=(0, 1), width=32, layers=2, context=32, lm_batch=4,
                    base_steps=6, more_steps=4, eval_every=3, eval_windows=16, warmup=2)
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    runs, info = study(s)
    text = (f"# rewire study\n\nByte-level Llama ({s.layers} layers, width {s.width}) on "
            f"{info['files']} standard-library files; seeds {list(s.seeds)}; from scratch "
            f"{s.base_steps} steps, retrofit {s.more_steps} more steps after {s.base_steps}. "
            "Validation loss in nats/byte, mean ± std over seeds; paired differences per seed."
            f"\n\n{table(runs, s)}\n")
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "rewire_study.md", text)
    write_text(out / "rewire_study.json", json.dumps(
        {"settings": asdict(s), "corpus": info, "runs": [asdict(r) for r in runs]}, indent=1))
    print(text)
    return runs


if __name__ == "__main__":
    main()
