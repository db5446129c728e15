"""Shortcuts for a *trained* plain network: which retrofit recipe pays off (issue 15).

A plain network (Linear/Conv + ReLU, no normalisation) is trained from
scratch, then fine-tuned for the same budget (10 epochs, a fresh Adam at lr
1e-3, batch 64, the same batches for every recipe of a seed) in each of
these ways, all through ressurgeon's own API (``add_skips`` with
``SkipConfig(span=2, init=...)``, ``training.param_groups``,
``training.ShortcutRamp``):

- plain: no surgery;
- preserve: ``h + a*S(x)``, a = 0, gate learning rate x1 (param_groups' default);
- preserve_x30: the same with the gates at 30x the learning rate (the old README's advice);
- morph: ``(1-c+a)*h + c*S(x)``, c ramped 0 -> 1 over the first epoch by ShortcutRamp,
  gate learning rate x0.3 (param_groups' default): exact at insertion, ends as rezero;
- morph_x1: the same with the gates at the weights' learning rate (checks that default);
- rezero (``S(x) + a*h``) and standard (``h + S(x)``): not exact, for reference;
- two references that spend the same budget on a fresh net instead: shallow (the plain net
  with every span removed) and scratch (the plain net with standard shortcuts).

Four settings: MLPs of depth 10 and 20 and a 10-layer CNN on scikit-learn's
digits, and a 16-layer MLP on a synthetic ``make_classification`` task
(synth16). For each recipe it records the largest output change at insertion,
test accuracy right after surgery, after each epoch and at the end, the mean
accuracy drop when one block is deleted (Veit et al. 2016; the block then
computes only its shortcut term, a plain net's two layers become the
identity), the accuracy with every block deleted, and the mean |gate|.

    python examples/retrofit_study.py            # the full study, 5 seeds: ~6 min on one CPU thread
    python examples/retrofit_study.py --quick    # smoke test, seconds

Writes into --out (default examples/results/; --quick: examples/results/quick/):
retrofit_study.json (every per-seed number), retrofit_study.md (the tables)
and retrofit_study.png (test accuracy during fine-tuning, mean +- std), each
atomically. Needs scikit-learn and matplotlib; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ressurgeon import SkipConfig, add_skips
from ressurgeon._io import atomic_path
from ressurgeon.gates import gate_report
from ressurgeon.training import GATE_LR_SCALE, ShortcutRamp, param_groups

try:
    from ._digits import digits_cnn, digits_mlp, load_data, plain_mlp, split
except ImportError:  # run as a script: python examples/retrofit_study.py
    from _digits import digits_cnn, digits_mlp, load_data, plain_mlp, split

RESULTS = Path(__file__).resolve().parent / "results"
# --quick: every code path (digits and synthetic data, MLP and CNN, identity and projection
# shortcuts); mlp20 runs the same code as mlp10 and does not train in a quick budget
QUICK_SETTINGS = ("mlp10", "synth16", "cnn10")
NAME = "retrofit_study"


# -- what is compared ------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """A plain network, its data and how long it is pretrained."""

    name: str
    data: str                     # "digits" | "synth16"
    build: Callable[[], nn.Module]
    pretrain_epochs: int
    about: str
    input_shape: tuple[int, ...] | None = None   # per-sample view the net takes, if not flat


SETTINGS = {s.name: s for s in (
    Setting("mlp10", "digits", partial(digits_mlp, 10, 64), 15,
            "digits, MLP 10 x Linear(64)+ReLU: plain training copes"),
    Setting("mlp20", "digits", partial(digits_mlp, 20, 64), 20,
            "digits, MLP 20 x Linear(64)+ReLU: plain training struggles"),
    Setting("synth16", "synth16", partial(plain_mlp, [64] * 8 + [32] * 8, 40, 8), 20,
            "synthetic 8-class task, MLP 16 layers (64 x 8 then 32 x 8: one projection span)"),
    Setting("cnn10", "digits", partial(digits_cnn, 10, (16, 32)), 15,
            "digits as 1x8x8, CNN 10 x conv3x3+ReLU (16 then 32 ch, max-pool halfway)",
            (1, 8, 8)),
)}


@dataclass(frozen=True)
class Recipe:
    """How the trained net is changed before fine-tuning, and the gates' learning rate."""

    name: str
    init: str | None              # SkipConfig init; None: no surgery
    label: str
    gate_lr_scale: float | None = None   # x the weights' lr; None: param_groups' default
    ramp_epochs: float = 0.0      # morph: epochs over which ShortcutRamp opens the shortcuts
    from_scratch: bool = False    # a reference: a fresh net with standard shortcuts ...
    shallow: bool = False         # ... and every span removed (each block computes S(x) only)
    exact: bool = False           # the trained function is unchanged at insertion

    def gate_scale(self) -> float | None:
        if self.init is None or self.init == "standard":
            return None
        return self.gate_lr_scale if self.gate_lr_scale is not None else GATE_LR_SCALE[self.init]


