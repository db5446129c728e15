"""Deep plain networks on scikit-learn's digits, trained plain and with ressurgeon's shortcuts.

The small-scale counterpart of He et al. (2016): plain MLPs and CNNs of
depth 20, 40 and 60 (PyTorch's default init, no normalisation) trained from
scratch as they are and after ``add_skips`` with init standard, rezero and
preserve; same data, seeds, optimizer and epochs for every run. A second,
smaller experiment takes a *trained* plain MLP, adds shortcuts with each
init and fine-tunes it, which is where init preserve is meant to be used.

    python examples/train_digits.py            # the full study, ~8 minutes on one CPU thread
    python examples/train_digits.py --quick    # smoke test, a few seconds

Writes into --out (default examples/results/): train_digits.md (the tables),
train_digits.json (every loss curve), train_digits.png (training-loss
curves), grad_flow_mlp.png (per-layer gradients of the deepest MLP before
and after surgery, on a batch of digits) and surgery_cnn.png (where the
shortcuts go in the shallowest CNN). Needs scikit-learn (the digits set is
bundled, nothing is downloaded) and matplotlib.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ressurgeon import SkipConfig, add_skips

try:
    from ._digits import digits_cnn, digits_mlp, load_data
except ImportError:  # run as a script: python examples/train_digits.py
    from _digits import digits_cnn, digits_mlp, load_data

VARIANTS = ("plain", "standard", "rezero", "preserve")
# an extra row, outside the same-optimizer comparison: preserve with the gates
# on a larger learning rate (Adam moves a scalar by about lr per step, so a
# gate at 0 needs many steps to open at the rate that suits the weights)
FAST_GATES = "preserve+fast-gates"
INITS = {"standard": "standard", "rezero": "rezero", "preserve": "preserve",
         FAST_GATES: "preserve"}
FAMILIES = ("mlp", "cnn")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Settings:
    """Everything that decides a run; the same for every model in a study."""

    epochs: int = 40
    lr: float = 1e-3             # Adam
    batch: int = 64
    width: int = 64              # MLP hidden width
    channels: tuple[int, int] = (8, 16)   # CNN channels before / after the pooling
    span: int = 2
    seed: int = 0
    gate_lr_mult: float = 30.0   # FAST_GATES only
    # the trained plain MLPs of the fine-tuning experiment: (depth, pretraining epochs)
    pretrained: tuple[tuple[int, int], ...] = ((10, 15), (20, 20))
    finetune_epochs: int = 10


@dataclass
class Run:
    """One trained model: its per-epoch training loss and its test accuracy."""

    family: str
    depth: int
    variant: str
    losses: list[float]
    test_acc: float
    seconds: float               # wall time of the training loop
    cpu: float                   # CPU time of this process over the same loop
    skips: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else math.nan

    def epochs_to(self, level: float) -> int | None:
        """First epoch (1-based) whose mean training loss is below ``level``."""
        return next((i + 1 for i, v in enumerate(self.losses) if v < level), None)


# -- data and models (shared with retrofit_study.py) ---------------------------------

def shaped(family: str, x: torch.Tensor) -> torch.Tensor:
    return x if family == "mlp" else x.reshape(-1, 1, 8, 8)


def build(family: str, depth: int, variant: str, data: dict, settings: Settings):
    """(model, number of shortcuts): the plain network, or it after add_skips with ``variant``."""
    torch.manual_seed(settings.seed)  # every variant of a network starts from these weights
    net = (digits_mlp(depth, settings.width) if family == "mlp"
           else digits_cnn(depth, settings.channels))
    if variant == "plain":
        return net, 0
    return surgery(net, family, variant, data, settings)


def surgery(net: nn.Module, family: str, variant: str, data: dict, settings: Settings):
    """(add_skips(net).module, number of shortcuts) with the init ``variant`` names."""
    torch.manual_seed(settings.seed + 1)  # projection weights
    example = (shaped(family, data["x_train"][:8]),)
    result = add_skips(net, example, SkipConfig(span=settings.span, init=INITS[variant]),
                       verify=False)
    return result.module, len(result.skips)


# -- training ----------------------------------------------------------------------

def train(model: nn.Module, family: str, data: dict, settings: Settings,
          epochs: int | None = None, gate_lr_mult: float = 1.0):
    """Adam, cross-entropy, seeded shuffling; returns (mean loss per epoch, wall s, CPU s)."""
    epochs = settings.epochs if epochs is None else epochs
    gates = [p for n, p in model.named_parameters() if n.endswith(".gate")]
    rest = [p for n, p in model.named_parameters() if not n.endswith(".gate")]
    groups = [{"params": rest}] + ([{"params": gates, "lr": settings.lr * gate_lr_mult}]
                                   if gates else [])
    opt = torch.optim.Adam(groups, lr=settings.lr)
    x, y = shaped(family, data["x_train"]), data["y_train"]
    gen = torch.Generator().manual_seed(settings.seed + 2)  # the same batches for every model
    losses = []
    start, cpu = time.perf_counter(), time.process_time()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), settings.batch):
            idx = order[i:i + settings.batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(x))
    return losses, time.perf_counter() - start, time.process_time() - cpu


def accuracy(model: nn.Module, family: str, data: dict) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(shaped(family, data["x_test"]))
    return (logits.argmax(1) == data["y_test"]).float().mean().item()


def run_study(families, depths, variants, data: dict, settings: Settings,
              log=print) -> list[Run]:
    """Train every (family, depth, variant) from scratch; one Run each."""
    runs = []
    for family in families:
        for depth in depths:
            for variant in variants:
                model, skips = build(family, depth, variant, data, settings)
                losses, seconds, cpu = train(model, family, data, settings,
                                             gate_lr_mult=_gate_mult(variant, settings))
                run = Run(family, depth, variant, losses, accuracy(model, family, data), seconds,
                          cpu, skips)
                runs.append(run)
                log(f"{family} depth {depth:3d} {variant:9s} test acc {run.test_acc:6.1%}  "
                    f"final loss {run.final_loss:.4f}  {seconds:5.1f} s")
    return runs


def _gate_mult(variant: str, settings: Settings) -> float:
    return settings.gate_lr_mult if variant == FAST_GATES else 1.0


def finetune_study(variants, data: dict, settings: Settings, log=print) -> list[Run]:
    """Train plain MLPs, then add shortcuts with each init (or none) and fine-tune them.

    ``extra`` holds the test accuracy of the pretrained network, the accuracy
    right after surgery (before any fine-tuning), the largest output change the
    surgery caused on the test set, and the mean |gate| after fine-tuning.
    """
    from ressurgeon.diagnose import gate_report

    runs = []
    for depth, pre_epochs in settings.pretrained:
        torch.manual_seed(settings.seed)
        base = digits_mlp(depth, settings.width)
        _, pre_seconds, _ = train(base, "mlp", data, settings, pre_epochs)
        base_acc = accuracy(base, "mlp", data)
        log(f"pretrained plain MLP depth {depth}: test acc {base_acc:.1%} after {pre_epochs} "
            f"epochs ({pre_seconds:.1f} s)")
        with torch.no_grad():
            base_out = base.eval()(data["x_test"])
        for variant in variants:
            if variant == "plain":
                model, skips = copy.deepcopy(base), 0
            else:
                model, skips = surgery(base, "mlp", variant, data, settings)
            model.eval()
            with torch.no_grad():
                change = (model(data["x_test"]) - base_out).abs().max().item()
            after_surgery = accuracy(model, "mlp", data)
            losses, seconds, cpu = train(model, "mlp", data, settings, settings.finetune_epochs,
                                         gate_lr_mult=_gate_mult(variant, settings))
            gates = list(gate_report(model).values.values())
            run = Run("mlp", depth, variant, losses, accuracy(model, "mlp", data), seconds, cpu,
                      skips,
                      {"pretrain_epochs": pre_epochs, "acc_pretrained": base_acc,
                       "acc_after_surgery": after_surgery, "output_change": change,
                       "mean_abs_gate": sum(map(abs, gates)) / len(gates) if gates else None})
            runs.append(run)
            log(f"  fine-tune {variant:19s} acc after surgery {after_surgery:6.1%}  after "
                f"{settings.finetune_epochs} epochs {run.test_acc:6.1%}  loss "
                f"{run.final_loss:.4f}")
    return runs


# -- reporting ---------------------------------------------------------------------

def _variant(r: Run, settings: Settings) -> str:
    if r.variant == FAST_GATES:
        return f"preserve, gate lr x{settings.gate_lr_mult:g}"
    return r.variant


def study_table(runs: list[Run], settings: Settings, level: float = 0.5) -> str:
    """Markdown: one row per run."""
    lines = ["| net | depth | variant | shortcuts | test acc | final train loss | "
             f"epochs to loss < {level:g} | train wall s | train CPU s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        reached = r.epochs_to(level)
        lines.append(f"| {r.family.upper()} | {r.depth} | {_variant(r, settings)} | {r.skips} | "
                     f"{r.test_acc:.1%} | {r.final_loss:.4f} | {reached or 'never'} | "
                     f"{r.seconds:.1f} | {r.cpu:.1f} |")
    return "\n".join(lines)


def finetune_table(runs: list[Run], settings: Settings) -> str:
    lines = ["| pretrained plain MLP | variant | max output change at surgery | test acc "
             "right after surgery | loss, first fine-tune epoch | loss, last epoch | test acc "
             "after fine-tuning | mean \\|gate\\| after |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        e = r.extra
        name = "plain (no surgery)" if r.variant == "plain" else _variant(r, settings)
        gate = "-" if e["mean_abs_gate"] is None else f"{e['mean_abs_gate']:.3f}"
        lines.append(f"| depth {r.depth}, {e['pretrain_epochs']} epochs: "
                     f"{e['acc_pretrained']:.1%} | {name} | {e['output_change']:.3g} | "
                     f"{e['acc_after_surgery']:.1%} | {r.losses[0]:.4f} | {r.final_loss:.4f} | "
                     f"{r.test_acc:.1%} | {gate} |")
    return "\n".join(lines)


COLOURS = {"plain": "#7f7f7f", "standard": "#1f77b4", "rezero": "#2ca02c", "preserve": "#e6550d",
           FAST_GATES: "#9467bd"}
STYLES = {"plain": "-", "standard": "-", "rezero": "-", "preserve": "--",  # often hides plain
          FAST_GATES: ":"}


def plot_curves(runs: list[Run], path: Path, settings: Settings) -> Path:
    """Training loss per epoch, one panel per (family, depth), one line per variant; log scale."""
    from matplotlib.figure import Figure

    from ressurgeon._io import atomic_path

    families = list(dict.fromkeys(r.family for r in runs))
    depths = list(dict.fromkeys(r.depth for r in runs))
    fig = Figure(figsize=(max(3.6 * len(depths), 7.0) + 0.6, 3.0 * len(families) + 0.8),
                 layout="constrained")
    axes = fig.subplots(len(families), len(depths), sharey=True, squeeze=False)
    for i, family in enumerate(families):
        for j, depth in enumerate(depths):
            ax = axes[i][j]
            for r in runs:
                if r.family == family and r.depth == depth:
                    ax.plot(range(1, len(r.losses) + 1), r.losses, color=COLOURS[r.variant],
                            linestyle=STYLES[r.variant], linewidth=1.8,
                            label=f"{_variant(r, settings)} ({r.test_acc:.0%})")
            ax.set_yscale("log")
            ax.set_title(f"{family.upper()}, depth {depth}", fontsize=10)
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(loc="lower left", fontsize=7.5, frameon=False,
                      title="variant (test acc)", title_fontsize=7.5)
            if i == len(families) - 1:
                ax.set_xlabel("epoch")
            if j == 0:
                ax.set_ylabel("training loss (cross-entropy)")
    fig.suptitle("Digits: deep plain networks vs the same networks after add_skips\n"
                 "(same initial weights, optimizer and batches; dotted: gates on a larger "
                 "learning rate)", fontsize=11)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130)
    return path


def figures(data: dict, settings: Settings, depths, out: Path) -> list[Path]:
    """The gradient-flow figure of the deepest MLP and the surgery diagram of the shallowest CNN."""
    from ressurgeon import find_layers, trace_model
    from ressurgeon.diagnose import gradient_flow
    from ressurgeon.plot import plot_gradient_flow, plot_surgery
    from ressurgeon.spans import select_spans

    deep = max(depths)
    torch.manual_seed(settings.seed)
    mlp = digits_mlp(deep, settings.width)
    batch = (data["x_train"][:128],)
    report = gradient_flow(mlp, batch, SkipConfig(span=settings.span, init="standard"),
                           loss_fn=F.cross_entropy, target=data["y_train"][:128])
    paths = [plot_gradient_flow(report, out / "grad_flow_mlp.png", title=(
        f"Digits MLP, depth {deep}, PyTorch default init: one batch of 128, cross-entropy\n"
        f"plain vs {report.skips} standard shortcuts; first layer's gradient "
        f"x{report.first_gain:,.3g}"))]
    torch.manual_seed(settings.seed)
    cnn = digits_cnn(min(depths), settings.channels)
    gm = trace_model(cnn, (shaped("cnn", data["x_train"][:8]),))
    spans = select_spans(gm, SkipConfig(span=settings.span))
    paths.append(plot_surgery(find_layers(gm), spans, out / "surgery_cnn.png",
                              show_rejected=True, title=(
                                  f"Digits CNN, depth {min(depths)}: shortcuts add_skips "
                                  f"inserts (span {settings.span})")))
    return paths


def main(argv: list[str] | None = None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the tables and figures (default: examples/results/, "
                        "with --quick examples/results/quick/ so a smoke run never replaces "
                        "the committed results)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: depth 20 only, 3 epochs, a short fine-tune (seconds)")
    parser.add_argument("--depths", default=None,
                        help="comma-separated depths (default 20,40,60; --quick: 20)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs for every run (default 40; --quick: 3)")
    parser.add_argument("--families", default="mlp,cnn", help="mlp, cnn or both (default)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: steadier timings on a shared machine)")
    args = parser.parse_args(argv)

    if args.out is None:
        args.out = RESULTS / "quick" if args.quick else RESULTS
    settings = Settings(seed=0)
    if args.quick:
        settings.epochs, settings.pretrained, settings.finetune_epochs = 3, ((10, 4),), 1
    if args.epochs is not None:
        settings.epochs = args.epochs
    depths = [int(d) for d in (args.depths or ("20" if args.quick else "20,40,60")).split(",")]
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    if not set(families) <= set(FAMILIES) or not depths or min(depths) < 2:
        parser.error("--families takes mlp and/or cnn; --depths integers >= 2")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    data = load_data(settings.seed)
    runs = run_study(families, depths, (*VARIANTS, FAST_GATES), data, settings)
    tuned = finetune_study((*VARIANTS, FAST_GATES), data, settings)
    total = time.perf_counter() - start

    study, ft = study_table(runs, settings), finetune_table(tuned, settings)
    print()
    print(study)
    print()
    print(ft)
    print(f"\ntotal {total:.0f} s (torch {torch.__version__}, {args.threads} thread(s))")
    command = "python examples/train_digits.py" + (" --quick" if args.quick else "") + (
        f" --depths {args.depths}" if args.depths else "") + (
        f" --epochs {args.epochs}" if args.epochs is not None else "")
    s = settings
    (args.out / "train_digits.md").write_text(
        f"Command: `{command}` ({total:.0f} s in all, torch {torch.__version__}, "
        f"{args.threads} CPU thread(s)).\n\n"
        f"Settings: Adam lr {s.lr:g}, batch {s.batch}, {s.epochs} epochs, cross-entropy; MLP "
        f"width {s.width}; CNN channels {s.channels[0]} -> {s.channels[1]} (max-pool halfway); "
        f"PyTorch default init, no normalisation; shortcuts every {s.span} layers "
        f"(add_skips default placement); seed {s.seed} for weights and batches, so every "
        "variant of a network starts from the same weights and sees the same batches. "
        f"Test set: {len(data['y_test'])} images (20%, stratified).\n\n"
        f"Extra row per network, outside that same-optimizer comparison: init preserve "
        f"with the gates on Adam at {s.gate_lr_mult:g}x the learning rate.\n\n"
        f"## Trained from scratch\n\n{study}\n\n"
        f"## Surgery on a trained network\n\nPlain MLPs trained from scratch (depth and "
        f"epochs in the first column), then shortcuts added with each init (or none) and "
        f"fine-tuned for {s.finetune_epochs} epochs with a fresh Adam, same settings:\n\n"
        f"{ft}\n")
    (args.out / "train_digits.json").write_text(json.dumps(
        {"settings": asdict(s), "seconds": total, "from_scratch": [asdict(r) for r in runs],
         "finetune": [asdict(r) for r in tuned]}, indent=1))
    paths = [plot_curves(runs, args.out / "train_digits.png", settings),
             *figures(data, settings, depths, args.out)]
    for p in [args.out / "train_digits.md", args.out / "train_digits.json", *paths]:
        print(f"wrote {p}")
    return runs


if __name__ == "__main__":
    main()
