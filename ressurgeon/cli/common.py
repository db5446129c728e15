"""What every command shares, in one import: options, output, parsing, and loading a model
with its example inputs.

The pieces live in ``options.py`` (the typer ``Annotated`` aliases), ``output.py``
(``session``, ``Output``: results, notes and exit codes) and ``parsing.py`` (flag
values to library values, path checks); building example inputs is library code
(``ressurgeon.inputs``). This module re-exports them so every command imports
from one place, and keeps the two steps that join them: load the model file,
then build its inputs from the flags.

Nothing here imports torch at module level: ``ressurgeon --help`` stays fast.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from . import options, output, parsing
from .options import *  # noqa: F403 - re-exported: the shared flags
from .output import *  # noqa: F403 - re-exported: session, Output, console
from .parsing import *  # noqa: F403 - re-exported: flag parsing, path checks
from .output import Output
from .parsing import parse_device, parse_dtype, parse_input

__all__ = [*options.__all__, *output.__all__, *parsing.__all__, "example_inputs",
           "load_with_inputs", "real_inputs"]


def load_with_inputs(model_path: Path, shapes: list[str] | None, arch: str | None, trust: bool,
                     dtype: str, device: str, out: Output, plan_shapes=(), *,
                     shapes_only: bool = False, vocab: int | None = None,
                     key: str | None = None):
    """Load the model and build seeded example inputs on the requested dtype and device.

    A TorchScript archive (only with --trust-pickle) becomes a graph here, once
    example inputs exist. ``shapes_only`` (``--fake --no-verify``): the inputs are
    ``meta`` tensors, which hold no memory; ``real_inputs`` makes real ones where
    a writer needs them.
    """
    import torch

    from .. import CheckpointNote, from_torchscript, read_model, record_of

    dt, dev = parse_dtype(dtype), parse_device(device)
    with out.step(f"loading {model_path}"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointNote)
        record = read_model(model_path, arch=arch, trust_pickle=trust, key=key)
    for warning in caught:  # which entry of a training checkpoint, which prefix
        if isinstance(warning.message, CheckpointNote):
            out.note(str(warning.message))
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                   warning.lineno)
    if isinstance(record.module, torch.jit.ScriptModule):  # needs inputs to become a graph
        script_inputs = example_inputs(record, shapes, model_path, None, None, plan_shapes,
                                       vocab=vocab)
        with out.step("converting TorchScript to a graph"):
            record = record_of(from_torchscript(record.module, script_inputs), record.source)
    model = record.module.to(device=dev, dtype=dt)  # in place: the record still holds it
    return model, example_inputs(record, shapes, model_path, dt, "meta" if shapes_only else dev,
                                 plan_shapes, vocab=vocab)


def example_inputs(model, shapes: list[str] | None, model_path: Path, dtype=None, device=None,
                   plan_shapes=(), *, vocab: int | None = None) -> tuple:
    """``ressurgeon.inputs.example_inputs`` for --input-shape strings, else a plan's shapes."""
    from .. import example_inputs as build_inputs

    specs = ([parse_input(s) for s in shapes] if shapes
             else [(tuple(s), None) for s in plan_shapes])
    return build_inputs(model, specs, dtype=dtype, device=device, vocab=vocab,
                                 what=str(model_path))


def real_inputs(model, inputs: tuple) -> tuple:
    """``ressurgeon.inputs.real_inputs`` (imported when called: this module stays torch-free)."""
    from .. import real_inputs as build_real

    return build_real(model, inputs)
