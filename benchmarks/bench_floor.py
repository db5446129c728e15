"""How close add_skips (verification off) comes to its floor: fx trace + ShapeProp.

The floor is what any fx pass over the model must pay: ``torch.fx.symbolic_trace``
and one ``torch.fx.passes.shape_prop.ShapeProp`` run on the same inputs. Both are
timed side by side in one process, alternating, after a warm-up, best of
--repeat each, on

- a MaxViT-like stack built in code (MBConv-style convs, then channels-last
  LayerNorm + MLP token mixing) with MaxViT's own residual adds, 1,606 graph
  nodes: like MaxViT-T, a model whose shortcuts are already there, so the pass
  finds and inserts nothing new and pays only for capture and analysis;
- the same blocks without their residual adds, 1,602 nodes, where the pass
  also inserts 114 shortcuts (the rewrite and recompiling are on top);
  on 56x56 inputs (the default --size) each costs about 6 GFLOPs, near
  MaxViT-T's 5.6, so the floor's arithmetic weighs as it does there; a small
  --size leaves mostly the fixed per-node costs (the copy, the rewrite,
  recompiling), and
- torchvision's ``maxvit_t`` (1,633 nodes) when torchvision is importable.

The target is a ratio <= 1.2.

    python benchmarks/bench_floor.py               # wall clock
    python benchmarks/bench_floor.py --clock cpu   # CPU time: steadier on a shared machine
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


class Residual(nn.Module):
    """``x + body(x)``: MaxViT's own shortcuts, around its MBConv and its MLP."""

    def __init__(self, *body: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*body)

    def forward(self, x):
        return x + self.body(x)


def residual_block(c: int) -> list[nn.Module]:
    """``plain_block`` with MaxViT's residual adds: the case the pass has little to add to."""
    conv, mlp = plain_block(c)[:7], plain_block(c)[8:12]
    return [Residual(*conv), ToLast(), Residual(*mlp), ToFirst(), nn.BatchNorm2d(c)]


def maxvit_like(blocks: int = 114, channels: int = 32, residual: bool = False) -> nn.Sequential:
    block = residual_block if residual else plain_block
    layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1)]
    for _ in range(blocks):
        layers += block(channels)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(channels, 10)).eval()


def floor(model: nn.Module, x: torch.Tensor) -> None:
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        ShapeProp(gm).propagate(x)


def the_pass(model: nn.Module, x: torch.Tensor) -> None:
    add_skips(model, (x,), SkipConfig(span=2), verify=False)


def side_by_side(model: nn.Module, x: torch.Tensor, repeat: int, clock) -> tuple[float, float]:
    """Best times of the floor and of the pass, run alternately after one warm-up of each."""
    floor(model, x)
    the_pass(model, x)
    best = {floor: float("inf"), the_pass: float("inf")}
    for _ in range(repeat):
        for fn in best:
            start = clock()
            fn(model, x)
            best[fn] = min(best[fn], clock() - start)
    return best[floor], best[the_pass]


def report(name: str, model: nn.Module, x: torch.Tensor, repeat: int, clock) -> None:
    nodes = len(torch.fx.symbolic_trace(model).graph.nodes)
    t_floor, t_pass = side_by_side(model, x, repeat, clock)
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
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: perf_counter; cpu: this process's CPU time, steadier "
                             "on a shared machine (the pass and its floor are one thread)")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {args.clock} clock")
    for size in args.size:
        x = torch.randn(1, 3, size, size)
        report(f"MaxViT-like {size}px", maxvit_like(100, residual=True), x, args.repeat, clock)
        report(f"plain MaxViT-like {size}px", maxvit_like(), x, args.repeat, clock)
    try:
        from torchvision.models import maxvit_t
    except Exception as exc:  # absent, or built for another torch
        print(f"maxvit_t: skipped (torchvision not importable: {type(exc).__name__})")
        return
    report("torchvision maxvit_t", maxvit_t().eval(), torch.randn(1, 3, 224, 224), args.repeat,
           clock)


if __name__ == "__main__":
    main()