RECIPES = {r.name: r for r in (
    Recipe("plain", None, "plain fine-tuning (no surgery)"),
    Recipe("preserve", "preserve", "preserve", exact=True),
    Recipe("preserve_x30", "preserve", "preserve, gate lr x30", gate_lr_scale=30.0, exact=True),
    Recipe("morph", "morph", "morph, ramp 1 epoch", ramp_epochs=1.0, exact=True),
    Recipe("morph_x1", "morph", "morph, gate lr x1", gate_lr_scale=1.0, ramp_epochs=1.0,
           exact=True),
    Recipe("rezero", "rezero", "rezero (not exact)"),
    Recipe("standard", "standard", "standard (not exact)"),
    Recipe("shallow", "standard", "shallow net (spans removed), from scratch",
           from_scratch=True, shallow=True),
    Recipe("scratch", "standard", "standard shortcuts, from scratch", from_scratch=True),
)}


@dataclass
class Budget:
    """The training every run gets."""

    finetune_epochs: int = 10
    lr: float = 1e-3              # Adam, for pretraining and fine-tuning
    batch: int = 64
    span: int = 2
    seeds: int = 5                # usable seeds per setting
    # a pretrained net below this multiple of chance accuracy did not train: its seed is
    # replaced by the next one (the study is about trained networks)
    min_pretrained: float = 2.0
    pretrain_epochs: dict[str, int] = field(default_factory=dict)   # overrides, for --quick
    train_samples: int | None = None   # --quick: only the first ones (the split is shuffled)


# -- data ------------------------------------------------------------------------------

def load_synth16() -> dict[str, torch.Tensor]:
    """8 classes, 2 Gaussian clusters each on a 12-d informative subspace, 8 redundant and 20
    noise features, 1% label noise, 3,000 samples: non-linear (logistic regression ~60%), and a
    16-layer plain MLP trains badly on it. Fixed by ``random_state``, generated offline."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=3000, n_features=40, n_informative=12, n_redundant=8,
                               n_classes=8, n_clusters_per_class=2, class_sep=1.5, flip_y=0.01,
                               random_state=0)
    return split(x, y)


def dataset(setting: Setting, cache: dict, train_samples: int | None = None) -> dict:
    if setting.data not in cache:
        cache[setting.data] = load_data(0) if setting.data == "digits" else load_synth16()
    data = dict(cache[setting.data])
    data["classes"] = int(data["y_train"].max()) + 1
    if train_samples is not None:
        data["x_train"], data["y_train"] = (data["x_train"][:train_samples],
                                            data["y_train"][:train_samples])
    if setting.input_shape:
        for k in ("x_train", "x_test"):
            data[k] = data[k].reshape(-1, *setting.input_shape)
    return data


# -- training and measuring ------------------------------------------------------------

def train(model: nn.Module, data: dict, budget: Budget, epochs: int, seed: int, *,
          groups: list[dict] | None = None, ramp_steps: int = 0,
          curve: list[float] | None = None) -> list[float]:
    """Adam on cross-entropy, batches shuffled by ``seed`` (the same for every recipe).

    ``ramp_steps``: open morph shortcuts with a ShortcutRamp over that many steps.
    ``curve``: test accuracy is appended after every epoch. Returns the mean loss per epoch.
    """
    opt = torch.optim.Adam(groups if groups is not None else model.parameters(), lr=budget.lr)
    ramp = ShortcutRamp(model, steps=ramp_steps) if ramp_steps else None
    x, y = data["x_train"], data["y_train"]
    gen = torch.Generator().manual_seed(seed + 2)
    losses = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), budget.batch):
            idx = order[i:i + budget.batch]
            if ramp is not None:
                ramp.step()          # before the forward: the first step already sees c > 0
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(x))
        if curve is not None:
            curve.append(accuracy(model, data))
    model.eval()
    return losses


def accuracy(model: nn.Module, data: dict) -> float:
    model.eval()
    with torch.no_grad():
        return (model(data["x_test"]).argmax(1) == data["y_test"]).float().mean().item()


def steps_per_epoch(data: dict, budget: Budget) -> int:
    return math.ceil(len(data["x_train"]) / budget.batch)


def _one_operand(shortcut: nn.Module, operand: str):
    """A forward for ``shortcut`` that keeps only the terms on ``operand`` ("x" or "h").

    Read from the shortcut's own ``terms()``: with "x" the block computes its
    shortcut term alone (the span is deleted); with "h" only the span (no shortcut).
    """
    terms = [t for t in shortcut.terms() if t.operand == operand]

    def forward(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        total = None
        for term in terms:
            value = h if term.operand == "h" else x
            if term.projected:
                value = shortcut.proj(value)
            if term.coef is not None:
                value = shortcut.coefficient(term.coef) * value
            total = value if total is None else total + value
        return total
    return forward


@contextlib.contextmanager
def reduced(model: nn.Module, operands: dict[str, str]) -> Iterator[nn.Module]:
    """Run ``model`` with each named shortcut reduced to one operand's terms (see _one_operand)."""
    modules = dict(model.named_modules())
    for name, operand in operands.items():
        modules[name].forward = _one_operand(modules[name], operand)
    try:
        yield model
    finally:
        for name in operands:
            del modules[name].forward


