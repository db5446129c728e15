"""U-Net long skips: does ``--pattern mirror`` help a plain encoder-decoder segment? (issue 24 §5)

A plain encoder-decoder (``examples.models.EncoderDecoder``: three levels of two
conv + BN + ReLU, max-pooling down, transposed convs up, no skips) is trained
from scratch to label every pixel of images generated offline: rectangles,
discs and triangles (classes 1-3) of random size, position and intensity on a
noisy background (class 0: a random gradient plus Gaussian noise). Variants,
all from the same plain weights (per seed) and the same batches:

- plain: no surgery;
- chain: ``SkipConfig(span=2, init="standard")``, ResNet's short shortcuts;
- mirror add: ``SkipConfig(pattern="mirror", join="add", init="standard")``,
  LinkNet-style sums from each encoder level to its decoder level;
- mirror concat: ``SkipConfig(pattern="mirror", join="concat", init="standard")``,
  U-Net (the decoder level's first conv widened, new weights at PyTorch's
  default init).

Adam (lr 2e-3), batch 32, per-pixel cross-entropy. Recorded per run: mean IoU
over the four classes on a held-out set (confusion matrix over all its
pixels), per-class IoU, the training-loss curve and the test mIoU after every
epoch, parameters added.

    python examples/segmentation_study.py            # the full study (~15 min, one thread)
    python examples/segmentation_study.py --quick    # smoke test (< 30 s)

Writes into --out (default examples/results/; --quick: examples/results/quick/),
each file atomically: segmentation_study.json (every per-seed number and
curve), segmentation_study.md (the table, mean ± std over seeds) and
segmentation_study.png (test mIoU per epoch, mean ± std). Needs matplotlib;
nothing is downloaded.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ressurgeon import SkipConfig, add_skips

try:
    from .models import EncoderDecoder
    from .retrofit_study import mean_std, shared_machine, write_atomic, write_results
except ImportError:  # run as a script: python examples/segmentation_study.py
    from models import EncoderDecoder
    from retrofit_study import mean_std, shared_machine, write_atomic, write_results

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "segmentation_study"
CLASSES = ("background", "rectangle", "disc", "triangle")


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    config: dict | None       # SkipConfig fields; None: the plain net


VARIANTS = {v.name: v for v in (
    Variant("plain", "plain (no surgery)", None),
    Variant("chain", "chain, add standard (span 2)", {"span": 2, "init": "standard"}),
    Variant("mirror_add", "mirror, add standard (LinkNet)",
            {"pattern": "mirror", "join": "add", "init": "standard"}),
    Variant("mirror_concat", "mirror, concat standard (U-Net)",
            {"pattern": "mirror", "join": "concat", "init": "standard"}),
)}


@dataclass
class Budget:
    size: int = 32
    train: int = 512
    test: int = 128
    epochs: int = 8
    seeds: int = 3
    batch: int = 32
    lr: float = 2e-3
    widths: tuple[int, ...] = (16, 32, 64)


# -- data -----------------------------------------------------------------------------------

def make_shapes(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy images [n, 1, size, size] and their labels [n, size, size] (0-3), seeded.

    One to three shapes per image, later ones drawn over earlier ones; shape
    intensities and the background's overlap, so a pixel's value alone does not
    give its class: the shape around it does.
    """
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                            torch.arange(size, dtype=torch.float32), indexing="ij")
    images = torch.empty(n, 1, size, size)
    labels = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        slope = (torch.rand(2, generator=g) - 0.5) * 2 / size
        image = 0.5 * torch.rand((), generator=g) + slope[0] * ys + slope[1] * xs
        label = labels[i]
        for _ in range(int(torch.randint(1, 4, (), generator=g))):
            kind = int(torch.randint(1, 4, (), generator=g))
            cy, cx = (torch.rand(2, generator=g) * size * 0.8 + size * 0.1).tolist()
            r = float(torch.rand((), generator=g) * size * 0.15 + size * 0.08)
            if kind == 1:
                ry = float(torch.rand((), generator=g) * size * 0.15 + size * 0.05)
                mask = ((ys - cy).abs() <= ry) & ((xs - cx).abs() <= r)
            elif kind == 2:
                mask = (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
            else:  # an upright isosceles triangle: apex at the top
                top = cy - r
                mask = (ys >= top) & (ys <= cy + r) & ((xs - cx).abs() <= (ys - top) / 2)
            image = torch.where(mask, 0.4 + 0.6 * torch.rand((), generator=g), image)
            label[mask] = kind
        images[i, 0] = image + 0.15 * torch.randn(size, size, generator=g)
    return images, labels


# -- one run --------------------------------------------------------------------------------

def build(variant: Variant, budget: Budget, seed: int,
          example: torch.Tensor) -> tuple[nn.Module, int]:
    """The seed's plain net, with the variant's shortcuts; (model, parameters added)."""
    torch.manual_seed(seed)
    net = EncoderDecoder(dims=2, widths=budget.widths, up="transpose", in_channels=1,
                         classes=len(CLASSES))
    if variant.config is None:
        return net, 0
    result = add_skips(net.eval(), (example,), SkipConfig(**variant.config))
    return result.module.train(), result.params_added


def confusion(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
              batch: int) -> torch.Tensor:
    k = len(CLASSES)
    matrix = torch.zeros(k, k, dtype=torch.long)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            pred = model(images[i:i + batch]).argmax(1)
            matrix += torch.bincount((labels[i:i + batch] * k + pred).flatten(),
                                     minlength=k * k).view(k, k)
    model.train()
    return matrix


def iou(matrix: torch.Tensor) -> list[float]:
    """Per-class IoU from a confusion matrix (rows: truth, columns: prediction)."""
    tp = matrix.diag().double()
    union = matrix.sum(0).double() + matrix.sum(1).double() - tp
    return [float(t / u) if u > 0 else math.nan for t, u in zip(tp, union)]


def run_one(variant: Variant, data: dict, budget: Budget, seed: int) -> dict:
    start = time.perf_counter()
    model, added = build(variant, budget, seed, data["x_train"][:2])
    opt = torch.optim.Adam(model.parameters(), lr=budget.lr)
    order = torch.Generator().manual_seed(1000 + seed)  # the same batches for every variant
    losses, curve = [], []
    n = len(data["x_train"])
    for _ in range(budget.epochs):
        perm = torch.randperm(n, generator=order)
        total = 0.0
        for i in range(0, n, budget.batch):
            idx = perm[i:i + budget.batch]
            loss = F.cross_entropy(model(data["x_train"][idx]), data["y_train"][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / n)
        curve.append(_mean(iou(confusion(model, data["x_test"], data["y_test"], budget.batch))))
    per_class = iou(confusion(model, data["x_test"], data["y_test"], budget.batch))
    return {"variant": variant.name, "seed": seed, "miou": _mean(per_class),
            "per_class": per_class, "losses": losses, "miou_curve": curve,
            "params_added": added, "seconds": time.perf_counter() - start}


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


# -- reports --------------------------------------------------------------------------------

def summarise(runs: list[dict]) -> dict:
    summary = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == name]
        summary[name] = {
            "miou": mean_std([r["miou"] for r in mine]),
            "per_class": [mean_std([r["per_class"][c] for r in mine if
                                    math.isfinite(r["per_class"][c])])
                          for c in range(len(CLASSES))],
            "final_loss": mean_std([r["losses"][-1] for r in mine]),
            "params_added": mine[0]["params_added"], "seeds": len(mine)}
    return summary


def _ms(ms, scale: float = 100.0, digits: int = 1) -> str:
    m, s = ms
    if m is None or not math.isfinite(m):
        return "-"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def table(summary: dict) -> str:
    head = ("| variant | test mIoU (%) | " + " | ".join(f"IoU {c} (%)" for c in CLASSES)
            + " | final train loss | params added |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, row in summary.items():
        lines.append(f"| {VARIANTS[name].label} | {_ms(row['miou'])} | "
                     + " | ".join(_ms(c) for c in row["per_class"])
                     + f" | {_ms(row['final_loss'], 1.0, 3)} | {row['params_added']:,} |")
    return "\n".join(lines)


def findings(summary: dict) -> list[str]:
    plain = summary["plain"]["miou"]
    lines = []
    for name, row in summary.items():
        if name == "plain":
            continue
        (m, s), (pm, ps) = row["miou"], plain
        gap = m - pm
        clear = abs(gap) > s + ps  # the means differ by more than the two spreads together
        verdict = ("better than" if gap > 0 else "worse than") if clear else "within noise of"
        lines.append(f"- {VARIANTS[name].label}: mIoU {m * 100:.1f}% vs plain "
                     f"{pm * 100:.1f}% ({gap * 100:+.1f} points), {verdict} plain over "
                     f"{row['seeds']} seeds.")
    return lines


COLOURS = {"plain": "#7f7f7f", "chain": "#1f77b4", "mirror_add": "#2ca02c",
           "mirror_concat": "#d62728"}


def plot(runs: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == name]
        for ax, key in zip(axes, ("miou_curve", "losses")):
            curves = torch.tensor([r[key] for r in mine], dtype=torch.float64)
            mean = curves.mean(0)
            std = curves.std(0) if len(mine) > 1 else torch.zeros_like(mean)
            epochs = range(1, len(mean) + 1)
            ax.plot(epochs, mean, label=VARIANTS[name].label, color=COLOURS.get(name))
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2, color=COLOURS.get(name))
    axes[0].set(xlabel="epoch", ylabel="test mIoU", title="test mIoU (mean ± std over seeds)")
    axes[1].set(xlabel="epoch", ylabel="training loss", yscale="log",
                title="training loss (mean ± std)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return write_atomic(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the results (default examples/results/; with --quick "
                        "examples/results/quick/)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 24x24 images, 64 training and 32 test images, "
                        "widths 8/16, 2 seeds, 2 epochs")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    budget = Budget()
    if args.quick:
        budget = Budget(size=24, train=64, test=32, epochs=2, seeds=2, widths=(8, 16))
    budget.seeds = args.seeds if args.seeds is not None else budget.seeds
    budget.epochs = args.epochs if args.epochs is not None else budget.epochs
    if budget.seeds < 1 or budget.epochs < 1:
        parser.error("--seeds and --epochs take integers >= 1")
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    start, load = time.perf_counter(), os.getloadavg()[0]
    x_train, y_train = make_shapes(budget.train, budget.size, seed=0)
    x_test, y_test = make_shapes(budget.test, budget.size, seed=1)
    data = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    runs = []
    for seed in range(budget.seeds):
        for variant in VARIANTS.values():
            r = run_one(variant, data, budget, seed)
            runs.append(r)
            print(f"[seed {seed}] {variant.name:14s} mIoU {r['miou']:6.1%}  loss "
                  f"{r['losses'][-1]:.4f}  +{r['params_added']:,} params  {r['seconds']:.1f} s",
                  flush=True)
    seconds = time.perf_counter() - start
    summary = summarise(runs)
    command = " ".join(["python examples/segmentation_study.py", *argv])
    machine = shared_machine(args.threads, load)
    header = f"Command: `{command}`; {seconds / 60:.1f} min wall on {machine}."
    text = "\n".join([header, "", f"{budget.train} training and {budget.test} test images of "
                      f"{budget.size}x{budget.size}, {budget.epochs} epochs, seeds "
                      f"0..{budget.seeds - 1}, widths {budget.widths}; mean ± std over seeds.",
                      "", table(summary), "", *findings(summary)])
    report = {"command": command, "machine": machine, "seconds": seconds,
              "budget": asdict(budget), "classes": list(CLASSES), "summary": summary,
              "runs": runs}
    write_results(out, NAME, report, text, lambda path: plot(runs, path))
    return report


if __name__ == "__main__":
    main()
