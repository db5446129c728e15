"""Example inputs for a model: seeded random tensors of given shapes and dtypes.

Every entry point that needs example inputs and was not handed any (the
command line, a study script) builds them here: from explicit specs, else from
the model's record (``load/record.py``: the shapes a torch.export archive
recorded, else a Hugging Face model's config). Floating inputs take the
model's dtype; integer inputs (token ids) are drawn from ``[0, vocab)``, vocab
defaulting to a Hugging Face model's input embedding, else the model's
smallest embedding. The same specs give the same tensors on every run (seed 0).
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError
from .load.record import ModelRecord, Spec, embedding_size, record_of, stored_inputs, stored_shapes
from .capture.shapes import positional_inputs

# stored_inputs, stored_shapes and embedding_size moved to load/record.py; kept importable here
__all__ = ["MAX_INPUT_BYTES", "Spec", "check_input_memory", "embedding_size", "example_inputs",
           "real_inputs", "stored_inputs", "stored_shapes"]

# Example inputs only need to be representative; past this they would take more
# memory than any shape check needs (the model's activations take far more still).
MAX_INPUT_BYTES = 2 ** 30

MAX_VOCAB = 2 ** 31 - 1  # fits every integer input dtype (int32 included)


def example_inputs(model: torch.nn.Module | ModelRecord, specs: list[Spec] | None = None, *,
                   dtype=None, device=None, vocab: int | None = None,
                   what: str = "the model") -> tuple:
    """Seeded random example inputs for ``model``.

    Args:
        model: the network the inputs are for, or its ``ModelRecord`` (what a
            reader of ``ressurgeon.load`` returns).
        specs: per input, (shape, dtype name or None for a floating input). None or
            empty: the record's ``input_specs`` (the shapes a torch.export archive
            recorded, else a Hugging Face model's defaults).
        dtype: the dtype of floating inputs (default float32).
        device: where the inputs live; ``"meta"`` gives tensors that hold no memory.
        vocab: integer inputs are drawn from [0, vocab) (default: the model's
            input embedding size, else 2).
        what: how error messages name the model (a file name).

    Returns:
        A tuple of tensors.

    Raises:
        ConfigError: no specs and none recorded, a vocab below 1, or inputs over
            ``MAX_INPUT_BYTES``.

    Example:
        >>> x, = example_inputs(torch.nn.Linear(4, 2), [((3, 4), None)])
        >>> tuple(x.shape), x.dtype
        ((3, 4), torch.float32)
    """
    record = record_of(model)
    model = record.module
    specs = list(specs or ()) or list(record.input_specs)
    if not specs:
        raise ConfigError(f"cannot tell the input shape of {what}; pass --input-shape, "
                          "e.g. --input-shape 1,3,224,224 (or 2,8:int64 for token ids), one "
                          f"per input{positional_inputs(model, 2)}")
    if vocab is not None and not 1 <= vocab <= MAX_VOCAB:
        shown = str(vocab) if abs(vocab) < 10 ** 30 else f"of {vocab.bit_length()} bits"
        raise ConfigError(f"--vocab {shown} must be between 1 and {MAX_VOCAB} (token ids are "
                          "int32 or int64); give the model's vocabulary size, e.g. --vocab 32000")
    dtypes = [getattr(torch, name) if name else (dtype or torch.float32) for _, name in specs]
    if str(device) == "meta":
        return tuple(torch.empty(s, dtype=d, device="meta") for (s, _), d in zip(specs, dtypes))
    check_input_memory([s for s, _ in specs], dtype or torch.float32)
    gen = torch.Generator().manual_seed(0)
    high = vocab or record.vocab or 2
    made = []
    for (shape, _), dt in zip(specs, dtypes):
        if dt.is_floating_point:
            made.append(torch.randn(shape, generator=gen).to(device=device, dtype=dt))
        else:
            top = 2 if dt is torch.bool else high
            made.append(torch.randint(0, top, shape, generator=gen).to(device=device, dtype=dt))
    return tuple(made)


def check_input_memory(shapes: list[tuple[int, ...]], dtype, flag: str = "--input-shape") -> None:
    """Refuse example inputs too large to build (they are only examples).

    Raises:
        ConfigError: the inputs would take more than ``MAX_INPUT_BYTES``.
    """
    size = sum(math.prod(s) for s in shapes) * max(8, torch.empty((), dtype=dtype).element_size())
    if size > MAX_INPUT_BYTES:
        shown = " ".join(",".join(map(str, s)) for s in shapes)
        raise ConfigError(f"{flag} {shown} would take {size / 2 ** 30:.1f} GiB of example input "
                          f"(at most {MAX_INPUT_BYTES / 2 ** 30:.0f} GiB): give a smaller "
                          "example (a batch of 1-2 and a small size show the same layers), or "
                          "plan with shapes only: --fake --no-verify -o OUT.pt")


def real_inputs(model: torch.nn.Module, inputs: tuple) -> tuple:
    """``inputs`` as real seeded tensors on the model's device (they may be ``meta``)."""
    if not any(t.device.type == "meta" for t in inputs):
        return inputs
    device = next((p.device for p in model.parameters()), None)
    floats = [t.dtype for t in inputs if t.is_floating_point()]
    specs = [(tuple(t.shape), None if t.is_floating_point()
              else str(t.dtype).removeprefix("torch.")) for t in inputs]
    return example_inputs(model, specs, dtype=floats[0] if floats else None, device=device)