@dataclass
class Surgery:
    """A model with shortcuts, its deletable blocks and, for a plain twin, how to stay plain."""

    module: nn.Module
    skips: list[str]              # every shortcut's module name
    blocks: list[str]             # identity shortcuts: their blocks can be deleted
    base: dict[str, str] = field(default_factory=dict)   # reductions always applied


def surgery(net: nn.Module, data: dict, init: str, span: int, seed: int,
            verify: bool = True) -> Surgery:
    torch.manual_seed(seed + 1)   # projection weights
    result = add_skips(net, (data["x_train"][:8],), SkipConfig(span=span, init=init),
                       verify=verify)
    return Surgery(result.module, [s.name for s in result.skips],
                   [s.name for s in result.skips if s.kind == "identity"])


def plain_twin(net: nn.Module, data: dict, span: int) -> Surgery:
    """``net`` with standard shortcuts each reduced to its span (h): exactly ``net`` (checked),
    and deleting a block reduces it to S(x) = x, i.e. its two layers become the identity."""
    twin = surgery(net, data, "standard", span, seed=0, verify=False)
    twin.base = {name: "h" for name in twin.skips}
    with torch.no_grad(), reduced(twin.module.eval(), twin.base):
        same = torch.equal(twin.module(data["x_test"]), net.eval()(data["x_test"]))
    if not same:
        raise RuntimeError("the plain twin does not compute what the plain net does")
    return twin


def block_deletion(s: Surgery, data: dict) -> dict:
    """Mean accuracy drop when one block is deleted, per-block drops, accuracy with all deleted."""
    with reduced(s.module, s.base):
        full = accuracy(s.module, data)
    drops = []
    for block in s.blocks:
        with reduced(s.module, {**s.base, block: "x"}):
            drops.append(full - accuracy(s.module, data))
    with reduced(s.module, {**s.base, **{b: "x" for b in s.blocks}}):
        all_deleted = accuracy(s.module, data)
    return {"del_drop": statistics.fmean(drops) if drops else math.nan, "del_drops": drops,
            "acc_all_deleted": all_deleted}


def mean_abs_gate(model: nn.Module) -> float | None:
    values = gate_report(model).values
    return statistics.fmean(abs(v) for v in values.values()) if values else None


# -- one seed of one setting -----------------------------------------------------------

def pretrain(setting: Setting, data: dict, budget: Budget, seed: int) -> tuple[nn.Module, dict]:
    epochs = budget.pretrain_epochs.get(setting.name, setting.pretrain_epochs)
    torch.manual_seed(seed)
    net = setting.build()
    start = time.process_time()
    losses = train(net, data, budget, epochs, seed)
    cpu = time.process_time() - start
    record = {"setting": setting.name, "seed": seed, "epochs": epochs, "loss": losses,
              "acc": accuracy(net, data), "cpu": cpu,
              **block_deletion(plain_twin(net, data, budget.span), data)}
    record["usable"] = record["acc"] >= budget.min_pretrained / data["classes"]
    return net, record


