"""Hyper-connections by ressurgeon's rewire beside the authors' package, on the same model.

Needs the benchmark extra: ``pip install 'ressurgeon[bench]'`` (hyper-connections 0.4.11).

One pre-norm transformer language model (``tests.models.PreNormTransformer``) with random
weights stands for the user's model. Two hyper-connection models (n streams, dynamic, as the
package always is) are made from the same weights:

- ``rewire``: ``rewire(model, ..., RewireConfig(kind="hyper", n=n, dynamic=True))``;
- ``package``: the same blocks' sublayers wrapped by ``hyper_connections.HyperConnections``
  (``branch = Sequential(norm, sublayer)``, ``layer_index`` 0, 1, 2, ... so no stream is
  picked at random), the package's expand function before the blocks and its reduce function
  after them, as its README shows.

Reported: each model's max abs output difference from the original at insertion; forward +
backward + AdamW step time and saved-activation memory (interleaved rounds, as in
bench_rewire.py; ratio package / rewire); the training loss after the same steps from the
same seed on the same random token batches.

    python benchmarks/bench_rewire_authors.py              # depth 6, width 128; a few minutes
    python benchmarks/bench_rewire_authors.py --depth 2 --width 32 --seq 32 --steps 5   # quick
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root
from benchmarks.bench_rewire import saved_bytes  # noqa: E402
from ressurgeon import RewireConfig, rewire  # noqa: E402
from tests.models import PreNormTransformer  # noqa: E402

VOCAB = 256


class PackageHyper(nn.Module):
    """``base`` (a PreNormTransformer, copied) with the authors' HyperConnections per sublayer."""

    def __init__(self, base: PreNormTransformer, n: int) -> None:
        super().__init__()
        from hyper_connections import HyperConnections, get_init_and_expand_reduce_stream_functions

        base = copy.deepcopy(base)
        _, self.expand, self.reduce = get_init_and_expand_reduce_stream_functions(n)
        self.embed, self.pos, self.norm, self.head = base.embed, base.pos, base.norm, base.head
        dim = base.embed.embedding_dim
        self.hcs = nn.ModuleList()
        for i, block in enumerate(base.blocks):
            for k, (norm, sub) in enumerate([(block.norm1, block.attn), (block.norm2, block.mlp)]):
                self.hcs.append(HyperConnections(n, dim=dim, branch=nn.Sequential(norm, sub),
                                                 layer_index=2 * i + k))

    def forward(self, ids):
        x = self.expand(self.embed(ids) + self.pos[: ids.shape[1]])
        for hc in self.hcs:
            x = hc(x)
        return self.head(self.norm(self.reduce(x)))


def train(model, batches, lr: float) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for ids, targets in batches:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    base = PreNormTransformer(vocab=VOCAB, dim=args.width, heads=args.heads, depth=args.depth,
                              positions=args.seq).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (args.batch, args.seq), generator=gen)
    targets = torch.randint(0, VOCAB, (args.batch, args.seq), generator=gen)
    models = {"rewire": rewire(base, (ids[:1, :16],),
                               RewireConfig(kind="hyper", n=args.n, dynamic=True)).module,
              "package": PackageHyper(base, args.n)}
    with torch.no_grad():
        want = base(ids)
        diffs = {k: (m.eval()(ids) - want).abs().max().item() for k, m in models.items()}

    memory = {k: saved_bytes(m.train(), ids, targets) for k, m in models.items()}
    timing = {k: copy.deepcopy(m).train() for k, m in models.items()}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=args.lr) for k, m in timing.items()}
    times: dict[str, list[float]] = {k: [] for k in timing}
    for r in range(2 + args.rounds):
        for k, m in timing.items():
            start = time.perf_counter()
            opts[k].zero_grad(set_to_none=True)
            F.cross_entropy(m(ids).flatten(0, 1), targets.flatten()).backward()
            opts[k].step()
            if r >= 2:
                times[k].append(time.perf_counter() - start)

    batches = [(torch.randint(0, VOCAB, (args.batch, args.seq), generator=g),
                torch.randint(0, VOCAB, (args.batch, args.seq), generator=g))
               for g in [torch.Generator().manual_seed(2)] for _ in range(args.steps)]
    losses = {}
    for k, m in models.items():
        torch.manual_seed(3)
        losses[k] = train(m.train(), batches, args.lr)

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, hyper-connections {metadata.version('hyper-connections')}")
    print(f"pre-norm transformer: depth {args.depth}, width {args.width}, batch {args.batch}, "
          f"seq {args.seq}; hyper-connections n={args.n}, dynamic; float32")
    print(f"{'model':<8} {'diff at insertion':>17} {'best step s':>11} {'median s':>9} "
          f"{'saved MB':>9} {'loss@1':>7} {f'loss@{args.steps}':>9}")
    for k in models:
        print(f"{k:<8} {diffs[k]:17.3g} {min(times[k]):11.3f} "
              f"{statistics.median(times[k]):9.3f} {memory[k] / 2**20:9.1f} "
              f"{losses[k][0]:7.3f} {losses[k][-1]:9.3f}")
    print(f"package / rewire: step time x{min(times['package']) / min(times['rewire']):.2f}, "
          f"memory x{memory['package'] / memory['rewire']:.2f}, final loss "
          f"x{losses['package'][-1] / losses['rewire'][-1]:.3f}")


if __name__ == "__main__":
    main()
