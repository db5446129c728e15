"""Stage 1, load: a file -> nn.Module, without running code the user did not allow.

Safe routes, where nothing from the file runs:

- a torch.export archive (``.pt2``, in the current layout or the pre-2.8 one),
  loaded with every code-running reader shut (``_refuse_code``);
- weights (a state_dict saved with torch.save, or ``.safetensors``) plus
  ``arch="module:callable"`` that builds the architecture;
- a pickled module made only of torch.nn's own classes, rebuilt by torch's
  weights_only unpickler with the allowlist in ``_nn_pickle``.

Only with ``trust_pickle=True``: any other pickle, a ``.pt2`` that needs
unpickling, and TorchScript archives (returned as a ScriptModule;
``from_torchscript`` turns one into a trainable GraphModule once example
inputs are known). Every zip is checked from its central directory before a
byte is inflated (one member per name, also ignoring case; no zip bombs),
then every member's checksum.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import pickletools
import re
import sys
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from ._nn_pickle import nn_global_names, nn_safe_globals
from . import checkpoint
from ._refuse_code import foreign_callables, refuse_code_execution, unpickling_refusal
from ._torch import logged_exceptions, quiet_torch
from .errors import LoadError, UnsafeFileError, brief
from .capture.exported import graph_module_from_export, plain_graph_module

SAFE_ROUTES = ("save model.state_dict() and pass --arch module:callable, "
               "or torch.export.save the model to a .pt2 archive")
TRUST_ONLY_YOURS = "pass --trust-pickle only for files you made yourself"

# Zip bomb limits, read from the central directory before anything is inflated.
# torch.save and torch.export.save store members uncompressed, so a model file
# inflates to about its own size; JSON members deflate 5-20:1, and deflate
# cannot pass about 1030:1, which only long runs of one byte reach. 200:1
# leaves text ten times the room it needs and caps what a file can make a
# reader allocate at 200 times its size. Small members and small archives
# are exempt: a zero-filled bias or a config may compress as it likes.
MAX_RATIO = 200
RATIO_FREE_MEMBER = 4 << 20
RATIO_FREE_TOTAL = 64 << 20


def load_model(path: str | Path, *, arch: str | None = None,
               trust_pickle: bool = False, key: str | None = None) -> nn.Module:
    """Load a model file.

    Args:
        path: ``.pt2`` archive; ``.pt``/``.pth`` state_dict, pickled module or
            TorchScript archive; ``.safetensors`` weights; or a Hugging Face
            ``save_pretrained`` folder (config.json + safetensors weights; needs
            transformers; read without running code from the folder, see ``hf.py``).
        arch: "module:callable" that returns the architecture for a weights file;
            the module is imported from the current directory or PYTHONPATH.
        trust_pickle: allow loading that runs code from the file: unpickling
            classes other than torch.nn's, a ``.pt2`` that holds pickles,
            TorchScript archives, and a folder whose weights are only
            ``pytorch_model.bin``.
        key: for a training checkpoint (a dict holding the state_dict), the entry
            to load; by default its one tensor dict or the usual key
            (``ressurgeon.checkpoint``). A prefix shared by every key (``model.``,
            ``module.``) is stripped when the rest matches ``arch`` exactly; which
            key and prefix were used is said by a ``CheckpointNote`` warning.

    Returns:
        The model. For ``.pt2``: a plain, trainable GraphModule. For a
        TorchScript archive (only with ``trust_pickle``): the ScriptModule;
        pass it to ``from_torchscript`` with example inputs to get a
        GraphModule that ressurgeon can trace. For a folder: the transformers
        model in eval mode, with ``use_cache=False``.

    Raises:
        LoadError: missing, unreadable, corrupted or malformed file (a zip bomb,
            two members with one name), weights without arch, a ``.pt2`` whose
            outputs are a type not registered in this process (a transformers
            ModelOutput: import transformers first), or a folder whose config
            needs code shipped with it (``auto_map``).
        UnsafeFileError: loading would run code from the file and trust_pickle
            is False.

    Example:
        >>> model = load_model("vgg.pt2")                                  # doctest: +SKIP
        >>> model = load_model("w.safetensors", arch="mynets:build_vgg")  # doctest: +SKIP
        >>> model = load_model("torch_save_of_nn_sequential.pt")           # doctest: +SKIP
        >>> model = load_model("tiny-bert/")       # save_pretrained folder  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise LoadError(f"no such file: {path}")
    if path.is_dir():
        return _load_folder(path, arch, trust_pickle)
    if not path.is_file():
        raise LoadError(f"{path} is not a file; pass the model file itself")
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise LoadError(f"cannot read {path}: {exc.strerror}") from exc
    if path.suffix == ".safetensors":
        return _with_arch(read_safetensors(path), arch, path, None)
    _check_zip(path)
    if _is_torch_export(path):
        return _load_pt2(path, trust_pickle)
    if path.suffix == ".pt2":
        raise LoadError(f"{path} is not a torch.export archive (truncated or corrupted?); "
                        "write it again with torch.export.save")
    if _is_torchscript(path):
        return _load_torchscript(path, trust_pickle)
    if not head:
        raise LoadError(f"{path} is empty")
    return _load_torch_save(path, arch, trust_pickle, key)


