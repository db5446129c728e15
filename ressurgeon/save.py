"""Stage 6, save: rewritten GraphModule -> .pt2, .pt, .safetensors or readable source.

Every file is written next to its destination under a temporary name and
renamed into place, so a failure never leaves a half-written output.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from torch import fx

from ._io import atomic_path, owned_folder
from ._names import check_identifier, is_class_name, is_fqn, refused
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

    ``to_folder`` writes each one into ``module.py`` (``self.<name> = ...``) and
    child names into file names; a name from a crafted file could otherwise
    close a string, run code on import, or point a file outside the folder.
    """
    for path, sub in module.named_modules(remove_duplicate=False):
        for kind, names in (("module", sub._modules), ("parameter", sub._parameters),
                            ("buffer", sub._buffers)):
            for name in names:
                if not is_fqn(name) or "." in name:
                    raise refused(f"a {kind} name written by --save-code", name,
                                  "a Python identifier or an index", where=path or "the model")


def save_code(module: fx.GraphModule, folder: str | Path, *, name: str = "RewrittenModel") -> Path:
    """Write the GraphModule as readable Python source plus weights (``GraphModule.to_folder``).

    ``from folder import RewrittenModel`` (with the folder's parent on the path)
    rebuilds the model; ``module.py`` shows every inserted shortcut. The folder
    may be new or one ressurgeon wrote before: only the files its marker lists
    are replaced, a user's own files there are left alone.

    Raises:
        ExportError: not a GraphModule; the folder is a file, a symbolic link, the
            current folder, or a folder ressurgeon did not write.
    """
    folder = Path(folder)
    if not isinstance(module, fx.GraphModule):
        raise ExportError("--save-code needs a GraphModule (the result of add_skips)")
    check_identifier("the --save-code class name", name)
    _check_names(module)
    with owned_folder(folder) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "saved as pickled files instead"
        module.to_folder(tmp, name)
        # to_folder writes absolute paths to its weight files; make them relative
        # to module.py so the folder survives the move (and any later one).
        code = tmp / "module.py"
        text = code.read_text().replace(f"r'{tmp}/", "_HERE + r'/")
        code.write_text(_SAFE_LOADER + _safe_loads(text, tmp))
    return folder


# The head of every module.py --save-code writes: weights load with torch's
# weights_only unpickler, from this folder, admitting only the classes listed.
_SAFE_LOADER = '''import importlib
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name, classes=()):
    """A file of this folder, read with weights_only=True: it admits only `classes`."""
    allowed = [getattr(importlib.import_module(m), c) for m, c in classes]
    with torch.serialization.safe_globals(allowed):
        return torch.load(os.path.join(_HERE, name), map_location="cpu", weights_only=True)

'''

_PICKLED_CHILD = re.compile(r"torch\.load\(_HERE \+ r'/([A-Za-z0-9_.]+)', weights_only=False\)")
_STATE_DICT = "torch.load(_HERE + r'/state_dict.pt')"


def _safe_loads(text: str, folder: Path) -> str:
    """``to_folder``'s loads rewritten to weights_only=True, with the classes each file needs.

    A pickled child may name torch.nn classes and ressurgeon's own modules (the
    shortcuts); any other class would need full unpickling to load, so the
    code is not written (ExportError): save the model as .pt2 instead.
    """
    def child(match: re.Match) -> str:
        name = match[1]
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(folder / name))
        except Exception as exc:
            raise ExportError(f"--save-code could not read back {name} ({brief(exc)})") from exc
        classes = []
        for full in sorted(names):
            module_name, _, attr = full.rpartition(".")
            if not (is_class_name(full) and module_name
                    and module_name.startswith(("torch.nn.", "ressurgeon."))):
                raise ExportError(f"--save-code writes models of torch.nn and ressurgeon modules; "
                                  f"{name[:-3]} uses {full[:80]}, which only full unpickling "
                                  "could load: write the model as .pt2 (-o) instead")
            classes.append((module_name, attr))
        return f"_load({name!r}, {classes!r})"

    text = _PICKLED_CHILD.sub(child, text).replace(_STATE_DICT, "_load('state_dict.pt')")
    if "torch.load(" in text:  # a load this rewrite does not know: never leave it unsafe
        raise ExportError("--save-code met a torch.load it cannot make safe in the generated "
                          "module.py; write the model as .pt2 (-o) instead")
    return text
