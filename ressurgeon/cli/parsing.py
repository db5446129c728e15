"""Turning flag values into library values, and checking a run's paths before any work.

Shapes (``1,3,224,224``, ``2,8:int64``), dtypes, devices, ``--concrete`` literals
and ``--dynamic`` dims are parsed here; a bad value is a ConfigError that names
the flag and shows a good one. torch is imported only inside the functions
that need it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from ..config import TraceOptions
from ..errors import ConfigError

__all__ = ["INPUT_DTYPES", "MAX_DIM", "check_paths", "check_plot_extra", "default_output",
           "parse_concrete", "parse_device", "parse_dtype", "parse_dynamic", "parse_input",
           "parse_shape", "trace_from_flags"]


def trace_from_flags(*, leaf: list[str] | None = None, concrete: list[str] | None = None,
                     fake: bool = False, dynamic: list[str] | None = None) -> TraceOptions:
    return TraceOptions(leaf_modules=tuple(leaf or ()), concrete_args=parse_concrete(concrete),
                        fake=fake, dynamic=parse_dynamic(dynamic))


def parse_dynamic(items: list[str] | None) -> tuple[tuple[int | None, int], ...]:
    """['1', '0:2'] -> ((None, 1), (0, 2))."""
    pairs = []
    for item in items or ():
        match = re.fullmatch(r"(?:([0-9]{1,3}):)?(-?[0-9]{1,3})", item.strip())
        if match is None:
            raise ConfigError(f"--dynamic {item!r} must be DIM or INPUT:DIM, e.g. --dynamic 1 "
                              "(every input's dim 1) or --dynamic 0:1")
        pairs.append((None if match[1] is None else int(match[1]), int(match[2])))
    return tuple(pairs)


MAX_DIM = 2 ** 31 - 1


INPUT_DTYPES = {"int64": "int64", "long": "int64", "int32": "int32", "int": "int32",
                "bool": "bool", "float32": "float32", "float16": "float16",
                "bfloat16": "bfloat16", "float64": "float64"}


def parse_input(text: str) -> tuple[tuple[int, ...], str | None]:
    """'2,8:int64' -> ((2, 8), 'int64'); '1,3,32,32' -> ((1, 3, 32, 32), None)."""
    shape_text, sep, dtype = text.partition(":")
    if sep and dtype.strip() not in INPUT_DTYPES:
        raise ConfigError(f"--input-shape {text!r}: {dtype!r} is not a dtype; use one of "
                          f"{', '.join(sorted(set(INPUT_DTYPES.values())))}, e.g. 2,8:int64")
    return parse_shape(shape_text), INPUT_DTYPES[dtype.strip()] if sep else None


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,32,32' (or 1x3x32x32) -> (1, 3, 32, 32)."""
    parts = re.split(r"[,x]", text.replace(" ", "").strip("()[]"))
    ascii_digits = all(re.fullmatch(r"[0-9]{1,12}", p) for p in parts)
    shape = tuple(int(p) for p in parts) if ascii_digits else ()
    if not shape or any(not 1 <= d <= MAX_DIM for d in shape):
        raise ConfigError(f"--input-shape {text!r} is not a shape; write positive integers "
                          "separated by commas, e.g. --input-shape 1,3,224,224")
    return shape


def parse_concrete(items: list[str] | None) -> dict | None:
    """['features_only=True'] -> {'features_only': True}; values are Python literals."""
    if not items:
        return None
    values = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.isidentifier():
            raise ConfigError(f"--concrete {item!r} must look like NAME=VALUE, "
                              "e.g. --concrete features_only=True")
        try:
            values[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ConfigError(f"--concrete {item!r}: {text!r} is not a Python literal "
                              "(a number, True/False/None, a string in quotes)") from None
    return values


def parse_dtype(name: str):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}
    if name not in table:
        raise ConfigError(f"--dtype {name!r} is not supported; use float32, float16, "
                          "bfloat16 or float64")
    return table[name]


def parse_device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; "
                          "use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name} does not exist: this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps was asked for but MPS is not available here; "
                          "use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name}: ressurgeon runs models on cpu, cuda or mps; for "
                          "shapes without memory use --fake")
    return device


def _resolved(path: Path, flag: str) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        raise ConfigError(f"{flag} {path}: {getattr(exc, 'strerror', None) or exc}") from None


def check_paths(inputs: list[Path | None], outputs: dict[str, Path | None],
                code_folder: Path | None = None) -> None:
    """Check every input and output path of a run against each other, before any work.

    Each output passes ``ressurgeon._io.check_output`` (not an input nor inside
    an input folder, nothing but a regular file replaced, never through a link),
    and is no other output; the
    --save-code folder is new or one ressurgeon wrote, and holds no other input
    or output of the run (its old files may be replaced).
    """
    from .. import check_code_folder, check_output, check_writable

    sources = {_resolved(p, "input"): p for p in inputs if p is not None}
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        key = _resolved(path, flag)
        if key in seen:
            raise ConfigError(f"{seen[key]} and {flag} both name {path}; give each output its "
                              "own file")
        try:  # the library's one output rule: not an input nor inside one, a regular file
            check_output(path, list(sources.values()), flag)
        except OSError as exc:
            raise ConfigError(f"{flag} {str(path)[:80]}: {exc.strerror or exc}") from None
        seen[key] = flag
    if code_folder is None:
        return
    folder = _resolved(code_folder, "--save-code")
    for key, source in sources.items():
        if key in folder.parents:
            raise ConfigError(f"--save-code {code_folder} lies inside the input {source}; "
                              "ressurgeon never writes into its input: choose a folder outside it")
    for key, label in [*((k, f"the input {p}") for k, p in sources.items()),
                       *((k, f"{f} {outputs[f]}") for k, f in seen.items())]:
        if key == folder or folder in key.parents:
            raise ConfigError(f"--save-code {code_folder} holds {label}; give the source code a "
                              "folder of its own")
    try:
        check_code_folder(code_folder)
        check_writable(code_folder)
    except OSError as exc:
        raise ConfigError(f"--save-code {str(code_folder)[:80]}: {exc.strerror or exc}") from None


def check_plot_extra(plot: Path | None) -> None:
    """--plot needs matplotlib: say so before any work, not after writing the model."""
    if plot is None:
        return
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("--plot needs matplotlib: pip install 'ressurgeon[plot]'")


def default_output(model: Path, suffix: str) -> Path:
    """MODEL.<suffix>.pt2 beside the input (e.g. vgg.skips.pt2, vgg.folded.pt2)."""
    return model.with_name(f"{model.stem}.{suffix}.pt2")