def run_recipe(base: nn.Module, setting: Setting, recipe: Recipe, data: dict, budget: Budget,
               seed: int) -> dict:
    """Apply ``recipe`` to the trained ``base`` (never modified) and fine-tune; one record."""
    epochs = budget.finetune_epochs
    start, cpu = time.perf_counter(), time.process_time()
    record: dict = {"setting": setting.name, "seed": seed, "recipe": recipe.name,
                    "gate_lr_scale": recipe.gate_scale()}
    curve: list[float] = []
    if recipe.from_scratch:       # the same budget spent on a fresh net instead
        torch.manual_seed(seed)
        s = surgery(setting.build(), data, recipe.init, budget.span, seed, verify=False)
        with reduced(s.module, {name: "x" for name in s.skips} if recipe.shallow else {}):
            record["loss"] = train(s.module, data, budget, epochs, seed, curve=curve)
        record.update(skips=0 if recipe.shallow else len(s.skips), max_change=None,
                      acc_surgery=None, mean_abs_gate=None)
        record.update({"del_drop": None, "del_drops": [], "acc_all_deleted": None}
                      if recipe.shallow else block_deletion(s, data))
    else:
        with torch.no_grad():
            reference = base.eval()(data["x_test"])
        if recipe.init is None:
            model = copy.deepcopy(base)
        else:
            s = surgery(base, data, recipe.init, budget.span, seed)
            model = s.module
        with torch.no_grad():
            change = (model.eval()(data["x_test"]) - reference).abs().max().item()
        record.update(skips=0 if recipe.init is None else len(s.skips), max_change=change,
                      acc_surgery=accuracy(model, data))
        scale = recipe.gate_scale()
        groups = param_groups(model, budget.lr,
                              gate_lr=None if scale is None else budget.lr * scale)
        ramp = round(recipe.ramp_epochs * steps_per_epoch(data, budget))
        record["loss"] = train(model, data, budget, epochs, seed, groups=groups,
                               ramp_steps=ramp, curve=curve)
        probe = plain_twin(model, data, budget.span) if recipe.init is None else s
        record.update(mean_abs_gate=mean_abs_gate(model), **block_deletion(probe, data))
    record.update(acc_epochs=curve, acc_ep1=curve[0], acc_ft=curve[-1],
                  seconds=time.perf_counter() - start, cpu=time.process_time() - cpu)
    return record


def run_setting(setting: Setting, recipes: list[Recipe], budget: Budget, cache: dict,
                log=print) -> tuple[list[dict], list[dict]]:
    """Pretrain seeds 0, 1, ... until ``budget.seeds`` are usable (at most twice as many
    tried); run every recipe on each usable one. Returns (pretrained records, runs)."""
    data = dataset(setting, cache, budget.train_samples)
    pretrained, runs = [], []
    seed = 0
    while sum(p["usable"] for p in pretrained) < budget.seeds and seed < 2 * budget.seeds:
        base, pre = pretrain(setting, data, budget, seed)
        pretrained.append(pre)
        log(f"[{setting.name} seed {seed}] pretrained {pre['epochs']} epochs: acc "
            f"{pre['acc']:.1%}, deletion drop {pre['del_drop']:.1%} ({pre['cpu']:.1f} s CPU)"
            + ("" if pre["usable"] else "  -> did not train, seed replaced"))
        if pre["usable"]:
            for recipe in recipes:
                run = run_recipe(base, setting, recipe, data, budget, seed)
                runs.append(run)
                change = "-" if run["max_change"] is None else f"{run['max_change']:.3g}"
                drop = "-" if run["del_drop"] is None else f"{run['del_drop']:+.1%}"
                log(f"  {recipe.name:13s} change {change:>9s}  epoch 1 {run['acc_ep1']:6.1%}  "
                    f"final {run['acc_ft']:6.1%}  deletion drop {drop:>7s}  "
                    f"({run['cpu']:.1f} s CPU)")
        seed += 1
    return pretrained, runs


# -- summaries -------------------------------------------------------------------------

def _values(runs: list[dict], key: str) -> list[float]:
    return [r[key] for r in runs if r.get(key) is not None and math.isfinite(r[key])]


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(pretrained: list[dict], runs: list[dict], recipes: list[Recipe]) -> dict:
    """{setting: {"pretrained": stats, "recipes": {recipe: stats}}}, stats as [mean, std]."""
    out: dict = {}
    for name in dict.fromkeys(r["setting"] for r in runs):
        pre = [p for p in pretrained if p["setting"] == name and p["usable"]]
        mine = [r for r in runs if r["setting"] == name]
        plain = {r["seed"]: r for r in mine if r["recipe"] == "plain"}
        stats: dict = {"seeds": [p["seed"] for p in pre],
                       "replaced_seeds": [p["seed"] for p in pretrained
                                          if p["setting"] == name and not p["usable"]],
                       "pretrained": {k: mean_std(_values(pre, k))
                                      for k in ("acc", "del_drop", "acc_all_deleted")},
                       "recipes": {}}
        for recipe in recipes:
            rs = [r for r in mine if r["recipe"] == recipe.name]
            if not rs:
                continue
            row = {k: mean_std(_values(rs, k)) for k in
                   ("acc_surgery", "acc_ep1", "acc_ft", "del_drop", "acc_all_deleted",
                    "mean_abs_gate", "cpu")}
            changes = _values(rs, "max_change")
            row["max_change"] = max(changes) if changes else None
            row["n"] = len(rs)
            paired = [r["acc_ft"] - plain[r["seed"]]["acc_ft"] for r in rs if r["seed"] in plain]
            row["delta"] = mean_std(paired)
            a, b = _values(rs, "acc_ft"), [plain[r["seed"]]["acc_ft"] for r in rs
                                           if r["seed"] in plain]
            pooled = (math.sqrt((statistics.variance(a) + statistics.variance(b)) / 2)
                      if len(a) > 1 and len(b) > 1 else math.nan)
            diff = statistics.fmean(a) - statistics.fmean(b) if a and b else math.nan
            row["pooled_std"] = pooled
            row["beats_plain"] = (recipe.name != "plain" and diff >= 0.02 and diff > pooled)
            row["worse_than_plain"] = (recipe.name != "plain" and diff <= -0.02
                                       and -diff > pooled)
            drop, drop_pre = row["del_drop"][0], stats["pretrained"]["del_drop"][0]
            drop_plain = (stats["recipes"].get("plain") or {}).get("del_drop", (math.nan,))[0]
            row["halves_deletion_drop"] = (math.isfinite(drop) and drop <= 0.5 * drop_pre
                                           and drop <= 0.5 * drop_plain)
            stats["recipes"][recipe.name] = row
        out[name] = stats
    return out


