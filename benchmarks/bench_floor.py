"""How close add_skips (verification off) comes to its floor: fx trace + ShapeProp.

The floor is what any fx pass over the model must pay: ``torch.fx.symbolic_trace``
and one ``torch.fx.passes.shape_prop.ShapeProp`` run on the same inputs. Both are
timed side by side in one process, alternating, after a warm-up, best of
--repeat each, on

- a MaxViT-like stack of plain blocks built in code (MBConv-style convs, then
  channels-last LayerNorm + MLP token mixing; no residuals), 1,602 graph nodes;
  on 56x56 inputs (the default --size) it costs about 6 GFLOPs, near MaxViT-T's
  5.6, so the floor's arithmetic weighs as it does there; a small --size leaves
  mostly the fixed per-node costs (the deep copy, the rewrite, recompiling), and
- torchvision's ``maxvit_t`` (1,633 nodes) when torchvision is importable.

The target is a ratio <= 1.2.

    python benchmarks/bench_floor.py
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from ressurgeon import SkipConfig, add_skips


class ToLast(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


class ToFirst(nn.Module):
    def forward(self, x):
        return x.permute(0, 3, 1, 2)


def plain_block(c: int) -> list[nn.Module]:
    """One MaxViT-like block without its residual adds: 14 graph nodes."""
    return [nn.Conv2d(c, 2 * c, 1), nn.BatchNorm2d(2 * c), nn.GELU(),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c), nn.BatchNorm2d(2 * c),
            nn.GELU(), nn.Conv2d(2 * c, c, 1),
            ToLast(), nn.LayerNorm(c), nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c),
            ToFirst(), nn.BatchNorm2d(c)]


def plain_maxvit_like(blocks: int = 114, channels: int = 32) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1)]
    for _ in range(blocks):
        layers += plain_block(channels)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(channels, 10)).eval()


def floor(model: nn.Module, x: torch.Tensor) -> None:
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        ShapeProp(gm).propagate(x)


def the_pass(model: nn.Module, x: torch.Tensor) -> None:
    add_skips(model, (x,), SkipConfig(span=2), verify=False)


def side_by_side(model: nn.Module, x: torch.Tensor, repeat: int) -> tuple[float, float]:
    """Best times of the floor and of the pass, run alternately after one warm-up of each."""
    floor(model, x)
    the_pass(model, x)
    best = {floor: float("inf"), the_pass: float("inf")}
    for _ in range(repeat):
        for fn in best:
            start = time.perf_counter()
            fn(model, x)
            best[fn] = min(best[fn], time.perf_counter() - start)
    return best[floor], best[the_pass]


def report(name: str, model: nn.Module, x: torch.Tensor, repeat: int) -> None:
    nodes = len(torch.fx.symbolic_trace(model).graph.nodes)
    t_floor, t_pass = side_by_side(model, x, repeat)
    print(f"{name:25s} {nodes:5d} nodes  floor {t_floor:7.3f} s  add_skips {t_pass:7.3f} s  "
          f"ratio {t_pass / t_floor:5.2f}  (target <= 1.2)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--size", type=int, nargs="+", default=[56],
                        help="input height and width of the built model (one run per size)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the ratio measures the pass, not contention)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    for size in args.size:
        report(f"plain MaxViT-like {size}px", plain_maxvit_like(), torch.randn(1, 3, size, size),
               args.repeat)
    try:
        from torchvision.models import maxvit_t
    except Exception as exc:  # absent, or built for another torch
        print(f"maxvit_t: skipped (torchvision not importable: {type(exc).__name__})")
        return
    report("torchvision maxvit_t", maxvit_t().eval(), torch.randn(1, 3, 224, 224), args.repeat)


if __name__ == "__main__":
    main()
