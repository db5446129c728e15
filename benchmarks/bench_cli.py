"""How fast does the CLI answer --help and --version, beside a bare `import torch`?

The package imports lazily, so `ressurgeon --help` and `--version` import no
torch. Each command runs in a fresh process, alternating with the reference
(`python -c "import torch"`), best of N after one warm-up each (the first
start of a fresh machine reads everything from disk).

    python benchmarks/bench_cli.py            # target: --help <= 0.5 s on an idle 2-core machine
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "ressurgeon --help": [sys.executable, "-m", "ressurgeon", "--help"],
    "ressurgeon --version": [sys.executable, "-m", "ressurgeon", "--version"],
    "ressurgeon add-skips --help": [sys.executable, "-m", "ressurgeon", "add-skips", "--help"],
}
TARGET_S = 0.5


def _time(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per command")
    args = parser.parse_args(argv)
    for cmd in COMMANDS.values():  # warm-up: disk cache, .pyc files
        _time(cmd)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.runs):  # alternate, so load on the machine hits every command alike
        for name, cmd in COMMANDS.items():
            times[name].append(_time(cmd))
    reference = min(times["python -c 'import torch'"])
    print(f"{'command':<30} {'best s':>8} {'median s':>9} {'vs import torch':>16}")
    best = {}
    for name, values in times.items():
        best[name] = min(values)
        print(f"{name:<30} {best[name]:8.3f} {statistics.median(values):9.3f} "
              f"{best[name] / reference:16.2f}")
    verdict = "ok" if best["ressurgeon --help"] <= TARGET_S else "over"
    print(f"ressurgeon --help: {best['ressurgeon --help']:.3f} s (target <= {TARGET_S} s: {verdict})")
    return best


if __name__ == "__main__":
    main()
