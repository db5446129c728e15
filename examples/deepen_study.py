"""Growing trained networks with ``deepen``: does a deeper network that starts where the trained
one stopped train further better than the network as it is?

Two experiments, every variant of a seed starting from the same trained weights and seeing the
same batches (or tokens), several seeds, mean +- std:

(a) Digits (scikit-learn's 8x8 images, bundled): a plain MLP and a plain CNN are trained, then
    fine-tuned further (1) as they are, (2) after ``deepen`` inserted new residual layers
    ``x + out(act(layer(x)))`` with ``out`` zero (all weights trained), (3) the same, only the
    new blocks trained; (4) the deeper network trained from scratch for the whole budget.
(b) Byte-level language modelling on the Python standard library's own ``*.py`` files (on
    every machine, offline): a small Llama (transformers) is trained, then trained further for
    the same tokens (1) as it is, (2) after LLaMA Pro block expansion (``deepen``: copies of
    layers interleaved, output projections zeroed) training only the new blocks (LLaMA Pro's
    recipe, ``freeze_except``), (3) the same, training everything.

    python examples/deepen_study.py            # the full study, ~20 minutes on one CPU thread
    python examples/deepen_study.py --quick    # smoke test, under a minute

Writes deepen_study.md (tables), deepen_study.json (every curve) and deepen_study.png into
--out (default examples/results/; with --quick examples/results/quick/), each atomically.
Needs scikit-learn, transformers and matplotlib.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ressurgeon import DeepenConfig, deepen
from ressurgeon._io import atomic_path
from ressurgeon.deepen.stream import spread
from ressurgeon.training import freeze_except, param_groups

try:
    from ._digits import load_data
    from .train_digits import digits_cnn, digits_mlp, shaped
except ImportError:  # run as a script: python examples/deepen_study.py
    from _digits import load_data
    from train_digits import digits_cnn, digits_mlp, shaped

RESULTS = Path(__file__).resolve().parent / "results"
DIGITS_VARIANTS = ("as is", "deepened", "deepened, new only", "deeper from scratch")
LM_VARIANTS = ("as is", "deepened, new only", "deepened")


@dataclass
class Settings:
    """Everything that decides a run."""

    seeds: tuple[int, ...] = (0, 1, 2)
    # (a) digits: Adam, cross-entropy
    mlp: tuple[int, int] = (3, 32)            # depth, width
    cnn: tuple[int, tuple[int, int]] = (4, (8, 16))   # depth, channels before/after pooling
    pre_epochs: int = 15
    more_epochs: int = 15
    digit_blocks: int = 2
    lr: float = 1e-3
    batch: int = 64
    # (b) byte-level Llama: AdamW, linear warm-up
    width: int = 96
    layers: int = 4
    heads: int = 4
    context: int = 64
    lm_batch: int = 16
    base_steps: int = 600
    more_steps: int = 400
    lm_blocks: int = 2
    base_lr: float = 3e-3
    more_lr: float = 1e-3
    warmup: int = 30
    eval_every: int = 50
    eval_windows: int = 256
    val_every: int = 10                       # every 10th file (sorted by name) is validation


@dataclass
class Run:
    """One variant of one seed: its curve and its final figures."""

    part: str                                 # "mlp", "cnn" or "lm"
    variant: str
    seed: int
    curve: list[tuple[int, float]]            # (epoch or step, test / validation loss)
    final_loss: float
    accuracy: float | None = None
    params: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


# -- (a) digits ---------------------------------------------------------------------------------

def digits_net(family: str, s: Settings) -> nn.Module:
    return digits_mlp(*s.mlp) if family == "mlp" else digits_cnn(*s.cnn)


def digits_eval(model: nn.Module, family: str, data: dict) -> tuple[float, float]:
    """(test loss, test accuracy)."""
    model.eval()
    with torch.no_grad():
        logits = model(shaped(family, data["x_test"]))
    return (F.cross_entropy(logits, data["y_test"]).item(),
            (logits.argmax(1) == data["y_test"]).float().mean().item())


def digits_train(model: nn.Module, family: str, data: dict, s: Settings, epochs: int,
                 seed: int, extra: list[str] = ()) -> list[tuple[int, float]]:
    """Adam on the trainable parameters (new blocks in their own group), seeded batch order;
    returns the test loss after each epoch."""
    groups = param_groups(model, s.lr, extra=extra)
    opt = torch.optim.Adam(groups, lr=s.lr)
    x, y = shaped(family, data["x_train"]), data["y_train"]
    gen = torch.Generator().manual_seed(seed)
    curve = [(0, digits_eval(model, family, data)[0])]
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), s.batch):
            idx = order[i:i + s.batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        curve.append((epoch, digits_eval(model, family, data)[0]))
    return curve


def digits_study(family: str, data: dict, s: Settings, log=print) -> list[Run]:
    runs = []
    example = (shaped(family, data["x_train"][:8]),)
    config = DeepenConfig(blocks=s.digit_blocks, how="new")
    for seed in s.seeds:
        torch.manual_seed(seed)
        base = digits_net(family, s)
        digits_train(base, family, data, s, s.pre_epochs, seed + 100)
        base_loss, base_acc = digits_eval(base, family, data)
        log(f"{family} seed {seed}: trained {s.pre_epochs} epochs, test loss {base_loss:.4f}, "
            f"acc {base_acc:.1%}")
        for variant in DIGITS_VARIANTS:
            start = time.perf_counter()
            extra: dict = {"base_loss": base_loss, "base_acc": base_acc}
            if variant == "as is":
                model, new, epochs = copy.deepcopy(base), [], s.more_epochs
            elif variant == "deeper from scratch":
                torch.manual_seed(seed + 1000)
                grown = deepen(digits_net(family, s), example, config)
                model, new, epochs = grown.module, [], s.pre_epochs + s.more_epochs
                for name in grown.new_blocks:   # an ordinary residual block, not the identity
                    model.get_submodule(name).out.reset_parameters()
            else:
                torch.manual_seed(seed + 1)   # the new layers' initial weights
                grown = deepen(base, example, config)
                model, new, epochs = grown.module, grown.new_blocks, s.more_epochs
                extra["change_at_insertion"] = grown.parity.max_abs_diff
                extra["new_blocks"] = new
                if variant == "deepened, new only":
                    freeze_except(model, new)
            curve = digits_train(model, family, data, s, epochs, seed + 200, extra=new)
            loss, acc = digits_eval(model, family, data)
            runs.append(Run(family, variant, seed, curve, loss, acc,
                            sum(p.numel() for p in model.parameters()),
                            time.perf_counter() - start, extra))
            log(f"  {variant:20s} test loss {loss:.4f}  acc {acc:6.1%}")
    return runs


# -- (b) byte-level language model --------------------------------------------------------------

def stdlib_corpus(s: Settings) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The standard library's top-level ``*.py`` files as bytes: every ``val_every``-th file
    (sorted by name) for validation, the rest for training."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    train, val = [], []
    for i, path in enumerate(files):
        (val if i % s.val_every == 0 else train).append(path.read_bytes() + b"\n\n")
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"".join(parts)),  # noqa: E731
                                               dtype=torch.uint8).long()
    info = {"root": str(root), "files": len(files), "val_files": len(val),
            "train_bytes": sum(map(len, train)), "val_bytes": sum(map(len, val))}
    return as_tensor(train), as_tensor(val), info


def windows(data: torch.Tensor, count: int, length: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - length, (count,), generator=gen)
    return torch.stack([data[i:i + length] for i in starts.tolist()])


def lm_model(s: Settings):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=s.width, intermediate_size=s.width * 8 // 3 // 8 * 8,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
        max_position_embeddings=s.context, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config)


def lm_eval(model, val: torch.Tensor) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(val), 64):
            total += model(input_ids=val[i:i + 64], labels=val[i:i + 64]).loss.item() \
                * len(val[i:i + 64])
    return total / len(val)


def lm_train(model, train: torch.Tensor, val: torch.Tensor, s: Settings, steps: int, lr: float,
             seed: int) -> list[tuple[int, float]]:
    """AdamW on the trainable parameters, linear warm-up then constant; the batches come from
    ``seed`` (the same tokens for every variant); validation loss every ``eval_every`` steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / s.warmup))
    gen = torch.Generator().manual_seed(seed)
    curve = [(0, lm_eval(model, val))]
    for step in range(1, steps + 1):
        model.train()
        batch = windows(train, s.lm_batch, s.context, gen)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % s.eval_every == 0 or step == steps:
            curve.append((step, lm_eval(model, val)))
    return curve