def target(summary: dict, setting: str = "mlp20") -> dict:
    """Issue 15's target: an exact recipe beats plain fine-tuning on the depth-20 MLP by >= 2
    points with the difference of means above the pooled std, and halves the single-block
    deletion drop (against the plain net's, before retrofit and after fine-tuning)."""
    rows = summary.get(setting, {}).get("recipes", {})
    hits = [name for name, row in rows.items() if RECIPES[name].exact
            and row["beats_plain"] and row["halves_deletion_drop"]]
    return {"setting": setting, "met": bool(hits), "recipes": hits}


def pct(ms, sign: bool = False) -> str:
    m, s = ms
    if m is None or not math.isfinite(m):
        return "-"
    return f"{m * 100:+.1f} ± {s * 100:.1f}" if sign else f"{m * 100:.1f} ± {s * 100:.1f}"


def _change(value) -> str:
    return "-" if value is None else ("0" if value == 0 else f"{value:.3g}")


def key_table(summary: dict, recipes: list[Recipe]) -> str:
    head = ("| setting | recipe | test acc after FT | Δ vs plain FT (paired) | beats plain | "
            "one-block deletion drop after FT | max \\|Δ output\\| at insertion |")
    lines = [head, "|---|---|---:|---:|:-:|---:|---:|"]
    for name, stats in summary.items():
        for recipe in recipes:
            row = stats["recipes"].get(recipe.name)
            if row is None:
                continue
            beats = "-" if recipe.name == "plain" else (
                "**yes**" if row["beats_plain"] else "worse" if row["worse_than_plain"] else "no")
            lines.append(f"| {name} | {recipe.label} | {pct(row['acc_ft'])} | "
                         f"{pct(row['delta'], True) if recipe.name != 'plain' else '-'} | "
                         f"{beats} | {pct(row['del_drop'])} | {_change(row['max_change'])} |")
    return "\n".join(lines)


