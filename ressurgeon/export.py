"""Stage 6, save: rewritten GraphModule -> .pt2, .pt, .safetensors or readable source.

Every file is written next to its destination under a temporary name and
renamed into place, so a failure never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn
from torch import fx

from .errors import ExportError, brief

CODE_MARKER = ".ressurgeon-code"  # marks a --save-code folder, the only kind we replace
FORMATS = {".pt2": "pt2", ".pt": "pt", ".pth": "pt", ".safetensors": "safetensors"}


@contextlib.contextmanager
def atomic_path(dest: str | Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; move it onto ``dest`` only if the block succeeds."""
    dest = Path(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"output folder {parent} does not exist; create it first")
    if is_dir and dest.is_dir() and any(dest.iterdir()) and not (dest / CODE_MARKER).exists():
        raise ExportError(f"{dest} already exists and is not a folder ressurgeon wrote; "
                          "choose a new folder (ressurgeon only replaces its own)")
    if not is_dir and dest.is_dir():
        raise ExportError(f"{dest} is a folder; give a file name")
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=parent))
    else:
        # keep the suffix: some writers (torch.export.save) check it
        fd, name = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".tmp{dest.suffix}",
                                    dir=parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        # mkstemp/mkdtemp create 0600/0700; give the result the mode a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod((0o777 if is_dir else 0o666) & ~umask)
        if is_dir and dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def save_model(module: nn.Module, path: str | Path, example_inputs: tuple, *,
               dynamic_batch: bool = True) -> Path:
    """Write ``module`` in the format its suffix names.

    Args:
        module: the (rewritten) model.
        path: ``.pt2`` (torch.export archive: safe to share, loads without ressurgeon),
            ``.pt``/``.pth`` (pickled module), or ``.safetensors`` (weights only).
        example_inputs: tuple of tensors, used to export ``.pt2``.
        dynamic_batch: export ``.pt2`` with a symbolic batch dimension when the model allows.

    Returns:
        The path written.

    Raises:
        ExportError: unknown suffix, missing folder, or the model cannot be exported.

    Example:
        >>> save_model(result.module, "vgg_skips.pt2", (x,))   # doctest: +SKIP
    """
    path = Path(path)
    fmt = FORMATS.get(path.suffix)
    if fmt is None:
        raise ExportError(f"cannot tell the format of {path}: use a .pt2, .pt, .pth or "
                          ".safetensors file name")
    writer: Callable[[Path], None] = {
        "pt2": lambda tmp: torch.export.save(export_program(module, example_inputs,
                                                            dynamic_batch=dynamic_batch), tmp),
        "pt": lambda tmp: torch.save(module, tmp),
        "safetensors": lambda tmp: _save_safetensors(module, tmp),
    }[fmt]
    with atomic_path(path) as tmp:
        writer(tmp)
    return path


def export_program(module: nn.Module, example_inputs: tuple, *,
                   dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """torch.export the module in eval mode, with a dynamic batch dimension when possible."""
    was_training = module.training
    module.eval()
    try:
        if dynamic_batch:
            with contextlib.suppress(Exception):
                return _export_dynamic(module, example_inputs)
        return torch.export.export(module, tuple(example_inputs), strict=False)
    except Exception as exc:
        raise ExportError(f"torch.export could not capture the model: {brief(exc)}") from exc
    finally:
        module.train(was_training)


def batched_dims(inputs: tuple) -> list[bool]:
    """Which inputs get a symbolic batch dim 0: those batched like the first input."""
    if not inputs or inputs[0].dim() == 0:
        return [False] * len(inputs)
    batch = inputs[0].shape[0]
    return [t.dim() > 0 and t.shape[0] == batch for t in inputs]


def dynamic_batch_args(inputs: tuple) -> tuple[tuple, tuple | None]:
    """(inputs, dynamic_shapes) for torch.export / torch.onnx with a symbolic batch.

    torch.export specialises a dimension of size 1, so a batch of 1 is traced
    with 2 rows instead (the model must treat rows independently, as any
    batched model does).
    """
    dims = batched_dims(inputs)
    if not any(dims):
        return tuple(inputs), None
    grown = tuple(t.expand(2, *t.shape[1:]).clone() if d and t.shape[0] == 1 else t
                  for t, d in zip(inputs, dims))
    batch = torch.export.Dim("batch", min=1)
    return grown, tuple({0: batch} if d else None for d in dims)


def _export_dynamic(module: nn.Module, inputs: tuple) -> torch.export.ExportedProgram:
    grown, dynamic = dynamic_batch_args(inputs)
    return torch.export.export(module, grown, dynamic_shapes=dynamic, strict=False)


def _save_safetensors(module: nn.Module, tmp: Path) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError as exc:
        raise ExportError("writing .safetensors needs the safetensors package: "
                          "pip install 'ressurgeon[safetensors]'") from exc
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(tmp))


def save_code(module: fx.GraphModule, folder: str | Path, *, name: str = "RewrittenModel") -> Path:
    """Write the GraphModule as readable Python source plus weights (``GraphModule.to_folder``).

    ``from folder import RewrittenModel`` (with the folder's parent on the path)
    rebuilds the model; ``module.py`` shows every inserted shortcut.
    """
    folder = Path(folder)
    if not isinstance(module, fx.GraphModule):
        raise ExportError("--save-code needs a GraphModule (the result of add_skips)")
    with atomic_path(folder, is_dir=True) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "saved as pickled files instead"
        module.to_folder(tmp, name)
        # to_folder writes absolute paths to its weight files; make them relative
        # to module.py so the folder survives the rename (and any later move).
        code = tmp / "module.py"
        text = code.read_text().replace(f"r'{tmp}/", "_HERE + r'/")
        code.write_text("import os\n_HERE = os.path.dirname(os.path.abspath(__file__))\n" + text)
        (tmp / CODE_MARKER).write_text("written by ressurgeon --save-code; the folder is "
                                       "replaced as a whole when written again\n")
    return folder