def lm_study(s: Settings, log=print) -> tuple[list[Run], dict]:
    import transformers

    transformers.logging.set_verbosity_error()
    train, val_data, info = stdlib_corpus(s)
    val = windows(val_data, s.eval_windows, s.context, torch.Generator().manual_seed(1234))
    log(f"corpus: {info['files']} files under {info['root']}, {info['train_bytes'] / 1e6:.2f} MB "
        f"training, {info['val_bytes'] / 1e6:.2f} MB validation ({info['val_files']} files)")
    runs = []
    for seed in s.seeds:
        torch.manual_seed(seed)
        base = lm_model(s)
        start = time.perf_counter()
        base_curve = lm_train(base, train, val, s, s.base_steps, s.base_lr, seed + 100)
        log(f"lm seed {seed}: trained {s.base_steps} steps ({time.perf_counter() - start:.0f} s),"
            f" validation loss {base_curve[-1][1]:.4f} nats/byte")
        for variant in LM_VARIANTS:
            start = time.perf_counter()
            extra: dict = {"base_curve": base_curve}
            if variant == "as is":
                model = copy.deepcopy(base)
            else:
                grown = deepen(base, (val[:2],), DeepenConfig(blocks=s.lm_blocks))
                model = grown.module
                extra.update(new_blocks=grown.new_blocks,
                             change_at_insertion=grown.parity.max_abs_diff)
                if variant == "deepened, new only":
                    freeze_except(model, grown.new_blocks)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            curve = lm_train(model, train, val, s, s.more_steps, s.more_lr, seed + 200)
            extra["trainable"] = trainable
            runs.append(Run("lm", variant, seed, curve, curve[-1][1], None,
                            sum(p.numel() for p in model.parameters()),
                            time.perf_counter() - start, extra))
            log(f"  {variant:20s} validation loss {curve[-1][1]:.4f} "
                f"({time.perf_counter() - start:.0f} s)")
    return runs, info