def _load_folder(path: Path, arch: str | None, trust_pickle: bool) -> nn.Module:
    from .hf import is_pretrained_folder, load_pretrained

    if not is_pretrained_folder(path):
        raise LoadError(f"{path} is not a file, nor a Hugging Face save_pretrained folder (it "
                        "has no config.json); pass the model file itself")
    if arch is not None:
        raise LoadError(f"--arch does not apply to {path}: a save_pretrained folder's "
                        "config.json names its architecture")
    return load_pretrained(path, trust_pickle=trust_pickle)


def _check_zip(path: Path) -> None:
    """Both .pt2 and torch.save files are zip archives: check the layout, then every CRC.

    The layout comes first and reads only the central directory: a zip bomb
    must be refused before anything inflates it. torch's own readers check no
    CRC, so a flipped bit in a weight would otherwise load silently as a
    different model.
    """
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            _check_members(path, z.infolist())
            _check_empty_records(path, z)
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise LoadError(f"{path} is a damaged zip archive ({brief(exc)}); it may be truncated "
                        "or corrupted: write it again") from exc
    if bad is not None:
        raise LoadError(f"{path} is corrupted: its member {bad} fails its checksum; "
                        "write the file again")


def _check_members(path: Path, infos: list[zipfile.ZipInfo]) -> None:
    """One member per name, also ignoring case, and sizes that are not a zip bomb.

    Readers disagree on ambiguous names: torch's finds names ignoring case and
    takes the first of two equal names, Python's zipfile the last. Neither
    torch.save nor torch.export.save writes such an archive.
    """
    seen: dict[str, str] = {}
    for info in infos:
        key = info.filename.casefold()
        if key in seen:
            which = ("two members named" if seen[key] == info.filename
                     else f"members {seen[key]!r} and")
            raise LoadError(f"{path} holds {which} {info.filename!r}, which zip readers resolve "
                            "differently; write the file again with torch.save or "
                            "torch.export.save")
        seen[key] = info.filename
    for info in infos:
        if info.file_size > RATIO_FREE_MEMBER and info.file_size > MAX_RATIO * max(
                info.compress_size, 1):
            raise LoadError(
                f"{path} looks like a zip bomb: its member {info.filename} would inflate from "
                f"{_size(info.compress_size)} to {_size(info.file_size)} (more than "
                f"{MAX_RATIO}:1); write the file again with torch.save or torch.export.save, "
                "which store tensors uncompressed")
    total = sum(info.file_size for info in infos)
    stored = path.stat().st_size
    if total > RATIO_FREE_TOTAL and total > MAX_RATIO * stored:
        raise LoadError(
            f"{path} looks like a zip bomb: its {len(infos)} members would inflate from "
            f"{_size(stored)} to {_size(total)} (more than {MAX_RATIO}:1); write the file again "
            "with torch.save or torch.export.save, which store tensors uncompressed")


