"""The .pt2 reader: the program validated against an allowlist, then torch.export.load with every code-running door shut."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
import torch.nn as nn

from .guard import foreign_callables, refuse_code_execution
from .._torch import logged_exceptions, quiet_torch
from ..errors import LoadError, UnsafeFileError, brief
from ..capture.exported import graph_module_from_export
from .validate import check_archive, check_tensor_sizes, drop_guards_code
from .common import TRUST_ONLY_YOURS


def _load_pt2(path: Path, trust_pickle: bool) -> nn.Module:
    """Validate the archive's program (allowlist, before torch reads it), then load it with
    every code-running reader shut; unless the user vouches for the file."""
    facts = None if trust_pickle else check_archive(path)
    refused: list[str] = []
    guards = None  # the archive's guard lines, taken off before torch compiles them
    shut = (contextlib.nullcontext(refused) if trust_pickle
            else refuse_code_execution(file_names=facts.names))
    try:
        with quiet_torch(), logged_exceptions() as logged, shut as refused:
            ep = torch.export.load(path)
            if not trust_pickle:
                refused += [f"a graph that calls {name}" for name in foreign_callables(ep)]
                check_tensor_sizes([*ep.state_dict.items(), *ep.constants.items()], path)
                guards = drop_guards_code(ep, path)  # never compiled: checked as data
            module = None if refused else graph_module_from_export(ep, guards)
    except UnsafeFileError:
        raise
    except Exception as exc:
        if refused:
            raise _would_run_code(path, refused) from exc
        unknown = _unregistered_type(logged + [exc])
        if unknown is not None:
            raise _unknown_output_type(path, unknown) from exc
        raise LoadError(f"{path} is not a readable torch.export archive ({brief(exc)}); "
                        "it may be truncated or corrupted: write it again with "
                        "torch.export.save") from exc
    if refused:  # torch caught a refusal and went on: the file still asked to run code
        raise _would_run_code(path, refused)
    return module


def _unregistered_type(errors: list[BaseException]) -> str | None:
    """The pytree type an archive names that this process has not registered, if that failed."""
    for error in errors:
        while error is not None:
            match = re.search(r"Deserializing ([\w.]+) in pytree is not registered", str(error))
            if match:
                return match[1]
            error = error.__cause__ or error.__context__
    return None


def _unknown_output_type(path: Path, name: str) -> LoadError:
    module = name.rpartition(".")[0]
    tensors = ("export the model again returning tensors (for transformers: model.config."
               "return_dict = False; the .pt2 files ressurgeon writes return plain dicts)")
    return LoadError(f"{path} returns a {name}, a type not registered with torch's pytree in "
                     f"this process (the file is not damaged); from Python, import {module} "
                     f"before load_model, or {tensors}")


def _would_run_code(path: Path, refused: list[str]) -> UnsafeFileError:
    unique = list(dict.fromkeys(refused))
    shown = "; ".join(unique[:2]) + (" ..." if len(unique) > 2 else "")
    return UnsafeFileError(
        f"{path} would run code from the file (it holds {shown}); re-export it from plain "
        f"tensors with torch.export.save, or {TRUST_ONLY_YOURS}")