def full_table(stats: dict, recipes: list[Recipe]) -> str:
    head = ("| recipe | n | max \\|Δ out\\| at insertion | acc after surgery | acc after "
            "epoch 1 | acc after FT | Δ vs plain (paired) | deletion drop after FT | "
            "acc, all blocks deleted | mean \\|gate\\| | CPU s / run |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for recipe in recipes:
        row = stats["recipes"].get(recipe.name)
        if row is None:
            continue
        gate = row["mean_abs_gate"]
        gate = "-" if not math.isfinite(gate[0]) else f"{gate[0]:.3f} ± {gate[1]:.3f}"
        lines.append(
            f"| {recipe.label} | {row['n']} | {_change(row['max_change'])} | "
            f"{pct(row['acc_surgery'])} | {pct(row['acc_ep1'])} | {pct(row['acc_ft'])} | "
            f"{pct(row['delta'], True) if recipe.name != 'plain' else '-'} | "
            f"{pct(row['del_drop'])} | {pct(row['acc_all_deleted'])} | {gate} | "
            f"{row['cpu'][0]:.1f} |")
    return "\n".join(lines)


def findings(summary: dict) -> list[str]:
    """Plain sentences from the numbers: the target, then per setting what helps and what not."""
    lines = []
    goal = target(summary)
    if "mlp20" in summary:
        rows = summary["mlp20"]["recipes"]
        pre = summary["mlp20"]["pretrained"]["del_drop"][0]
        plain = rows["plain"]
        shallow = (f" (the shallow net trained from scratch gets "
                   f"{pct(rows['shallow']['acc_ft'])})" if "shallow" in rows else "")
        for name in goal["recipes"]:
            row = rows[name]
            diff = (row["acc_ft"][0] - plain["acc_ft"][0]) * 100
            lines.append(
                f"- **Target met on mlp20 by {name}**: {pct(row['acc_ft'])} after fine-tuning "
                f"vs {pct(plain['acc_ft'])} for plain fine-tuning (difference of means "
                f"{diff:+.1f}, pooled std {row['pooled_std'] * 100:.1f}), exact at insertion "
                f"(max |Δ out| {_change(row['max_change'])}); one-block deletion drop "
                f"{row['del_drop'][0] * 100:.1f} against {pre * 100:.1f} for the pretrained "
                f"plain net and {plain['del_drop'][0] * 100:.1f} after plain fine-tuning. With "
                f"every block deleted it still scores {pct(row['acc_all_deleted'])}: the "
                f"blocks add little, the net has largely become its own shallow path{shallow}. "
                f"After the first epoch, when the ramp has just opened, it is at "
                f"{pct(row['acc_ep1'])}: exact at insertion, not during fine-tuning.")
        if not goal["met"]:
            lines.append("- **Target not met on mlp20**: no exact recipe beats plain fine-tuning "
                         "by >= 2 points (difference of means above the pooled std) while "
                         "halving the one-block deletion drop.")
    for name, stats in summary.items():
        rows = stats["recipes"]
        retrofits = [n for n in rows if n != "plain" and not RECIPES[n].from_scratch]
        better = [n for n in retrofits if rows[n]["beats_plain"]]
        worse = [n for n in retrofits if rows[n]["worse_than_plain"]]
        deltas = {n: f"{n} {rows[n]['delta'][0] * 100:+.1f}" for n in retrofits}
        listed = lambda names: ", ".join(deltas[n] for n in names)  # noqa: E731
        text = (f"- **{name}**: " + (f"better than plain fine-tuning: {listed(better)}"
                                     if better else "no retrofit beats plain fine-tuning")
                + (f"; worse: {listed(worse)}" if worse else "") + " (paired Δ, points).")
        if not any(RECIPES[n].exact for n in better):
            text += " **No exact recipe helps here.**"
        plain = rows["plain"]["acc_ft"]
        refs = [f"{RECIPES[n].label} {pct(rows[n]['acc_ft'])}" for n in rows
                if RECIPES[n].from_scratch]
        if refs:
            text += (f" Same budget on a fresh net: {'; '.join(refs)} (plain fine-tuning "
                     f"{pct(plain)}).")
        shallow = rows.get("shallow")
        best = max((rows[n]["acc_ft"][0] for n in retrofits), default=math.nan)
        if shallow and better and shallow["acc_ft"][0] >= best - 0.01:
            text += (" Depth does not pay here: the shallow net from scratch is as good as the "
                     "best retrofit.")
        if shallow and shallow["worse_than_plain"] and {"morph", "rezero"} & set(worse):
            text += (" Depth pays here (the shallow net is worse than plain fine-tuning), and "
                     "the recipes that turn blocks into skippable residuals (morph, rezero) "
                     "lose accuracy.")
        lines.append(text)
    return lines


# -- writing ---------------------------------------------------------------------------

def shared_machine(threads: int, load_at_start: float) -> str:
    """The machine a study ran on, for its report: CPUs, the load other jobs put on them at the
    start and the end of the run, Python, torch and the torch threads used."""
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs shared with "
            f"other jobs (load average {load_at_start:.1f} at start, {os.getloadavg()[0]:.1f} "
            f"at end), Python {platform.python_version()}, torch {torch.__version__}, "
            f"{threads} torch thread(s)")


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Write to a temporary file beside ``path``, then move it there: never a half-written file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def write_results(out: Path, name: str, report: dict, text: str,
                  figure: Callable[[Path], Path]) -> list[Path]:
    """A study's results, each atomically: ``name``.json (strict JSON), ``name``.md (``text``)
    and the ``name``.png that ``figure(path)`` draws; prints the text and the paths written."""
    paths = [write_atomic(out / f"{name}.json", json.dumps(json_ready(report), indent=1,
                                                           allow_nan=False)),
             write_atomic(out / f"{name}.md", text.rstrip("\n") + "\n"),
             figure(out / f"{name}.png")]
    print("\n" + text)
    for p in paths:
        print(f"wrote {p}")
    return paths


