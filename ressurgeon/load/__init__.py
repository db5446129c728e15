"""Stage 1, load: a file -> nn.Module, without running code the user did not allow.

One reader per format, each a module of this package: ``pt2`` (torch.export
archives), ``torchscript``, ``weights`` (state_dicts, safetensors, torch.nn
pickles), ``hf`` (Hugging Face folders), with ``archive`` (zip checks before
any reader opens a file), ``safetensors`` (the one safetensors/config.json
reader, deepen's streaming uses it too) and ``guard`` (the runtime wall).
``read_model`` picks the reader and returns one ``ModelRecord``
(``record.py``: the module, its example-input specs, its forward keyword
arguments); ``load_model`` is its module.

Safe routes, where nothing from the file runs:

- a torch.export archive (``.pt2``, in the current layout or the pre-2.8 one),
  whose program is first checked against an allowlist (``validate.py``:
  names, operators, shape expressions, tensor sizes), then loaded with every
  code-running reader shut (``guard.py``) and its guards code dropped;
- weights (a state_dict saved with torch.save, or ``.safetensors``) plus
  ``arch="module:callable"`` that builds the architecture;
- a pickled module made only of torch.nn's own classes, rebuilt by torch's
  weights_only unpickler with the allowlist in ``nn_pickle.py``, its names and
  tensor sizes checked before anything traces it.

Only with ``trust_pickle=True``: any other pickle, a ``.pt2`` that needs
unpickling, and TorchScript archives (returned as a ScriptModule;
``from_torchscript`` turns one into a trainable GraphModule once example
inputs are known). Every zip is checked from its central directory before a
byte is inflated (one member per name, also ignoring case; no zip bombs),
then every member's checksum."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from .safetensors import read_safetensors
from .record import ModelRecord, record_of
from ..errors import LoadError


# the readers, one per format; their names stay importable from ressurgeon.load
from .common import (  # noqa: F401
    SAFE_ROUTES, TRUST_ONLY_YOURS, _size, _first)
from .archive import (  # noqa: F401
    MAX_RATIO, RATIO_FREE_MEMBER, RATIO_FREE_TOTAL, _check_zip, _check_members,
    _check_empty_records, _is_torch_export, _is_torchscript, _zip_names)
from .pt2 import (  # noqa: F401
    _load_pt2, _unregistered_type, _unknown_output_type, _would_run_code)
from .torchscript import (  # noqa: F401
    _load_torchscript, from_torchscript, _convert_torchscript, _restore_parameters)
from .weights import (  # noqa: F401
    _load_torch_save, read_weights, _blocked_globals, _default_safe_globals,
    as_state_dict, _load_trusted, _pickle_imports, _with_arch, build_arch, _cwd_on_path)


def load_model(path: str | Path, *, arch: str | None = None,
               trust_pickle: bool = False, key: str | None = None) -> nn.Module:
    """Load a model file: ``read_model(...).module`` (the arguments are the same).

    Example:
        >>> model = load_model("vgg.pt2")                                  # doctest: +SKIP
    """
    return read_model(path, arch=arch, trust_pickle=trust_pickle, key=key).module


def read_model(path: str | Path, *, arch: str | None = None,
               trust_pickle: bool = False, key: str | None = None) -> ModelRecord:
    """Read a model file into a ``ModelRecord``: the module, its example inputs, its kwargs.

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
            (``ressurgeon.load.checkpoint``). A prefix shared by every key (``model.``,
            ``module.``) is stripped when the rest matches ``arch`` exactly; which
            key and prefix were used is said by a ``CheckpointNote`` warning.

    Returns:
        A ``ModelRecord`` (``load/record.py``): ``.module`` is the model, in the
        mode it was saved in; a pickled module keeps its
        own; a ``.pt2`` (which stores no mode) is in train mode when its graph
        holds train-mode batch_norm or dropout, else in eval; weights with
        ``arch`` give eval. For ``.pt2``: a plain, trainable GraphModule. For a
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
        >>> record = read_model("vgg.pt2")                                  # doctest: +SKIP
        >>> record.input_specs        # what the archive was exported with  # doctest: +SKIP
        (((1, 3, 32, 32), None),)
        >>> model = read_model("w.safetensors", arch="mynets:build_vgg").module  # doctest: +SKIP
        >>> model = read_model("torch_save_of_nn_sequential.pt").module           # doctest: +SKIP
        >>> record = read_model("tiny-bert/")       # save_pretrained folder  # doctest: +SKIP
    """
    source, module = _read(Path(path), arch, trust_pickle, key)
    return record_of(module, source)


def _read(path: Path, arch: str | None, trust_pickle: bool,
          key: str | None) -> tuple[str, nn.Module]:
    """(which reader, the module): the table of readers, by what the file is."""
    if not path.exists():
        raise LoadError(f"no such file: {path}")
    if path.is_dir():
        return "hf", _load_folder(path, arch, trust_pickle)
    if not path.is_file():
        raise LoadError(f"{path} is not a file; pass the model file itself")
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise LoadError(f"cannot read {path}: {exc.strerror}") from exc
    if path.suffix == ".safetensors":
        return "safetensors", _with_arch(read_safetensors(path), arch, path, None)
    _check_zip(path)
    if _is_torch_export(path):
        return "pt2", _load_pt2(path, trust_pickle)
    if path.suffix == ".pt2":
        raise LoadError(f"{path} is not a torch.export archive (truncated or corrupted?); "
                        "write it again with torch.export.save")
    if _is_torchscript(path):
        return "torchscript", _load_torchscript(path, trust_pickle)
    if not head:
        raise LoadError(f"{path} is empty")
    return "torch.save", _load_torch_save(path, arch, trust_pickle, key)


def _load_folder(path: Path, arch: str | None, trust_pickle: bool) -> nn.Module:
    from .hf import is_pretrained_folder, load_pretrained

    if not is_pretrained_folder(path):
        raise LoadError(f"{path} is not a file, nor a Hugging Face save_pretrained folder (it "
                        "has no config.json); pass the model file itself")
    if arch is not None:
        raise LoadError(f"--arch does not apply to {path}: a save_pretrained folder's "
                        "config.json names its architecture")
    return load_pretrained(path, trust_pickle=trust_pickle)
