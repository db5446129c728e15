"""How add_skips scales with depth: plain MLPs of 150 and 1,200 Linear+ReLU layers.

Both are timed in one process, after a warm-up run (the first pass in a fresh
process pays for imports and allocator warm-up), best of --repeat runs each.
A linear-time pass gives a ratio near 8; the target is <= 12.

    python benchmarks/bench_pass.py
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn as nn

from ressurgeon import SkipConfig, add_skips


def plain_mlp(depth: int, width: int = 32) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10)).eval()


def best_time(model: nn.Module, x: torch.Tensor, repeat: int) -> tuple[float, int]:
    best, skips = float("inf"), 0
    for _ in range(repeat):
        start = time.perf_counter()
        result = add_skips(model, (x,), SkipConfig(span=2))
        best = min(best, time.perf_counter() - start)
        skips = len(result.skips)
    return best, skips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs=2, default=(150, 1200))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(8, 32)
    add_skips(plain_mlp(10), (x,))  # warm-up
    small, large = args.depths
    t_small, n_small = best_time(plain_mlp(small), x, args.repeat)
    t_large, n_large = best_time(plain_mlp(large), x, args.repeat)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"depth {small:5d}: {t_small:7.3f} s  ({n_small} skips)")
    print(f"depth {large:5d}: {t_large:7.3f} s  ({n_large} skips)")
    print(f"ratio {large}/{small}: {t_large / t_small:.2f}  (layers ratio {large / small:.0f}; "
          "target <= 12)")


if __name__ == "__main__":
    main()
