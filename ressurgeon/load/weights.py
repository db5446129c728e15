"""Weights and pickles: state_dicts and safetensors with --arch, torch.nn-only pickles, trusted pickles."""

from __future__ import annotations

import contextlib
import importlib
import io
import pickletools
import re
import sys
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from . import checkpoint
from .nn_pickle import check_module_tree, nn_global_names, nn_safe_globals
from .guard import unpickling_refusal
from .._torch import quiet_torch
from .safetensors import read_safetensors
from ..errors import LoadError, UnsafeFileError, brief
from .common import SAFE_ROUTES, TRUST_ONLY_YOURS, _first


def _load_torch_save(path: Path, arch: str | None, trust_pickle: bool,
                     key: str | None = None) -> nn.Module:
    try:
        with quiet_torch(), nn_safe_globals(), \
                torch.serialization.safe_globals(checkpoint.inert_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        blocked = _blocked_globals(path)
        if blocked is None:
            raise LoadError(f"{path} is not a readable PyTorch file (no intact zip archive or "
                            "pickle inside); it may be truncated or corrupted") from exc
        if not trust_pickle:
            shown = ", ".join(blocked[:3]) + (" ..." if len(blocked) > 3 else "")
            why = (f"refused: the pickle references {shown}, not torch.nn classes" if blocked
                   else f"the safe unpickler refused it: {unpickling_refusal(exc)}")
            raise UnsafeFileError(
                f"{path} needs full unpickling, which runs code from the file ({why}); "
                f"{SAFE_ROUTES}; {TRUST_ONLY_YOURS}") from exc
        obj = _load_trusted(path)
    if isinstance(obj, nn.Module) and key is None:
        if not trust_pickle:  # names become fx source when traced; views may claim gigabytes
            check_module_tree(obj, path)
        return obj
    found = checkpoint.find_state_dict(obj, key, path=path)
    if found is not None:
        return _with_arch(found.state, arch, path, found)
    raise LoadError(f"{path} holds a {type(obj).__name__}, not a model or a state_dict; "
                    f"{SAFE_ROUTES}")


def read_weights(path: str | Path) -> dict | None:
    """The tensors of a state_dict file (.pt/.pth/.safetensors), read without running code.

    Returns None when the file is not a state_dict (a pickled module, say):
    ``load_model`` then says what it is and what to do.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        with quiet_torch():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return as_state_dict(obj)


def _blocked_globals(path: Path) -> list[str] | None:
    """The globals the pickle names that no allowlist admits, read without running it.

    None when there is no pickle to read. For messages only: what loads is
    decided by torch's weights_only unpickler.
    """
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a torch.save zip: a raw (legacy) pickle
        names = _pickle_imports(path)
        if names is None:
            return None
    allowed = nn_global_names() | _default_safe_globals() | checkpoint.inert_names()
    return sorted({n for n in names if n not in allowed})


def _default_safe_globals() -> frozenset[str]:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return frozenset(_get_allowed_globals())
    except (ImportError, AttributeError):  # private: only the message gets longer without it
        return frozenset()


def as_state_dict(obj: object) -> dict | None:
    """``obj`` as a state_dict (name -> tensor), unwrapping ``{"state_dict": ...}``; else None."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # a common checkpoint layout
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    return None


def _load_trusted(path: Path) -> object:
    try:
        with quiet_torch(), _cwd_on_path():  # the classes may live in the current folder
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise LoadError(f"{path} could not be unpickled ({brief(exc)}); the classes it "
                        "needs must be importable (run from the project that defines them)") from exc


def _pickle_imports(path: Path) -> list[str] | None:
    """The globals a pickle would import, read without executing it; None if unparsable."""
    data = None
    with contextlib.suppress(zipfile.BadZipFile, OSError, KeyError, ValueError, EOFError):
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            if pkl:
                data = z.read(pkl)
    if data is None:
        data = path.read_bytes()
    found: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if isinstance(arg, str):
                strings.append(arg)
            if op.name == "GLOBAL":
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:
        return None
    return found or None


def _with_arch(state: dict, arch: str | None, path: Path,
               found: checkpoint.Found | None) -> nn.Module:
    if arch is None:
        where = f" (under key {found.key!r})" if found is not None and found.key else ""
        raise LoadError(f"{path} holds weights only{where}; pass --arch module:callable that "
                        "builds the architecture (e.g. --arch mynets:build_vgg)")
    model = build_arch(arch)
    state, prefix = checkpoint.match_prefix(state, set(model.state_dict()))
    checkpoint.note(found, prefix, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
        parts = [f"{label} {_first(names)}" for label, names in
                 (("missing", missing), ("unexpected", unexpected), ("other shape", shapes))
                 if names]
        raise LoadError(f"the weights in {path} do not fit {arch}: "
                        f"{'; '.join(parts) or brief(exc)}; check that --arch builds the "
                        "architecture these weights were saved from") from exc
    return model.eval()  # weights hold no mode: eval, as a .pt2 without train-mode ops


def build_arch(arch: str) -> nn.Module:
    """Import ``module:callable`` (cwd first on the path) and call it with no arguments.

    The user names the code to run, so running it is what they asked for; what
    can go wrong there (the module is missing, has a syntax error, raises or
    exits while importing or building) is their input, reported as a LoadError.
    """
    module_name, sep, attr = arch.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module_name) \
            or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", attr):
        raise LoadError(f"--arch must look like module:callable (e.g. mynets:build_vgg), "
                        f"got {arch!r}")
    with _cwd_on_path():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise LoadError(f"cannot import {module_name!r} for --arch ({exc}); run from the "
                            "folder that holds it or add it to PYTHONPATH") from exc
        except (Exception, SystemExit) as exc:
            raise LoadError(f"importing {module_name!r} for --arch failed: "
                            f"{type(exc).__name__}: {brief(exc)}") from exc
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise LoadError(f"{module_name} has no attribute {attr!r} (from --arch {arch})")
    if not callable(factory):
        raise LoadError(f"--arch {arch} names a {type(factory).__name__}, not a callable")
    try:
        model = factory()
    except (Exception, SystemExit) as exc:
        raise LoadError(f"--arch {arch} raised {type(exc).__name__}: {brief(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise LoadError(f"--arch {arch} returned a {type(model).__name__}, not an nn.Module")
    return model


@contextlib.contextmanager
def _cwd_on_path():
    """The current folder first on sys.path, as `python -m` would have it, for the block only."""
    added = "" not in sys.path and "." not in sys.path
    if added:
        sys.path.insert(0, "")
    try:
        yield
    finally:
        if added:
            sys.path.remove("")