# -- reporting ----------------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _pm(values: list[float], fmt: str = ".4f", scale: float = 1.0) -> str:
    m, sd = mean_std([v * scale for v in values])
    return f"{m:{fmt}} ± {sd:{fmt}}"


def _paired(runs: list[Run], variant: str, against: str = "as is") -> str:
    """The per-seed difference of final losses (``variant`` minus ``against``, mean ± std: every
    variant of a seed starts from the same trained weights) and in how many seeds it is lower."""
    if variant == against:
        return "- | -"
    mine = {r.seed: r.final_loss for r in runs if r.variant == variant}
    other = {r.seed: r.final_loss for r in runs if r.variant == against}
    diffs = [mine[k] - other[k] for k in mine]
    m, sd = mean_std(diffs)
    return f"{m:+.4f} ± {sd:.4f} | {sum(d < 0 for d in diffs)}/{len(diffs)}"


def digits_table(runs: list[Run], s: Settings) -> str:
    lines = ["| net | variant | epochs after pre-training | params | test loss | test acc (%) "
             "| loss minus 'as is' (paired) | lower in |", "|---|---|---|---|---|---|---|---|"]
    for family in ("mlp", "cnn"):
        for variant in DIGITS_VARIANTS:
            sel = [r for r in runs if r.part == family and r.variant == variant]
            if not sel:
                continue
            epochs = (f"{s.pre_epochs + s.more_epochs} from scratch"
                      if variant == "deeper from scratch" else str(s.more_epochs))
            paired = _paired([r for r in runs if r.part == family], variant)
            lines.append(f"| {family.upper()} | {variant} | {epochs} | {sel[0].params:,} | "
                         f"{_pm([r.final_loss for r in sel])} | "
                         f"{_pm([r.accuracy for r in sel], '.1f', 100)} | {paired} |")
        base = [r.extra["base_loss"] for r in runs if r.part == family and r.variant == "as is"]
        acc = [r.extra["base_acc"] for r in runs if r.part == family and r.variant == "as is"]
        if base:
            lines.append(f"| {family.upper()} | *trained ({s.pre_epochs} epochs), before* | 0 "
                         f"| | {_pm(base)} | {_pm(acc, '.1f', 100)} | | |")
    return "\n".join(lines)


