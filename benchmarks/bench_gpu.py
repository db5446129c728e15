"""What shortcuts cost at GPU inference: latency of the 20-conv CNN in its forms, on CUDA.

Variants (built by ``benchmarks/_models.py``, shared with bench_onnx; eval mode):

  plain          the plain CNN (conv + BN + ReLU, max-pooling, linear head)
  twin           the same network with residual blocks written by hand where
                 add_skips puts its shortcuts (what a user would otherwise write)
  standard       add_skips(plain, span=2, init="standard")
  trained        add_skips(plain, span=2, init="preserve") with gates 0.3-0.7,
                 as fine-tuning leaves them, not folded
  fold_trained   fold(trained): gates absorbed into the weights, BatchNorm folded
  fold_plain, fold_twin
                 BatchNorm folded: the baselines for fold_trained, so that what
                 BatchNorm folding saves is not credited to the shortcuts

Sections (one column each): torch eager and torch.compile in float16 and
bfloat16, channels-last, cudnn.benchmark on; ONNX Runtime's CUDA and TensorRT
execution providers in float16 (``export_onnx(..., fp16=True)``) when
onnxruntime-gpu provides them, else a printed note.

Method: one process. Each section first runs every variant (compiling,
autotuning and allocating: the first passes in a fresh process are 10-30x
slower), then warms each up, then times the variants in alternating rounds,
the order rotating each round. A variant's time in a round is the mean over
``--iters`` back-to-back forward passes between two CUDA events (torch), or
wall-clock time up to synchronized outputs (ONNX Runtime, whose CUDA stream
torch's events do not see). A ratio is the median over rounds of the two
variants' times in the same round (paired, so drift between rounds cancels),
shown with its interquartile range.

    python benchmarks/bench_gpu.py            # 128x128, batch 64, 12 rounds x 40; under 8 min
    python benchmarks/bench_gpu.py --quick    # batch 16, 4 rounds x 10; compile/ORT on 2 variants
    python benchmarks/bench_gpu.py --device cpu --smoke   # every path that runs on a CPU, tiny

After ``--budget-s`` seconds nothing more is compiled, exported or built: the
variants already prepared are timed, the rest noted as skipped, so a full run
stays under 8 minutes where compilation or TensorRT engine builds are slow.
Results: markdown tables on stdout, progress on stderr, JSON to ``--json-out``
(default ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for benchmarks/
from benchmarks._models import TRAINED_GATES, build_cnns, gates_left_after_fold, kept_gates  # noqa: E402,F401
from ressurgeon import export_onnx, fold  # noqa: E402

VARIANTS = {
    "plain": "plain CNN",
    "twin": "hand-written residual twin",
    "standard": "add_skips standard",
    "trained": "preserve, trained gates {:g}-{:g}, unfolded".format(*TRAINED_GATES),
    "fold_trained": "fold(trained preserve)",
    "fold_plain": "fold(plain)",
    "fold_twin": "fold(twin)",
}
# (numerator, denominator, what the ratio measures)
RATIOS = (
    ("standard", "twin", "add_skips standard / hand-written twin"),
    ("standard", "plain", "add_skips standard / plain"),
    ("twin", "plain", "hand-written twin / plain (the residual adds themselves)"),
    ("trained", "plain", "preserve with trained gates, unfolded / plain"),
    ("fold_trained", "fold_twin", "fold(trained preserve) / fold(twin)"),
    ("fold_twin", "fold_plain", "fold(twin) / fold(plain) (residual adds after folding)"),
    ("fold_plain", "plain", "fold(plain) / plain (BatchNorm folding alone)"),
)
# What the costly sections of a short run build: enough for one shortcut ratio.
PAIR = ("plain", "standard")
ORT_PROVIDERS = {   # device type -> {execution provider: column name}
    "cuda": {"CUDAExecutionProvider": "ORT CUDA", "TensorrtExecutionProvider": "ORT TensorRT"},
    "cpu": {"CPUExecutionProvider": "ORT CPU"},
}
ORT_DTYPES = ("float16", "float32")   # what export_onnx writes (fp16=True or not)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_DTYPES = {"cuda": ("float16", "bfloat16"),
                  "cpu": ("float32",)}   # fp16 convolutions on a CPU are slow or missing


@dataclass(frozen=True)
class Preset:
    """Sizes and repetitions of one kind of run."""

    size: int                     # input height and width
    batch: int
    rounds: int                   # alternating rounds; one paired ratio each
    iters: int                    # forward passes per variant per round
    warmup: int                   # passes per variant before the first round
    costly: tuple[str, ...]       # variants that torch.compile and ONNX sections build
    compile_backend: str


PRESETS = {
    "full": Preset(128, 64, rounds=12, iters=40, warmup=10, costly=tuple(VARIANTS),
                   compile_backend="inductor"),
    "quick": Preset(128, 16, rounds=4, iters=10, warmup=3, costly=PAIR,
                    compile_backend="inductor"),
    # inductor on a CPU compiles C++ for minutes; dynamo with the eager backend
    # still runs the guard, the compile call and the timing around it
    "smoke": Preset(16, 2, rounds=2, iters=2, warmup=1, costly=PAIR, compile_backend="eager"),
}

Clock = Callable[[int], float]   # iterations -> milliseconds per iteration


# -- timing ---------------------------------------------------------------------------------------

def event_clock(run: Callable[[], object]) -> Clock:
    """Time ``run`` with CUDA events: the stream's elapsed time, no host sync per pass."""
    def measure(iters: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    return measure


def wall_clock(run: Callable[[], object], sync: Callable[[], object] = lambda: None) -> Clock:
    """Time ``run`` with perf_counter, ``sync`` first and last (CPU, or ONNX Runtime's stream)."""
    def measure(iters: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            run()
        sync()
        return (time.perf_counter() - start) * 1e3 / iters
    return measure


def alternate(clocks: dict[str, Clock], rounds: int, iters: int,
              warmup: int) -> dict[str, list[float]]:
    """Milliseconds per iteration, one per round per variant, the order rotating each round."""
    for clock in clocks.values():
        clock(warmup)
    names = list(clocks)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(clocks[name](iters))
    return times


def spread(values: list[float]) -> dict[str, float]:
    """Median, quartiles and range."""
    q1, _, q3 = (statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1
                 else values * 3)
    return {"median": statistics.median(values), "q1": q1, "q3": q3,
            "min": min(values), "max": max(values)}


class OverBudget(Exception):
    """The run's time budget is spent; what was about to start is skipped."""


@dataclass
class Budget:
    """Wall-clock seconds for the whole run, checked before each costly step."""

    seconds: float
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def check(self, what: str) -> None:
        if self.elapsed() > self.seconds:
            raise OverBudget(f"{self.elapsed():.0f} s of the {self.seconds:g} s budget "
                             f"(--budget-s) spent before {what}")

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", file=sys.stderr, flush=True)


@dataclass
class Section:
    """One column of the tables: an engine and dtype, its variants' times, and notes."""

    name: str
    engine: str
    dtype: str
    variants: tuple[str, ...]
    times: dict[str, list[float]] = field(default_factory=dict)   # ms per batch, per round
    prepare_s: float = 0.0       # compiling, exporting, building engines, first passes
    note: str | None = None      # why it was skipped, or timed only in part

    @property
    def status(self) -> str:
        return "skipped" if not self.times else "partial" if self.note else "timed"

    def latency(self) -> dict[str, dict[str, float]]:
        return {name: spread(t) for name, t in self.times.items()}

    def ratios(self) -> dict[str, dict]:
        """Per-round ratios of each pair in RATIOS this section timed, and their spread."""
        out = {}
        for num, den, _ in RATIOS:
            if num in self.times and den in self.times:
                per_round = [a / b for a, b in zip(self.times[num], self.times[den])]
                out[f"{num}/{den}"] = {**spread(per_round), "per_round": per_round}
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "status": self.status, "latency_ms": self.latency(),
                "ratios": self.ratios()}


def time_section(section: Section, prepare: Callable[[str], Clock], preset: Preset,
                 budget: Budget) -> None:
    """Prepare every variant's clock, then time them in alternating rounds.

    Out of budget, the variants already prepared are still timed (a few
    seconds), so a slow compiler or engine builder costs a column's tail,
    not the column.
    """
    started, clocks = time.perf_counter(), {}
    try:
        for name in section.variants:
            budget.check(name)
            budget.log(f"{section.name}: preparing {name}")
            clocks[name] = prepare(name)
    except OverBudget as exc:
        section.note = f"{exc}; timed {len(clocks)} of {len(section.variants)} variants"
    section.prepare_s = time.perf_counter() - started
    if clocks:
        budget.log(f"{section.name}: timing")
        section.times = alternate(clocks, preset.rounds, preset.iters, preset.warmup)


# -- sections -------------------------------------------------------------------------------------

def torch_section(models: dict[str, nn.Module], variants: tuple[str, ...], x: torch.Tensor,
                  dtype: str, device: torch.device, backend: str | None, preset: Preset,
                  budget: Budget) -> Section:
    """Time ``variants`` in torch, eager (``backend`` None) or torch.compile'd, channels-last."""
    engine = "eager" if backend is None else "torch.compile" + (
        f"({backend})" if backend != "inductor" else "")
    section = Section(f"{engine} {dtype}", engine, dtype, variants)
    fmt = {"device": device, "dtype": DTYPES[dtype], "memory_format": torch.channels_last}
    x = x.to(**fmt)
    clock = event_clock if device.type == "cuda" else wall_clock

    def prepare(name: str) -> Clock:
        model = copy.deepcopy(models[name]).to(**fmt)
        if backend is not None:
            model = torch.compile(model, backend=backend)
        model(x)   # compile and autotune now, so failures surface before timing
        return clock(functools.partial(model, x))

    try:
        with torch.inference_mode():
            time_section(section, prepare, preset, budget)
    except Exception as exc:   # torch.compile may fail on a given stack; eager re-raises
        if backend is None:
            raise
        section.note = f"torch.compile failed: {type(exc).__name__}: {first_line(exc)}"
    finally:
        if backend is not None:
            torch.compiler.reset()   # no stale guards or cache limits carried into the next section
    return section


def ort_sections(models: dict[str, nn.Module], variants: tuple[str, ...], x: torch.Tensor,
                 example: torch.Tensor, dtypes: tuple[str, ...], device: torch.device,
                 preset: Preset, budget: Budget, folder: Path) -> list[Section]:
    """Time ``variants`` in each ONNX Runtime provider available, each file exported once."""
    wanted = ORT_PROVIDERS[device.type]
    sections = [Section(f"ORT {d}", "onnxruntime", d, variants,
                        note=f"export_onnx writes {' or '.join(ORT_DTYPES)} only")
                for d in dtypes if d not in ORT_DTYPES]
    pairs = [(p, d) for d in dtypes if d in ORT_DTYPES for p in wanted]
    try:
        import onnxruntime as ort
    except ImportError:
        missing = "onnxruntime is not installed (pip install onnxruntime-gpu)"
        return sections + [Section(f"{wanted[p]} {d}", p, d, variants, note=missing)
                           for p, d in pairs]
    available = ort.get_available_providers()
    for provider, dtype in pairs:
        section = Section(f"{wanted[provider]} {dtype}", provider, dtype, variants)
        sections.append(section)
        if provider not in available:
            section.note = (f"{provider} is not in onnxruntime.get_available_providers() "
                            f"{available} (onnxruntime-gpu provides it)")
            continue
        array = x.to(DTYPES[dtype]).numpy()

        def prepare(name: str) -> Clock:
            path = folder / f"{name}-{dtype}.onnx"
            if not path.exists():   # written atomically, so it exists only when complete
                export_onnx(models[name], path, (example,), fp16=dtype == "float16")
            return ort_clock(path, provider, array, device, folder)

        try:
            time_section(section, prepare, preset, budget)
        except Exception as exc:   # provider setups vary (CUDA, cuDNN, TensorRT versions)
            section.note = f"{type(exc).__name__}: {first_line(exc)}"
    return sections


class ProviderFallback(Exception):
    """ONNX Runtime lists a provider, but the session runs elsewhere (libraries missing)."""


def ort_clock(path: Path, provider: str, array, device: torch.device, cache: Path) -> Clock:
    """A session on ``provider`` with input and output bound on the device, run once.

    TensorRT builds one engine for the timed shape (the file's batch is
    dynamic) and shares layer timings between the variants' builds through
    ``cache``; CUDA runs what TensorRT cannot.
    """
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(path), load_external_data=False).graph
    input_name = graph.input[0].name
    index = device.index or 0
    cuda = ("CUDAExecutionProvider", {"device_id": index})
    shape = f"{input_name}:" + "x".join(map(str, array.shape))
    providers = {
        "CPUExecutionProvider": ["CPUExecutionProvider"],
        "CUDAExecutionProvider": [cuda],
        "TensorrtExecutionProvider": [("TensorrtExecutionProvider", {
            "device_id": index, "trt_fp16_enable": array.dtype.itemsize == 2,
            "trt_profile_min_shapes": shape, "trt_profile_opt_shapes": shape,
            "trt_profile_max_shapes": shape, "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache)}), cuda],
    }[provider]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if provider == "CPUExecutionProvider":
        options.intra_op_num_threads = torch.get_num_threads()   # the cores torch had
    session = ort.InferenceSession(str(path), options, providers=providers)
    if session.get_providers()[0] != provider:
        raise ProviderFallback(f"{provider} is listed but did not load (the session runs on "
                               f"{session.get_providers()}): its CUDA/cuDNN/TensorRT libraries "
                               "are missing or do not match")
    kind = "cuda" if device.type == "cuda" else "cpu"
    binding = session.io_binding()   # input and output stay on the device: no copies timed
    value = ort.OrtValue.ortvalue_from_numpy(array, kind, index)
    binding.bind_ortvalue_input(input_name, value)
    binding.bind_output(session.get_outputs()[0].name, kind, index)

    def run():
        session.run_with_iobinding(binding)
        return value   # held as long as the clock: on a CPU it is a view of `array`

    run()   # TensorRT builds its engine on the first run
    binding.synchronize_outputs()
    return wall_clock(run, binding.synchronize_outputs)


# -- report ---------------------------------------------------------------------------------------

def environment(device: torch.device) -> dict:
    """Versions and the device name, for the report's header and JSON."""
    try:
        import onnxruntime as ort
        onnxruntime = {"version": ort.__version__, "providers": ort.get_available_providers()}
    except ImportError:
        onnxruntime = None
    return {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or platform.machine()),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(), "machine": platform.machine(),
        "onnxruntime": onnxruntime,
    }


def render_markdown(report: dict) -> str:
    """The report's header, ratio and latency tables, notes and elapsed time."""
    env, cfg = report["environment"], report["config"]
    ort = env["onnxruntime"]
    lines = [
        (f"device: {env['device']} ({cfg['device']}); torch {env['torch']}, CUDA {env['cuda']}, "
         f"cuDNN {env['cudnn']}; onnxruntime {ort['version'] if ort else 'not installed'}"),
        (f"input {cfg['batch']}x3x{cfg['size']}x{cfg['size']}, channels-last; {cfg['rounds']} "
         f"alternating rounds x {cfg['iters']} iterations, warm-up {cfg['warmup']}; "
         f"preset {cfg['preset']}"),
    ]
    timed = [s for s in report["sections"] if s["status"] != "skipped"]
    if timed:
        lines += tables(timed, cfg["batch"])
    gates = report["gates_left_after_fold"]
    lines += ["", f"gates left after fold (trained preserve): {gates['count']}"]
    lines += [f"  - {reason}" for reason in gates["reasons"]]
    lines += [f"note: {s['name']}: {s['note']}" for s in report["sections"] if s["note"]]
    lines.append(f"elapsed: {report['elapsed_s']:.1f} s")
    return "\n".join(lines)


def tables(timed: list[dict], batch: int) -> list[str]:
    """Markdown lines: ratios, then latencies, one column per timed section."""
    head = " | ".join(s["name"] for s in timed) + " |"
    rule = "|---|" + "---:|" * len(timed)
    lines = ["", "| ratio (median of per-round ratios [IQR]) | " + head, rule]
    for num, den, label in RATIOS:
        cells = [(f"{r['median']:.3f} [{r['q1']:.3f}-{r['q3']:.3f}]"
                  if (r := s["ratios"].get(f"{num}/{den}")) else "-") for s in timed]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"| variant (median ms per batch of {batch}) | " + head, rule]
    for key, label in VARIANTS.items():
        cells = [(f"{t['median']:.3f}" if (t := s["latency_ms"].get(key)) else "-") for s in timed]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def write_json(path: Path, data: dict) -> None:
    """Write via a temporary file and os.replace: an interrupted run leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)   # mkstemp's 0600 would make the results private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


# -- main -----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="few rounds, batch 16, costly "
                      "sections on plain and standard only")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, for --device cpu: "
                      "checks every code path, measures nothing")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES),
                        help="default: float16 bfloat16 on CUDA, float32 on a CPU")
    for name in ("size", "batch", "rounds", "iters", "warmup"):
        parser.add_argument(f"--{name}", type=int, help="override the preset's value")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime")
    parser.add_argument("--budget-s", type=float, default=390.0,
                        help="prepare nothing more after this many seconds (default 390)")
    parser.add_argument("--json-out", type=Path,
                        help="default: benchmarks/results/bench_gpu-<preset>-<device>.json")
    args = parser.parse_args(argv)
    args.preset = "smoke" if args.smoke else "quick" if args.quick else "full"
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available here; try --device cpu --smoke")
    if args.device.type not in ORT_PROVIDERS:
        parser.error(f"--device {args.device}: cuda or cpu")
    return args


@contextlib.contextmanager
def process_settings(args: argparse.Namespace):
    """cuDNN autotuning on CUDA, one CPU thread for smoke runs; restored (pytest runs main).

    The chosen GPU is made current, so CUDA events record on the stream the models run on.
    """
    threads, autotune = torch.get_num_threads(), torch.backends.cudnn.benchmark
    cuda = args.device.type == "cuda"
    torch.backends.cudnn.benchmark = cuda   # fixed shapes: tune once, in the warm-up
    if args.smoke:
        torch.set_num_threads(1)   # tiny tensors: more threads only contend (pytest -n 2)
    try:
        with torch.cuda.device(args.device) if cuda else contextlib.nullcontext():
            yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = autotune


def build_variants(size: int) -> tuple[dict[str, nn.Module], torch.Tensor, object]:
    """VARIANTS' models (float32, CPU), the 1x3xSxS example, and fold's result for ``trained``."""
    cnns = build_cnns(size)
    x = cnns.example
    folded = fold(cnns.trained, (x,))
    models = {"plain": cnns.plain, "twin": cnns.twin, "standard": cnns.standard,
              "trained": cnns.trained, "fold_trained": folded.module,
              "fold_plain": fold(cnns.plain, (x,)).module,
              "fold_twin": fold(cnns.twin, (x,)).module}
    assert list(models) == list(VARIANTS)
    return models, x, folded


def run(args: argparse.Namespace) -> dict:
    """Build, time every section, and return the report (what the JSON holds)."""
    budget = Budget(args.budget_s)
    device = args.device
    overrides = {k: getattr(args, k) for k in ("size", "batch", "rounds", "iters", "warmup")
                 if getattr(args, k) is not None}
    preset = Preset(**{**asdict(PRESETS[args.preset]), **overrides})
    dtypes = tuple(args.dtypes or DEFAULT_DTYPES[device.type])
    budget.log(f"building the CNN's forms at {preset.size}x{preset.size}")
    models, example, folded = build_variants(preset.size)
    torch.manual_seed(1)
    x = torch.randn(preset.batch, 3, preset.size, preset.size)

    sections = [torch_section(models, tuple(VARIANTS), x, d, device, None, preset, budget)
                for d in dtypes]
    if not args.no_compile:
        sections += [torch_section(models, preset.costly, x, d, device, preset.compile_backend,
                                   preset, budget) for d in dtypes]
    if not args.no_ort:
        with tempfile.TemporaryDirectory() as folder:
            sections += ort_sections(models, preset.costly, x, example, dtypes, device,
                                     preset, budget, Path(folder))
    count, reasons = kept_gates(folded)
    return {
        "environment": environment(device),
        "config": {"preset": args.preset, "device": str(device), "dtypes": list(dtypes),
                   "channels_last": True, "cudnn_benchmark": device.type == "cuda",
                   "threads": torch.get_num_threads(), "budget_s": args.budget_s,
                   **asdict(preset)},
        "variants": VARIANTS,
        "ratios": {f"{n}/{d}": label for n, d, label in RATIOS},
        "sections": [s.to_dict() for s in sections],
        "gates_left_after_fold": {"count": count, "reasons": reasons},
        "fold_outcomes": dict(Counter(s.outcome for s in folded.skips)),
        "elapsed_s": budget.elapsed(),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the tables to stdout and write the JSON. Returns the exit code."""
    args = parse_args(argv)
    with process_settings(args):
        report = run(args)
    print(render_markdown(report))
    out = args.json_out or (Path(__file__).parent / "results"
                            / f"bench_gpu-{args.preset}-{args.device.type}.json")
    write_json(out, report)
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
