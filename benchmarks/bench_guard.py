"""What the non-finite guard costs: ONNX ops and CPU latency of a gated shortcut, with and without.

A closed gate must contribute exactly 0 even where the shortcut's value is inf
(IEEE: 0 * inf = NaN), so each gated term is ``g * where(isfinite(v) | (g != 0), v, 0)``
(``ressurgeon.shortcuts.base.gated``) instead of ``g * v``. This script exports the 20-conv
VGG-like CNN of ``bench_onnx.py`` with ``add_skips(init="preserve")`` and trained-like gates
twice, with the guard and with a plain ``g * v``, and reports the ONNX node counts and the
ONNX Runtime CPU latency (median of rounds, each the fastest of ``--runs``; alternating
order). ``fold`` emits plain Muls, so a folded model carries no guard at all.

    python benchmarks/bench_guard.py                 # about 30 s on 2 cores
    python benchmarks/bench_guard.py --size 32 --rounds 5
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for benchmarks/
from benchmarks._models import build_cnns  # noqa: E402


def _export(module, example, path: Path, guarded: bool) -> collections.Counter:
    import onnx

    from ressurgeon import export_onnx
    from ressurgeon.shortcuts import add

    plain = (lambda coef, value: coef * value)
    with mock.patch.object(add, "gated", add.gated if guarded else plain):
        export_onnx(module, path, (example,))
    graph = onnx.load(str(path)).graph
    return collections.Counter(node.op_type for node in graph.node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    import numpy as np
    import onnxruntime as ort

    cnns = build_cnns(args.size)
    x = cnns.example
    times: dict[str, list[float]] = {"guarded": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        sessions, ops = {}, {}
        for name in times:
            path = Path(tmp) / f"{name}.onnx"
            ops[name] = _export(cnns.trained, x, path, name == "guarded")
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = 1
            sessions[name] = ort.InferenceSession(str(path), options,
                                                  providers=["CPUExecutionProvider"])
        feed = {sessions["plain"].get_inputs()[0].name: x.numpy().astype(np.float32)}
        for session in sessions.values():
            session.run(None, feed)
        for r in range(args.rounds):
            for name in (list(times) if r % 2 == 0 else list(times)[::-1]):
                best = float("inf")
                for _ in range(args.runs):
                    start = time.perf_counter()
                    sessions[name].run(None, feed)
                    best = min(best, time.perf_counter() - start)
                times[name].append(best)
    for name in times:
        count = sum(ops[name].values())
        print(f"{name:8s} ONNX nodes {count:4d}  isfinite-guard ops "
              f"{ops[name]['IsInf'] + ops[name]['IsNaN'] + ops[name]['Where']:3d}  "
              f"ORT CPU {1e3 * statistics.median(times[name]):.3f} ms")
    ratio = statistics.median(g / p for g, p in zip(times["guarded"], times["plain"]))
    print(f"guarded/plain latency (paired median over {args.rounds} rounds): {ratio:.3f}; "
          f"{args.size}px, batch 1, 1 thread")


if __name__ == "__main__":
    main()