def _check_empty_records(path: Path, z: zipfile.ZipFile) -> None:
    """Bound the zeros torch.export.load makes up for tensors whose member is empty.

    It allocates ``torch.zeros(sizes)`` for a payload whose record holds no
    bytes, with the sizes from the archive's config: a few bytes of JSON could
    claim gigabytes. torch.export.save writes empty records only for empty
    tensors. Counted at 8 bytes an element, with symbolic sizes at their hint.
    """
    sizes = {info.filename.casefold(): info.file_size for info in z.infolist()}
    claimed = 0
    for name in z.namelist():
        if not (name.endswith("_config.json") and "/data/" in name):
            continue
        try:
            config = json.loads(z.read(name))["config"]
            entries = list(config.values())
        except Exception:  # unreadable or not JSON: the CRC check or torch refuses it
            continue
        folder = name.rsplit("/", 1)[0]
        for meta in entries:
            try:
                if sizes.get(f"{folder}/{meta['path_name']}".casefold()) != 0:
                    continue
                numel = 1
                for dim in (meta.get("tensor_meta") or {}).get("sizes", ()):
                    numel *= max(int(dim.get("as_int") or (dim.get("as_expr") or {}).get(
                        "hint", {}).get("as_int") or 1), 0)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise LoadError(f"{path} has a malformed entry in {name} ({brief(exc)}); write "
                                "it again with torch.export.save") from exc
            claimed += 8 * numel
    if claimed > RATIO_FREE_TOTAL:
        raise LoadError(f"{path} claims {_size(claimed)} of tensors that its empty members do "
                        "not hold (they would be made up as zeros); write the file again with "
                        "torch.export.save")


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def _is_torch_export(path: Path) -> bool:
    names = _zip_names(path)
    return any(n.endswith(("archive_format", "serialized_exported_program.json"))
               for n in names) or any("/models/" in n and n.endswith(".json") for n in names)


def _is_torchscript(path: Path) -> bool:
    names = _zip_names(path)
    return any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names)


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return []


def _load_pt2(path: Path, trust_pickle: bool) -> nn.Module:
    refused: list[str] = []
    shut = contextlib.nullcontext(refused) if trust_pickle else refuse_code_execution()
    try:
        with quiet_torch(), logged_exceptions() as logged, shut as refused:
            ep = torch.export.load(path)
            if not trust_pickle:
                refused += [f"a graph that calls {name}" for name in foreign_callables(ep)]
            module = None if refused else graph_module_from_export(ep)
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


def _load_torchscript(path: Path, trust_pickle: bool) -> nn.Module:
    if not trust_pickle:
        raise UnsafeFileError(
            f"{path} is a TorchScript archive, a program that runs when loaded; "
            f"{SAFE_ROUTES}; or {TRUST_ONLY_YOURS}")
    try:
        with quiet_torch():
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise LoadError(f"{path} is not a loadable TorchScript archive ({brief(exc)}); "
                        f"{SAFE_ROUTES}") from exc


