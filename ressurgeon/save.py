"""Stage 6, save: rewritten GraphModule -> .pt2, .pt, .safetensors or readable source.

Every file is written next to its destination under a temporary name and
renamed into place, so a failure never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from torch import fx

from ._io import CODE_MARKER, atomic_path
from ._torch import eval_mode
from .errors import ExportError, brief
from .exported import dynamic_batch_args

FORMATS = {".pt2": "pt2", ".pt": "pt", ".pth": "pt", ".safetensors": "safetensors"}


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
    fmt = check_format(path)
    writer: Callable[[Path], None] = {
        "pt2": lambda tmp: torch.export.save(export_program(module, example_inputs,
                                                            dynamic_batch=dynamic_batch), tmp),
        "pt": lambda tmp: torch.save(module, tmp),
        "safetensors": lambda tmp: _save_safetensors(module, tmp),
    }[fmt]
    with atomic_path(path) as tmp:
        writer(tmp)
    return path


def check_format(path: str | Path) -> str:
    """The format a file name asks for ("pt2", "pt", "safetensors"); ExportError otherwise."""
    fmt = FORMATS.get(Path(path).suffix)
    if fmt is None:
        raise ExportError(f"cannot tell the format of {path}: use a .pt2, .pt, .pth or "
                          ".safetensors file name")
    return fmt


def export_program(module: nn.Module, example_inputs: tuple, *,
                   dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """torch.export the module in eval mode, with a dynamic batch dimension when possible."""
    with eval_mode(module):
        try:
            if dynamic_batch:
                with contextlib.suppress(Exception):
                    return _export_dynamic(module, example_inputs)
            return torch.export.export(module, tuple(example_inputs), strict=False)
        except Exception as exc:
            raise ExportError(f"torch.export could not capture the model: {brief(exc)}") from exc


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