def json_ready(obj):
    """``obj`` with every NaN or infinity replaced by None (strict JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


COLOURS = {"plain": "#7f7f7f", "preserve": "#e6550d", "preserve_x30": "#fdae6b",
           "morph": "#9467bd", "morph_x1": "#c5b0d5", "rezero": "#2ca02c", "standard": "#1f77b4", "shallow": "#000000",
           "scratch": "#17becf"}
STYLES = {"shallow": ":", "scratch": ":", "preserve_x30": "--", "morph_x1": "--"}


def plot(runs: list[dict], summary: dict, recipes: list[Recipe], path: Path) -> Path:
    """Test accuracy during fine-tuning (epoch 0: right after surgery), mean +- std per recipe."""
    import textwrap

    from matplotlib.figure import Figure

    names = list(summary)
    cols = 2 if len(names) > 1 else 1
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(5.4 * cols, 3.5 * rows + 1.2), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    for ax, name in zip(axes.flat, names):
        for recipe in recipes:
            rs = [r for r in runs if r["setting"] == name and r["recipe"] == recipe.name]
            if not rs:
                continue
            curves = torch.tensor([([r["acc_surgery"]] if r["acc_surgery"] is not None else [])
                                   + r["acc_epochs"] for r in rs]) * 100
            first = 1 if rs[0]["acc_surgery"] is None else 0
            epochs = range(first, first + curves.shape[1])
            mean = curves.mean(0)
            std = curves.std(0) if len(rs) > 1 else torch.zeros_like(mean)
            plain = recipe.name == "plain"   # wide and underneath: preserve often hides it
            ax.plot(epochs, mean, color=COLOURS.get(recipe.name), linewidth=3.0 if plain else 1.5,
                    linestyle=STYLES.get(recipe.name, "-"), zorder=1 if plain else 2,
                    label=recipe.label)
            ax.fill_between(epochs, mean - std, mean + std, color=COLOURS.get(recipe.name),
                            alpha=0.12, linewidth=0)
        pre = summary[name]["pretrained"]["acc"][0] * 100
        ax.axhline(pre, color="#7f7f7f", linewidth=0.8, linestyle=":")
        title = textwrap.fill(f"{name}: {SETTINGS[name].about}", 62)
        ax.set_title(f"{title}\n(pretrained plain {pre:.0f}%: dotted line; "
                     f"{len(summary[name]['seeds'])} seeds)", fontsize=8.5)
        ax.set_ylim(0, 100)
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("fine-tuning epoch (0 = right after surgery)", fontsize=8.5)
        ax.set_ylabel("test accuracy, %", fontsize=8.5)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("Shortcuts for a trained plain network: test accuracy during fine-tuning "
                 "(mean ± std over seeds)", fontsize=10.5)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return write_atomic(path, buffer.getvalue())


def markdown(summary: dict, recipes: list[Recipe], budget: Budget, header: str) -> str:
    b = budget
    method = (
        f"Every network is pretrained plain (Adam lr {b.lr:g}, batch {b.batch}; epochs per "
        f"setting below), then fine-tuned for {b.finetune_epochs} epochs with a fresh Adam, same "
        "lr and batch and the same batches for every recipe of a seed. Shortcuts come from "
        f"`add_skips(net, (x,), SkipConfig(span={b.span}, init=...))`, optimizer groups from "
        f"`ressurgeon.training.param_groups` (gate lr x{GATE_LR_SCALE['preserve']:g} for "
        f"preserve and rezero, x{GATE_LR_SCALE['morph']:g} for morph, unless the recipe says "
        "otherwise), morph's ramp from `ShortcutRamp` over the first epoch. The two "
        "references spend the same budget on a fresh net instead: the plain net with every "
        "span removed (shallow), and with standard shortcuts (scratch).")
    metrics = (
        "Mean ± std over seeds, accuracies in %. *Max |Δ out|*: the largest change of any "
        "logit on the test set at insertion, over all seeds (0: the trained function is "
        "kept exactly). *Deletion drop*: the mean accuracy drop when one block is deleted "
        "(Veit et al. 2016): a block of a rewritten net then computes only its shortcut term "
        "(`relu(a*x)` for preserve, `relu(x)` for morph once its ramp is 1, rezero and "
        "standard), a plain net's two layers become the identity; only identity-shaped blocks "
        "are deleted. A small drop means the blocks have become residual refinements rather "
        "than a chain every layer of which is needed. *Beats plain*: difference of means >= 2 "
        "points and above the pooled std; *worse*: the same, the other way.")
    data = (
        "Data: scikit-learn's bundled digits (1,797 8x8 images) and a synthetic "
        "`make_classification` task (3,000 samples, 40 features, 8 classes with 2 clusters "
        "each, `random_state=0`), both offline and deterministic; the synthetic task is a "
        "second, non-image distribution that is non-linear (logistic regression ~60%) and on "
        "which a 16-layer plain MLP trains badly, so a finding on digits can be told from a "
        "finding about digits. Splits are stratified 80/20, standardised; seeds change "
        "weights, batch order and projection init, never the split.")
    parts = [header, "", method, "", metrics, "", data, "",
             "![test accuracy during fine-tuning](retrofit_study.png)", "",
             "## Findings", "", *findings(summary), "",
             "## Key table", "", key_table(summary, recipes), ""]
    for name, stats in summary.items():
        setting, pre = SETTINGS[name], stats["pretrained"]
        replaced = (f"; seed(s) {', '.join(map(str, stats['replaced_seeds']))} did not train "
                    "(below twice chance) and were replaced" if stats["replaced_seeds"] else "")
        about = (f"Pretrained {b.pretrain_epochs.get(name, setting.pretrain_epochs)} epochs, "
                 f"seeds {', '.join(map(str, stats['seeds']))}{replaced}. Pretrained plain "
                 f"net: test acc {pct(pre['acc'])}, one-block deletion drop "
                 f"{pct(pre['del_drop'])}, all blocks deleted {pct(pre['acc_all_deleted'])}.")
        parts += [f"## {name}: {setting.about}", "", about, "", full_table(stats, recipes), ""]
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
                        help="smoke test (seconds): 2 seeds, 512 training samples, 2 pretraining "
                        "and 2 fine-tuning epochs, no mlp20")
    parser.add_argument("--settings", default=None,
                        help=f"comma-separated, from {', '.join(SETTINGS)} (default: all; "
                        f"--quick: {', '.join(QUICK_SETTINGS)})")
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help=f"comma-separated, from {', '.join(RECIPES)} (default: all; "
                        "plain is always run, the others are compared with it)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="usable seeds per setting (default 5; --quick: 2)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="fine-tuning epochs (default 10; --quick: 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: deterministic, steady on a shared "
                        "machine)")
    args = parser.parse_args(argv)
    settings = [s.strip() for s in (args.settings or ",".join(
        QUICK_SETTINGS if args.quick else SETTINGS)).split(",") if s.strip()]
    chosen = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if not settings or not set(settings) <= set(SETTINGS) or not set(chosen) <= set(RECIPES):
        parser.error(f"--settings takes {', '.join(SETTINGS)}; --recipes {', '.join(RECIPES)}")
    recipes = [r for name, r in RECIPES.items() if name in {"plain", *chosen}]

    budget = Budget()
    if args.quick:
        budget.seeds, budget.finetune_epochs, budget.train_samples = 2, 2, 512
        budget.pretrain_epochs = {name: 2 for name in SETTINGS}
        budget.min_pretrained = 0.0   # a quick pretraining does not train every net
    budget.seeds = args.seeds if args.seeds is not None else budget.seeds
    budget.finetune_epochs = args.epochs if args.epochs is not None else budget.finetune_epochs
    if budget.seeds < 1 or budget.finetune_epochs < 1:
        parser.error("--seeds and --epochs take integers >= 1")
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    start, cpu = time.perf_counter(), time.process_time()
    cache: dict = {}
    pretrained, runs = [], []
    for name in settings:
        pre, rs = run_setting(SETTINGS[name], recipes, budget, cache)
        pretrained += pre
        runs += rs
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu

    summary = summarise(pretrained, runs, recipes)
    command = " ".join(["python examples/retrofit_study.py", *argv])
    machine = (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs (shared), "
               f"Python {platform.python_version()}, torch {torch.__version__}, "
               f"{args.threads} thread(s)")
    header = (f"Command: `{command}`; {seconds / 60:.1f} min wall, {cpu / 60:.1f} min CPU on "
              f"{machine}.")
    report = {"command": command, "machine": machine, "seconds": seconds, "cpu_seconds": cpu,
              "budget": asdict(budget),
              "settings": {n: {"data": SETTINGS[n].data, "about": SETTINGS[n].about,
                               "pretrain_epochs": budget.pretrain_epochs.get(
                                   n, SETTINGS[n].pretrain_epochs)} for n in settings},
              "recipes": {r.name: {k: v for k, v in asdict(r).items()} | {
                  "gate_lr_scale": r.gate_scale()} for r in recipes},
              "target": target(summary), "summary": summary,
              "pretrained": pretrained, "runs": runs}
    table = markdown(summary, recipes, budget, header)
    paths = [write_atomic(out / f"{NAME}.json", json.dumps(json_ready(report), indent=1,
                                                                allow_nan=False)),
             write_atomic(out / f"{NAME}.md", table + "\n"),
             plot(runs, summary, recipes, out / f"{NAME}.png")]
    print()
    print(key_table(summary, recipes))
    print()
    print("\n".join(findings(summary)))
    print(f"\n{header}")
    for p in paths:
        print(f"wrote {p}")
    return report


if __name__ == "__main__":
    main()
