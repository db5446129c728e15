"""What shortcuts cost at inference: ONNX Runtime CPU latency of a 20-conv VGG-like CNN.

Models, all exported with ``export_onnx`` (dynamo exporter, dynamic batch)
and run with ORT_ENABLE_ALL on the CPU provider:

  (a) the plain CNN (conv + BN + ReLU, max-pooling, linear head);
  (b) the same network written by hand with residual blocks at the places
      add_skips chooses (what a user would otherwise write);
  (c) add_skips(a, span=2, init="standard"), exported as it is;
  (d) fold(add_skips(a, init="preserve")): zero gates, shortcuts removed;
  (e) add_skips(a, init="preserve") with trained-like gates (0.3..0.7), unfolded;
  (f) fold(e): gates absorbed into the weights, plain Adds fused into the convs.

One process; every session is warmed up first, then the models run in
alternating rounds (the order rotates each round): each round times every
model ``--runs`` times back to back and keeps the fastest (a preempted run on
a shared machine is noise, not cost). Reported: each model's median over the
rounds, and the median over rounds of its time divided by (a)'s time in the
same round (paired, so load that drifts between rounds cancels). Targets:
(c)/(a) <= 1.10, (c)/(b) <= 1.03, (d)/(a) <= 1.03. (d) is (a)'s own graph
(same ONNX ops once folded), so (d)/(a) also shows the noise floor.

    python benchmarks/bench_onnx.py            # about a minute on 2 cores
    python benchmarks/bench_onnx.py --size 32 --rounds 20   # quicker
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for benchmarks/
from benchmarks._models import build_cnns  # noqa: E402
from ressurgeon import export_onnx, fold, fusion_report  # noqa: E402


def build_models(size: int, folder: Path) -> dict[str, Path]:
    cnns = build_cnns(size)
    x = cnns.example
    models = {
        "(a) plain CNN": cnns.plain,
        "(b) hand-written residual": cnns.twin,
        "(c) add_skips standard": cnns.standard,
        "(d) fold(add_skips preserve)": fold(cnns.preserve, (x,)).module,
        "(e) preserve, gates 0.3-0.7": cnns.trained,
        "(f) fold(e)": fold(cnns.trained, (x,)).module,
    }
    paths = {}
    for i, (name, model) in enumerate(models.items()):
        paths[name] = folder / f"model_{i}.onnx"
        export_onnx(model, paths[name], (x,))
    return paths


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--rounds", type=int, default=60, help="alternating rounds")
    parser.add_argument("--runs", type=int, default=3, help="back-to-back runs per model per "
                        "round; the fastest counts")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    args = parser.parse_args()
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        paths = build_models(args.size, Path(tmp))
        fusions = {name: fusion_report(p) for name, p in paths.items()}
        sessions = {name: session(p, args.threads) for name, p in paths.items()}
        feed = {"input": np.random.default_rng(0).standard_normal(
            (1, 3, args.size, args.size)).astype(np.float32)}
        for s in sessions.values():   # warm-up: the first runs pay for allocation and packing
            for _ in range(10):
                s.run(None, feed)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        names = list(sessions)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                s, best = sessions[name], float("inf")
                for _ in range(args.runs):
                    start = time.perf_counter()
                    s.run(None, feed)
                    best = min(best, time.perf_counter() - start)
                times[name].append(best)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    base_times = times["(a) plain CNN"]
    ratio = {name: statistics.median(x / y for x, y in zip(t, base_times))
             for name, t in times.items()}
    print(f"machine: {platform.machine()}, onnxruntime {ort.__version__} CPU, "
          f"{args.threads} thread(s), input 1x3x{args.size}x{args.size}, "
          f"{args.rounds} rounds x {args.runs} runs")
    print(f"{'model':32s} {'median ms':>9s} {'vs (a)':>7s} {'convs':>5s} {'fused Add':>9s} "
          f"{'Add':>4s} {'Mul':>4s}")
    for name, ms in med.items():
        f = fusions[name]
        print(f"{name:32s} {ms:9.3f} {ratio[name]:7.3f} {f.convs:5d} {f.fused_add:9d} "
              f"{f.adds:4d} {f.muls:4d}")
    b, c = "(b) hand-written residual", "(c) add_skips standard"
    c_over_b = statistics.median(x / y for x, y in zip(times[c], times[b]))
    for label, value, target in (("(c)/(a)", ratio[c], 1.10), ("(c)/(b)", c_over_b, 1.03),
                                 ("(d)/(a)", ratio["(d) fold(add_skips preserve)"], 1.03)):
        verdict = "ok" if value <= target else "MISSED"
        print(f"{label} = {value:.3f}  (target <= {target:.2f}: {verdict})")
    print(f"(e)/(a) = {ratio['(e) preserve, gates 0.3-0.7']:.3f}  "
          f"(f)/(a) = {ratio['(f) fold(e)']:.3f}  (gated Muls unfolded vs folded)")


if __name__ == "__main__":
    main()