def from_torchscript(module: nn.Module, example_inputs: tuple) -> nn.Module:
    """A trainable GraphModule from a TorchScript module; any other module is returned as is.

    torch's converter turns every weight into a buffer and freezes BatchNorm
    and Dropout in the module's mode; the parameters are made parameters
    again (matched by name and value with the ScriptModule's) and BatchNorm
    and Dropout become modules that follow ``.train()``, as for a ``.pt2``.

    Args:
        module: what ``load_model(..., trust_pickle=True)`` returned for a
            TorchScript archive.
        example_inputs: a tuple of tensors the model accepts.

    Returns:
        A GraphModule with the same parameters, buffers and outputs.

    Raises:
        LoadError: the converter is missing from this torch, or cannot
            convert the program (e.g. Python control flow on input values).

    Example:
        >>> ts = load_model("scripted.pt", trust_pickle=True)          # doctest: +SKIP
        >>> model = from_torchscript(ts, (torch.randn(1, 3, 32, 32),))  # doctest: +SKIP
    """
    if not isinstance(module, torch.jit.ScriptModule):
        return module
    ep = _convert_torchscript(module, tuple(example_inputs))
    branches = sorted({str(getattr(n.target, "__name__", n.target)) for n in ep.graph.nodes
                       if isinstance(n.target, torch._ops.HigherOrderOperator)})
    if branches:
        raise LoadError(f"the TorchScript model branches or loops on input values (it became "
                        f"torch.{branches[0]}), which ressurgeon cannot rewrite; {SAFE_ROUTES}")
    unlifted = ep.module()
    _restore_parameters(unlifted, module)
    gm = plain_graph_module(unlifted)
    gm.train(module.training)
    return gm


def _convert_torchscript(module: torch.jit.ScriptModule,
                         example_inputs: tuple) -> torch.export.ExportedProgram:
    """The one use of torch's private TorchScript converter."""
    try:
        from torch._export.converter import TS2EPConverter
    except ImportError as exc:
        raise LoadError(f"torch {torch.__version__} has no TorchScript converter "
                        f"(torch._export.converter); {SAFE_ROUTES}") from exc
    try:
        with quiet_torch(stdout=True, stderr=True):
            return TS2EPConverter(module, example_inputs).convert()
    except Exception as exc:
        raise LoadError(f"the TorchScript model cannot be converted to a graph ({brief(exc)}); "
                        f"{SAFE_ROUTES}") from exc


def _restore_parameters(unlifted: nn.Module, script: torch.jit.ScriptModule) -> None:
    """Turn the converter's buffers back into the ScriptModule's parameters."""
    buffers = dict(unlifted.named_buffers())
    taken: set[str] = set()

    def holds(key: str, value: torch.Tensor) -> bool:
        b = buffers[key]
        return (key not in taken and b.shape == value.shape and b.dtype == value.dtype
                and torch.equal(b, value))

    for name, param in script.named_parameters():
        value = param.detach()
        target = name if name in buffers and holds(name, value) else None
        if target is None:  # renamed by the converter: the one buffer holding the same values
            matches = [k for k in buffers if holds(k, value)]
            target = matches[0] if len(matches) == 1 else None
        if target is None:
            raise LoadError(f"the converted TorchScript model lost its parameter {name}; "
                            f"{SAFE_ROUTES}")
        taken.add(target)
        owner_path, _, leaf = target.rpartition(".")
        owner = unlifted.get_submodule(owner_path)
        del owner._buffers[leaf]
        owner.register_parameter(leaf, nn.Parameter(buffers[target],
                                                    requires_grad=param.requires_grad))


def read_safetensors(path: Path) -> dict:
    """The tensors of a .safetensors file (no code runs when reading it)."""
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise LoadError("reading .safetensors needs the safetensors package: "
                        "pip install 'ressurgeon[safetensors]'") from exc
    try:
        return load_file(str(path))
    except Exception as exc:
        raise LoadError(f"{path} is not a readable safetensors file ({brief(exc)})") from exc


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
            why = (f"it uses {shown}, not torch.nn classes" if blocked
                   else f"the safe unpickler refused it: {unpickling_refusal(exc)}")
            raise UnsafeFileError(
                f"{path} needs full unpickling, which runs code from the file ({why}); "
                f"{SAFE_ROUTES}; {TRUST_ONLY_YOURS}") from exc
        obj = _load_trusted(path)
    if isinstance(obj, nn.Module) and key is None:
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
    return model


def _first(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


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
