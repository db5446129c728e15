"""What rewiring costs: training-step time and activation memory, rewired / original.

One pre-norm transformer language model (``tests.models.PreNormTransformer``: depth 12,
width 256, 8 heads; batch 8, sequence 256 by default), CPU, float32, and its rewired
copies, all measured in one process:

- ``dwa``        DenseFormer, dilation 1, period 1 (an average after every block over every
                 earlier output);
- ``dwa-4x5``    the paper's cheaper "4x5-DenseFormer": dilation 4, period 5;
- ``hyper-2``    hyper-connections, n = 2 (static);
- ``hyper-4``    hyper-connections, n = 4 (static);
- ``hyper-4-dyn`` hyper-connections, n = 4, dynamic.

Step time: one forward + backward + SGD step on a cross-entropy loss. The variants take
turns, one step each per round (so a load change on a shared machine hits them alike),
after --warmup rounds; the best (the least disturbed by other load) and the median of
--rounds rounds are reported, and the ratios use the best. Memory: the bytes of the
tensors autograd keeps for the backward pass (counted once per storage), which is what
grows the peak of a forward + backward beyond the weights and their gradients; CPU
allocators give no peak figure of their own.

    python benchmarks/bench_rewire.py                       # the issue's setting; minutes
    python benchmarks/bench_rewire.py --depth 4 --width 64 --seq 64 --rounds 3   # quick
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root
from ressurgeon import RewireConfig, rewire  # noqa: E402
from tests.models import PreNormTransformer  # noqa: E402

VARIANTS = {
    "dwa": RewireConfig(kind="dwa"),
    "dwa-4x5": RewireConfig(kind="dwa", dilation=4, period=5),
    "hyper-2": RewireConfig(kind="hyper", n=2),
    "hyper-4": RewireConfig(kind="hyper", n=4),
    "hyper-4-dyn": RewireConfig(kind="hyper", n=4, dynamic=True),
}
VOCAB = 256


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for the backward of one loss."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def step(model, opt, ids, targets) -> float:
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(ids).flatten(0, 1), targets.flatten()).backward()
    opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args()

    torch.manual_seed(0)
    base = PreNormTransformer(vocab=VOCAB, dim=args.width, heads=args.heads, depth=args.depth,
                              positions=args.seq).train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (args.batch, args.seq), generator=gen)
    targets = torch.randint(0, VOCAB, (args.batch, args.seq), generator=gen)
    models = {"original": base}
    for name in args.variants:
        models[name] = rewire(base, (ids[:1, :16],), VARIANTS[name]).module.train()
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-4) for k, m in models.items()}
    memory = {k: saved_bytes(m, ids, targets) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.warmup + args.rounds):
        for k, m in models.items():
            t = step(m, opts[k], ids, targets)
            if r >= args.warmup:
                times[k].append(t)

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"pre-norm transformer: depth {args.depth}, width {args.width}, batch {args.batch}, "
          f"seq {args.seq}, float32; {args.rounds} interleaved rounds after "
          f"{args.warmup} warm-up")
    base_t, base_m = min(times["original"]), memory["original"]
    print(f"{'variant':<12} {'best s':>8} {'median s':>9} {'time x':>7} {'saved MB':>9} "
          f"{'memory x':>9} {'new params':>10}")
    for k, m in models.items():
        t = min(times[k])
        added = sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in base.parameters())
        print(f"{k:<12} {t:8.3f} {statistics.median(times[k]):9.3f} {t / base_t:7.3f} "
              f"{memory[k] / 2**20:9.1f} {memory[k] / base_m:9.3f} {added:10,d}")


if __name__ == "__main__":
    main()
