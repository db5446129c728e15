"""Stage 6, save: rewritten GraphModule -> .pt2, .pt, .safetensors or readable source.

Every file is written next to its destination under a temporary name and
renamed into place, so a failure never leaves a half-written output.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from torch import fx

from ._io import atomic_path
from ._names import check_identifier, is_fqn, refused
from ._torch import eval_mode, quiet_torch
from .errors import ExportError, brief
from ._fx import capture_info
from .capture.exported import export_attempts, pinned_batch

FORMATS = {".pt2": "pt2", ".pt": "pt", ".pth": "pt", ".safetensors": "safetensors"}


def save_model(module: nn.Module, path: str | Path, example_inputs: tuple, *,
               dynamic_batch: bool = True,
               dynamic: tuple[tuple[int | None, int], ...] | None = None) -> Path:
    """Write ``module`` in the format its suffix names.

    Args:
        module: the (rewritten) model.
        path: ``.pt2`` (torch.export archive: safe to share, loads without ressurgeon),
            ``.pt``/``.pth`` (pickled module), or ``.safetensors`` (weights only).
        example_inputs: tuple of tensors, used to export ``.pt2``.
        dynamic_batch: export ``.pt2`` with a symbolic batch dimension when the model allows.
        dynamic: more (input, dim) pairs to keep symbolic in a ``.pt2``; by default the
            dims a torch.export capture kept dynamic (``capture_info(module).dynamic``).

    Returns:
        The path written.

    Raises:
        ExportError: unknown suffix, missing folder, or the model cannot be exported.

    Example:
        >>> save_model(result.module, "vgg_skips.pt2", (x,))   # doctest: +SKIP
    """
    path = Path(path)
    fmt = check_format(path)
    # torch's C++ archive writers abort the process when the disk fills up or a
    # file-size limit is hit; serialised to memory first, the file is written by
    # Python, where such a failure is an OSError and a one-line error.
    serialise: Callable[[io.BytesIO], None] = {
        "pt2": lambda buf: torch.export.save(export_program(
            module, example_inputs, dynamic_batch=dynamic_batch, dynamic=dynamic), buf),
        "pt": lambda buf: torch.save(module, buf),
        "safetensors": lambda buf: buf.write(_safetensors_bytes(module)),
    }[fmt]
    buffer = io.BytesIO()
    serialise(buffer)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
    return path


def check_format(path: str | Path) -> str:
    """The format a file name asks for ("pt2", "pt", "safetensors"); ExportError otherwise."""
    fmt = FORMATS.get(Path(path).suffix)
    if fmt is None:
        raise ExportError(f"cannot tell the format of {path}: use a .pt2, .pt, .pth or "
                          ".safetensors file name")
    return fmt


def export_program(module: nn.Module, example_inputs: tuple, *, dynamic_batch: bool = True,
                   dynamic: tuple[tuple[int | None, int], ...] | None = None
                   ) -> torch.export.ExportedProgram:
    """torch.export the module in eval mode, with its dynamic dims symbolic when possible.

    A torch.export capture's dims keep the ranges it recorded
    (``capture_info(module).ranges``). When export cannot keep a dim dynamic,
    the archive fixes it at the example's size, and a UserWarning says which
    dims and why (the CLI turns it into a note and a ``fixed_dims`` JSON field).
    """
    dims = dynamic if dynamic is not None else model_dynamic_dims(module)
    ranges = capture_info(module).ranges if isinstance(module, fx.GraphModule) else ()
    # a capture that fixed its batch computes no other: asking for one would only fall back
    attempts = export_attempts(tuple(example_inputs), dims=dims, ranges=ranges,
                               batch=dynamic_batch and not pinned_batch(module))
    first_error = None
    with eval_mode(module):
        for i, (args, shapes) in enumerate(attempts):
            try:
                # export prints a partial graph to stderr on some failures: we say it in one line
                with quiet_torch(stderr=True):
                    ep = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
            except Exception as exc:
                first_error = first_error or exc
                if i == len(attempts) - 1:
                    raise ExportError(f"torch.export could not capture the model for a .pt2 "
                                      f"({brief(exc)}); write it as .pt (a pickled GraphModule) "
                                      "or .safetensors (the weights) instead") from exc
                continue
            fixed = tuple((i, d, int(args[i].shape[d])) for i, d in
                          sorted(_symbolic(attempts[0][1]) - _symbolic(shapes)))
            if fixed:
                sizes = ", ".join(f"input {i} dim {d} at {size}" for i, d, size in fixed)
                warnings.warn(FixedDimsWarning(
                    f"the .pt2 accepts only the example's size for {sizes}: torch.export could "
                    f"not keep {'it' if len(fixed) == 1 else 'them'} dynamic "
                    f"({brief(first_error)})", fixed), stacklevel=2)
            return ep


class FixedDimsWarning(UserWarning):
    """A written .pt2 fixes dims that were dynamic; ``dims``: (input, dim, size) of each."""

    def __init__(self, message: str, dims: tuple[tuple[int, int, int], ...]):
        super().__init__(message)
        self.dims = dims


def _symbolic(shapes: tuple | None) -> set[tuple[int, int]]:
    return {(i, d) for i, spec in enumerate(shapes or ()) for d in (spec or {})}


def model_dynamic_dims(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """The non-batch dims a torch.export capture of ``module`` kept dynamic (else none)."""
    if not isinstance(module, fx.GraphModule):
        return ()
    return tuple(p for p in capture_info(module).dynamic or () if p[1] != 0)


def _safetensors_bytes(module: nn.Module) -> bytes:
    try:
        from safetensors.torch import save
    except ImportError as exc:
        raise ExportError("writing .safetensors needs the safetensors package: "
                          "pip install 'ressurgeon[safetensors]'") from exc
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    return save(state)


def _check_names(module: nn.Module) -> None:
    """Every child, parameter and buffer name is an identifier or an index, at every level.

    ``save_code`` writes each one into ``module.py`` (``self.<name> = ...``); a
    name from a crafted file could otherwise close a string or run code on import.
    """
    for path, sub in module.named_modules(remove_duplicate=False):
        for kind, names in (("module", sub._modules), ("parameter", sub._parameters),
                            ("buffer", sub._buffers)):
            for name in names:
                if not is_fqn(name) or "." in name:
                    raise refused(f"a {kind} name written by --save-code", name,
                                  "a Python identifier or an index", where=path or "the model")


def prepare_code(module: fx.GraphModule, *, name: str = "RewrittenModel",
                 trust_pickle: bool = False):
    """The ``--save-code`` package of ``module``, checked and made, not yet written.

    Everything that can refuse the model happens here (``save_code`` is
    ``prepare_code(...).write(folder)``), so a caller can check before it writes
    anything else. Args and Raises: as ``save_code``, less the folder.

    Example:
        >>> package = prepare_code(result.module)   # doctest: +SKIP
        >>> package.write("rewritten_code")         # doctest: +SKIP
    """
    from .source import build_package

    if not isinstance(module, fx.GraphModule):
        raise ExportError("--save-code needs a GraphModule (the result of add_skips)")
    check_identifier("the --save-code class name", name)
    _check_names(module)
    return build_package(module, name=name, trust_pickle=trust_pickle)


def save_code(module: fx.GraphModule, folder: str | Path, *, name: str = "RewrittenModel",
              trust_pickle: bool = False) -> Path:
    """Write the GraphModule as a Python package: readable source plus safetensors weights.

    ``from folder import RewrittenModel`` (with the folder's parent on the path)
    rebuilds the model: ``module.py`` builds every submodule by a constructor
    call (torch.nn classes and ressurgeon's shortcut modules), its ``forward``
    is the graph's code and shows every inserted shortcut, and the weights load
    from ``model.safetensors`` in the folder itself (``ressurgeon/source.py``).
    The folder may be new or one ressurgeon wrote before: only the files its
    marker lists are replaced, a user's own files there are left alone.

    Args:
        module: the rewritten model (``add_skips(...).module``).
        folder: the package folder to write.
        name: the class ``module.py`` defines.
        trust_pickle: store a submodule of another class (a user's own leaf) as a
            pickle that ``module.py`` loads with ``weights_only=False``; without
            it such a model is refused.

    Returns:
        The folder written.

    Raises:
        UnsafeFileError: a child, parameter, buffer, node or attribute name that is
            not a Python identifier (or an index).
        ExportError: not a GraphModule; a submodule no constructor call rebuilds (the
            fix: ``trust_pickle``); the folder is a file, a symbolic link, the current
            folder, or a folder ressurgeon did not write.

    Example:
        >>> save_code(result.module, "rewritten_code")   # doctest: +SKIP
    """
    return prepare_code(module, name=name, trust_pickle=trust_pickle).write(folder)
