"""rewire, save: an adapter folder holds only what ``rewire`` added, PEFT-style.

    adapter/
      rewire_config.json    {"format": "ressurgeon-rewire", "version": 1, "config": {...},
                             "blocks": "model.layers", "count": 4, "base": "LlamaForCausalLM",
                             "parameters": {name: shape}}
      rewire.safetensors    the new parameters, named as in the rewired model

``load_adapter(base, folder)`` rewires ``base`` with the saved config and loads the tensors;
the names and shapes must match exactly. Readers accept every version up to ``VERSION``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn

from .._io import atomic_path, check_parent
from ..errors import ConfigError, ExportError, LoadError, brief

FORMAT = "ressurgeon-rewire"
VERSION = 1
CONFIG_FILE = "rewire_config.json"
WEIGHTS_FILE = "rewire.safetensors"
MAX_CONFIG_BYTES = 1 << 20


def write_adapter(folder: str | Path, meta: dict, tensors: dict) -> Path:
    """Write the two files of an adapter into ``folder`` (created; files replaced atomically).

    Raises:
        ExportError: ``folder`` is a file, or the files cannot be written.
    """
    try:
        from safetensors.torch import save_file
    except ImportError as exc:
        raise ExportError("saving an adapter needs safetensors: pip install safetensors") from exc
    folder = Path(folder)
    check_parent(folder)
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"{folder} is a file; give a folder for the adapter")
    folder.mkdir(exist_ok=True)
    data = {"format": FORMAT, "version": VERSION, **meta}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": FORMAT})
    with atomic_path(folder / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return folder


def read_adapter(folder: str | Path) -> tuple[dict, dict]:
    """(the adapter's metadata, its tensors by name).

    Raises:
        LoadError: a file is missing or unreadable, another format, or a newer version.
    """
    from ..load import read_safetensors

    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise LoadError(f"{folder} has no {CONFIG_FILE}; is it a folder written by "
                        "RewireResult.save_adapter or 'ressurgeon rewire'?")
    try:
        raw = path.read_bytes()[: MAX_CONFIG_BYTES + 1]
        if len(raw) > MAX_CONFIG_BYTES:
            raise ValueError("larger than 1 MiB")
        meta = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise LoadError(f"{path} is not a readable adapter config ({brief(exc)})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LoadError(f"{path} is not a ressurgeon rewire adapter (format "
                        f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("version")
    if not isinstance(version, int) or not 1 <= version <= VERSION:
        raise LoadError(f"{path} has adapter version {version!r}; this ressurgeon reads versions "
                        f"1..{VERSION}: upgrade ressurgeon")
    for key, kind in (("config", dict), ("blocks", str), ("count", int), ("parameters", dict)):
        if not isinstance(meta.get(key), kind):
            raise LoadError(f"{path} has no valid '{key}' entry")
    if not (folder / WEIGHTS_FILE).is_file():
        raise LoadError(f"{folder} has no {WEIGHTS_FILE}")
    return meta, read_safetensors(folder / WEIGHTS_FILE)


def load_into(model: nn.Module, meta: dict, tensors: dict, folder: Path) -> None:
    """Copy the adapter's tensors into the rewired ``model``'s new parameters (names and shapes
    must match exactly)."""
    import torch

    params = dict(model.named_parameters())
    expected = set(meta["parameters"])
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors))[:3]
        extra = sorted(set(tensors) - expected)[:3]
        raise LoadError(f"{folder}/{WEIGHTS_FILE} does not match its config (missing "
                        f"{missing}, unexpected {extra}); write the adapter again")
    for name, value in tensors.items():
        target = params.get(name)
        if target is None or tuple(target.shape) != tuple(value.shape):
            raise ConfigError(f"the adapter's {name} {tuple(value.shape)} has no counterpart "
                              f"in this base model"
                              f"{'' if target is None else f' (it has {tuple(target.shape)})'}; "
                              "was the adapter made for another model?")
        with torch.no_grad():
            target.copy_(value.to(dtype=target.dtype, device=target.device))