def lm_table(runs: list[Run], s: Settings) -> str:
    runs = [r for r in runs if r.part == "lm"]
    lines = ["| variant | layers | trainable params | validation loss (nats/byte) | "
             "minus 'as is' (paired) | lower in | s per run |", "|---|---|---|---|---|---|---|"]
    base = [r.extra["base_curve"][-1][1] for r in runs if r.variant == "as is"]
    for variant in LM_VARIANTS:
        sel = [r for r in runs if r.variant == variant]
        if not sel:
            continue
        layers = s.layers + (0 if variant == "as is" else s.lm_blocks)
        lines.append(f"| {variant} | {layers} | {sel[0].extra['trainable']:,} | "
                     f"{_pm([r.final_loss for r in sel])} | {_paired(runs, variant)} | "
                     f"{statistics.fmean(r.seconds for r in sel):.0f} |")
    lines.append(f"| *trained {s.base_steps} steps, before* | {s.layers} | | {_pm(base)} | | | |")
    return "\n".join(lines)


def plot(runs: list[Run], s: Settings, path: Path) -> Path:
    """Digits: test loss per epoch of further training; LM: validation loss per step."""
    from matplotlib.figure import Figure

    colours = {"as is": "tab:gray", "deepened": "tab:blue", "deepened, new only": "tab:orange",
               "deeper from scratch": "tab:green"}
    parts = [p for p in ("mlp", "cnn", "lm") if any(r.part == p for r in runs)]
    fig = Figure(figsize=(4.2 * len(parts), 3.6), layout="constrained")
    axes = fig.subplots(1, len(parts), squeeze=False)[0]
    for ax, part in zip(axes, parts):
        for variant, colour in colours.items():
            sel = [r for r in runs if r.part == part and r.variant == variant]
            if not sel:
                continue
            offset = s.pre_epochs if variant == "deeper from scratch" else 0
            xs = [x - offset for x, _ in sel[0].curve if x - offset >= 0] if part != "lm" \
                else [x for x, _ in sel[0].curve]
            keep = len(sel[0].curve) - len(xs)
            ys = [[y for _, y in r.curve[keep:]] for r in sel]
            mean = [statistics.fmean(col) for col in zip(*ys)]
            sd = [statistics.stdev(col) if len(col) > 1 else 0.0 for col in zip(*ys)]
            label = variant + (" (last epochs)" if offset else "")
            ax.plot(xs, mean, color=colour, label=label, linewidth=1.6)
            ax.fill_between(xs, [m - d for m, d in zip(mean, sd)],
                            [m + d for m, d in zip(mean, sd)], color=colour, alpha=0.15)
        ax.set_title({"mlp": f"Digits MLP (depth {s.mlp[0]}, +{s.digit_blocks} blocks)",
                      "cnn": f"Digits CNN (depth {s.cnn[0]}, +{s.digit_blocks} blocks)",
                      "lm": f"stdlib bytes, Llama {s.layers} -> {s.layers + s.lm_blocks} "
                            "layers"}[part], fontsize=10)
        ax.set_xlabel("epoch of further training" if part != "lm" else "step of further training")
        ax.set_ylabel("test loss" if part != "lm" else "validation loss (nats/byte)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7.5, frameon=False)
    fig.suptitle(f"Training further after deepen (mean ± std over {len(s.seeds)} seeds)",
                 fontsize=11)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def main(argv: list[str] | None = None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the results (default examples/results/, with --quick "
                        "examples/results/quick/ so a smoke run never replaces the committed "
                        "results)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 seeds, a few steps")
    parser.add_argument("--parts", default="digits,lm", help="digits, lm or both (default)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    s = Settings()
    if args.quick:
        s = Settings(seeds=(0, 1), pre_epochs=2, more_epochs=2, base_steps=20, more_steps=10,
                     eval_every=5, eval_windows=32, width=32, context=32)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts <= {"digits", "lm"} or not parts:
        parser.error("--parts takes digits and/or lm")
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    runs: list[Run] = []
    corpus = None
    if "digits" in parts:
        data = load_data(0)
        runs += digits_study("mlp", data, s) + digits_study("cnn", data, s)
    if "lm" in parts:
        lm_runs, corpus = lm_study(s)
        runs += lm_runs
    total = time.perf_counter() - start

    command = "python examples/deepen_study.py" + (" --quick" if args.quick else "") + (
        f" --parts {args.parts}" if parts != {"digits", "lm"} else "")
    text = [f"Command: `{command}` ({total / 60:.1f} min in all, torch {torch.__version__}, "
            f"{args.threads} CPU thread(s)); seeds {', '.join(map(str, s.seeds))}; "
            "mean ± std over seeds.\n"]
    if "digits" in parts:
        text.append(
            "## (a) Digits: a trained plain network, deepened and trained further\n\n"
            f"Plain MLP (depth {s.mlp[0]}, width {s.mlp[1]}) and CNN (depth {s.cnn[0]}, "
            f"channels {s.cnn[1][0]} -> {s.cnn[1][1]}), PyTorch's default init, Adam lr "
            f"{s.lr:g}, batch {s.batch}, trained {s.pre_epochs} epochs; then {s.more_epochs} "
            f"more epochs with a fresh Adam: as they are, or after `deepen` inserted "
            f"{s.digit_blocks} new residual layers (`how='new'`; all weights trained, or only "
            "the new blocks); and the deeper network (the same graph, its new blocks' output "
            f"layers re-initialised) trained from scratch for {s.pre_epochs + s.more_epochs} "
            "epochs. Test set: 360 images (20%, stratified). Every deepened model computed "
            "exactly what the trained one did at insertion (max abs diff "
            f"{max((r.extra.get('change_at_insertion', 0) for r in runs), default=0):g}).\n\n"
            + digits_table(runs, s) + "\n")
    if "lm" in parts:
        text.append(
            "## (b) Byte-level Llama on the standard library's source, block expansion\n\n"
            f"Corpus: the {corpus['files']} top-level `*.py` files of {corpus['root']} (every "
            f"{s.val_every}th file by name for validation: {corpus['val_bytes'] / 1e6:.2f} MB; "
            f"training {corpus['train_bytes'] / 1e6:.2f} MB), bytes as tokens. "
            f"`LlamaForCausalLM`: {s.layers} layers, width {s.width}, {s.heads} heads, context "
            f"{s.context}, tied embeddings; AdamW, batch {s.lm_batch} x {s.context} bytes, "
            f"gradient clip 1, {s.warmup}-step warm-up; trained {s.base_steps} steps at lr "
            f"{s.base_lr:g}; then {s.more_steps} more steps at lr {s.more_lr:g} on the same "
            f"tokens for every variant: as it is, or after `deepen(..., "
            f"DeepenConfig(blocks={s.lm_blocks}))` (LLaMA Pro: copies of layers "
            f"{', '.join(map(str, spread(s.layers, s.lm_blocks)))} interleaved after them, "
            "`o_proj` and `down_proj` zeroed) "
            "training only the new blocks (`freeze_except`) or everything. Validation: "
            f"{s.eval_windows} fixed windows. The deeper model costs more per step (its "
            "backward pass too, even with the old layers frozen): the comparison is at equal "
            "tokens, not equal compute (seconds per run below, one thread of a shared machine)."
            "\n\n" + lm_table(runs, s) + "\n")
    md = "\n".join(text)
    print()
    print(md)
    paths = [write_text(out / "deepen_study.md", md),
             write_text(out / "deepen_study.json", json.dumps(
                 {"settings": asdict(s), "seconds": total, "command": command, "corpus": corpus,
                  "runs": [asdict(r) for r in runs]}, indent=1)),
             plot(runs, s, out / "deepen_study.png")]
    for p in paths:
        print(f"wrote {p}")
    print(f"total {total / 60:.1f} min")
    return runs


if __name__ == "__main__":
    main()
