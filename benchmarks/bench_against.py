"""This checkout's add_skips against another's, on bench_pass's plain MLPs (150 and 1,200
Linear+ReLU layers): alternating subprocesses, best of 2 runs per subprocess and of all
rounds, CPU time of one torch thread (steadier than wall time on a shared machine).

    git worktree add /tmp/old_release cf35128 --detach      # the release before the layout change
    python benchmarks/bench_against.py /tmp/old_release --rounds 5

Prints new/old per depth; the architecture issue's bound is new/old <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import sys, time, json
sys.path.insert(0, ROOT)
import torch, torch.nn as nn
torch.set_num_threads(1)
import ressurgeon
assert ressurgeon.__file__.startswith(ROOT), ressurgeon.__file__
from ressurgeon import SkipConfig, add_skips
def plain_mlp(depth, width=32):
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10)).eval()
torch.manual_seed(0)
x = torch.randn(8, 32)
add_skips(plain_mlp(10), (x,))
out = {}
for depth in (150, 1200):
    m = plain_mlp(depth)
    best = 9e9
    for _ in range(2):
        s = time.process_time(); add_skips(m, (x,), SkipConfig(span=2)); best = min(best, time.process_time() - s)
    out[depth] = best
print(json.dumps(out))
'''
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path, help="the other checkout (a git worktree)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    roots = {"old": str(args.old.resolve()), "new": str(Path(__file__).resolve().parents[1])}
    best: dict[str, dict[str, float]] = {k: {} for k in roots}
    for r in range(args.rounds):
        for label in (("old", "new") if r % 2 == 0 else ("new", "old")):
            res = subprocess.run([sys.executable, "-c", f"ROOT={roots[label]!r}\n" + CHILD],
                                 capture_output=True, text=True, cwd="/tmp")
            if res.returncode:
                sys.exit(f"{label}: {res.stderr[-2000:]}")
            for d, t in json.loads(res.stdout.strip().splitlines()[-1]).items():
                best[label][d] = min(best[label].get(d, float("inf")), t)
    for d in best["new"]:
        old, new = best["old"][d], best["new"][d]
        print(f"depth {d:>5}: old {old:.3f} s  new {new:.3f} s  new/old {new / old:.2f}")


if __name__ == "__main__":
    main()
