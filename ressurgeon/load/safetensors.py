"""The one reader of safetensors checkpoints and their config.json.

Hugging Face folders (``hf.py``), weights files (``load.py``) and deepen's
streaming expansion (``deepen/stream.py``) all read through here:

- ``read_config``: a folder's ``config.json``, bounded in size, as a JSON object.
- ``find_checkpoint``: which ``.safetensors`` files a folder holds (one file, or
  shards listed by a ``*.safetensors.index.json``), each checked to be a plain
  file of the folder.
- ``read_header`` / ``read_entries``: every tensor's name, dtype, shape and byte
  range, checked as the format specifies (a header within bounds, byte counts
  that match shape and dtype, data without gaps or overlaps), before any tensor
  byte is read.
- ``load_tensors`` / ``read_safetensors``: the tensors themselves, each read with
  plain file reads into memory torch owns. No code in the file runs, nothing is
  memory-mapped, and only torch is needed (not the safetensors package).

Streaming readers (deepen) use the entries alone and copy bytes themselves, so
a tensor is never held whole.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LoadError, brief

__all__ = ["DTYPE_BYTES", "Checkpoint", "TensorEntry", "find_checkpoint", "load_tensors",
           "read_checkpoint", "read_config", "read_entries", "read_header", "read_index",
           "read_json", "read_safetensors"]

CONFIG = "config.json"
MAX_HEADER_BYTES = 100 << 20   # the reference reader's limit
MAX_CONFIG_BYTES = 16 << 20    # a config.json is a few KiB; this only bounds what we parse
MAX_INDEX_BYTES = 256 << 20    # an index lists every tensor name once (DeepSeek-V3's: ~9 MB)

# Bytes per element of the safetensors dtypes; in each of them all-zero bytes are the number 0.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1,
               "BOOL": 1}
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn,
                "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
                "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32,
                "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes are (absolute offsets in ``file``)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Checkpoint:
    """The safetensors checkpoint in a folder: its files, its index (if sharded), their metadata."""

    base: str                   # "model" for model.safetensors or model-0000i-of-0000n
    files: tuple[Path, ...]
    index: Path | None
    weight_map: dict
    index_metadata: dict


def read_json(path: Path, limit: int, fix: str = "fix or replace it"):
    """The JSON value in ``path``, refusing files over ``limit`` bytes.

    Raises:
        LoadError: unreadable, too large, or not JSON (the message ends with ``fix``).
    """
    try:
        with path.open("rb") as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        raise LoadError(f"cannot read {path}: {exc.strerror}") from exc
    if len(raw) > limit:
        raise LoadError(f"{path} is larger than {limit >> 20} MiB; is it the right file?")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise LoadError(f"{path} is not valid JSON ({brief(exc, 80)}); {fix}") from exc


def read_config(folder: Path, fix: str = "fix or replace it") -> dict | None:
    """``folder/config.json`` as a dict; None when the folder has none.

    Raises:
        LoadError: unreadable, larger than 16 MiB, not JSON, or not a JSON object.
    """
    path = Path(folder) / CONFIG
    if not path.is_file():
        return None
    data = read_json(path, MAX_CONFIG_BYTES, fix)
    if not isinstance(data, dict):
        raise LoadError(f"{path} is not a JSON object; {fix}")
    return data


def read_index(index: Path, suffix: str) -> tuple[dict, list[Path], dict]:
    """A shard index (``*.safetensors.index.json``, ``*.bin.index.json``): its weight map,
    the shard files it names (each a plain file beside it, ending in ``suffix``), its metadata.

    Raises:
        LoadError: no weight_map, or a shard that is not a file of the folder.
    """
    data = read_json(index, MAX_INDEX_BYTES, "write the index again")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise LoadError(f"{index} has no weight_map; write the index again")
    folder = index.parent
    names = set(weight_map.values())
    bad = sorted(str(n) for n in names
                 if not (isinstance(n, str) and re.fullmatch(r"[\w.-]+", n) and n.endswith(suffix)
                         and not n.startswith(".") and (folder / n).is_file()))
    if bad:
        raise LoadError(f"{index} names {bad[0]!r}, which is not a file in {folder} (a plain "
                        f"{suffix} name); the checkpoint is incomplete")
    meta = data.get("metadata")
    return weight_map, [folder / n for n in sorted(names)], dict(meta) if isinstance(meta, dict) \
        else {}


def find_checkpoint(folder: Path, base: str | None = None) -> Checkpoint:
    """The safetensors checkpoint in ``folder``: its index and shards, or its one file.

    Args:
        folder: the checkpoint's folder.
        base: only files named ``<base>.safetensors`` or ``<base>.safetensors.index.json``
            (``"model"`` for save_pretrained folders); None takes the folder's only one.

    Raises:
        LoadError: none, several, or an index naming files the folder does not hold.
    """
    folder = Path(folder)
    stem = "*" if base is None else glob_escape(base)
    indexes = sorted(folder.glob(f"{stem}.safetensors.index.json"))
    if len(indexes) > 1:
        raise LoadError(f"{folder} holds several index files ({indexes[0].name}, "
                        f"{indexes[1].name}); keep one checkpoint per folder")
    if not indexes:
        singles = sorted(p for p in folder.glob(f"{stem}.safetensors") if p.is_file())
        if len(singles) != 1:
            raise LoadError(f"{folder} holds {len(singles) or 'no'} .safetensors files and no "
                            "*.safetensors.index.json; expected model.safetensors, or shards "
                            "with their index")
        return Checkpoint(singles[0].name.removesuffix(".safetensors"), (singles[0],), None, {},
                          {})
    index = indexes[0]
    weight_map, files, meta = read_index(index, ".safetensors")
    return Checkpoint(index.name.removesuffix(".safetensors.index.json"), tuple(files), index,
                      weight_map, meta)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def read_entries(checkpoint: Checkpoint) -> tuple[dict[str, TensorEntry], dict]:
    """Every tensor of the checkpoint, and the first file's ``__metadata__``.

    Raises:
        LoadError: a damaged file, a tensor stored twice, or an index that does not match.
    """
    entries: dict[str, TensorEntry] = {}
    metadata = None
    for path in checkpoint.files:
        found, meta = read_header(path)
        metadata = meta if metadata is None else metadata
        for name, entry in found.items():
            if name in entries:
                raise LoadError(f"{name} is stored twice, in {entries[name].file.name} and "
                                f"{path.name}; the checkpoint is inconsistent")
            entries[name] = entry
    for name, file in checkpoint.weight_map.items():
        if name not in entries or entries[name].file.name != file:
            raise LoadError(f"{checkpoint.index.name} puts {name} in {file}, which does not hold "
                            "it; the index does not match the shards")
    return entries, metadata or {"format": "pt"}


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict | None]:
    """The tensors of one safetensors file, checked as the format specifies, and its
    ``__metadata__``.

    Raises:
        LoadError: unreadable, or not a valid safetensors file (truncated, corrupted).
    """
    path = Path(path)

    def damaged(why: str) -> LoadError:
        return LoadError(f"{path} is not a valid safetensors file ({why}); it may be truncated "
                         "or corrupted: download or write it again")

    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
                raise damaged("bad header length")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise LoadError(f"cannot read {path}: {exc.strerror}") from exc
    except (ValueError, RecursionError) as exc:
        raise damaged(f"header is not JSON: {brief(exc, 60)}") from exc
    if not isinstance(header, dict):
        raise damaged("header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict)
                                 and all(isinstance(v, str) for v in meta.values())):
        raise damaged("__metadata__ is not a map of strings")
    base, entries = 8 + n, {}
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (isinstance(dtype, str) and isinstance(shape, list)
                  and all(type(d) is int and d >= 0 for d in [*shape, start, end])
                  and start <= end)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise damaged(f"bad entry for {name}")
        if dtype in DTYPE_BYTES and end - start != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise damaged(f"{name} has {end - start} bytes for shape {shape} of {dtype}")
        entries[name] = TensorEntry(path, dtype, tuple(shape), base + start, base + end)
    position = base
    for t in sorted(entries.values(), key=lambda t: (t.start, t.end)):
        if t.start != position:
            raise damaged("tensor data overlap or leave gaps")
        position = t.end
    if position != size:
        raise damaged(f"the data is {size - base} bytes but the header describes "
                      f"{position - base}")
    return entries, meta


def load_tensors(entries: dict[str, TensorEntry]) -> dict[str, torch.Tensor]:
    """The tensors ``entries`` describe, read from their files (little-endian, as stored).

    Raises:
        LoadError: a dtype torch has no type for, or a file that shrank while being read.
    """
    if sys.byteorder != "little":
        raise LoadError("reading safetensors files needs a little-endian machine")
    unknown = next((n for n, e in entries.items() if e.dtype not in TORCH_DTYPES), None)
    if unknown is not None:
        raise LoadError(f"{entries[unknown].file} stores {unknown} as {entries[unknown].dtype}, "
                        "which ressurgeon cannot read; convert the checkpoint to a float dtype")
    tensors: dict[str, torch.Tensor] = {}
    handles: dict[Path, object] = {}
    try:
        for name, e in entries.items():
            f = handles.get(e.file)
            if f is None:
                f = handles[e.file] = e.file.open("rb")
            data = bytearray(e.nbytes)
            f.seek(e.start)
            if f.readinto(data) != e.nbytes:
                raise LoadError(f"{e.file} ended early; it was truncated while being read")
            dtype = TORCH_DTYPES[e.dtype]
            flat = (torch.frombuffer(data, dtype=dtype) if e.nbytes
                    else torch.empty(0, dtype=dtype))
            tensors[name] = flat.reshape(e.shape)
    except OSError as exc:
        raise LoadError(f"cannot read {exc.filename or 'a checkpoint file'}: "
                        f"{exc.strerror}") from exc
    finally:
        for f in handles.values():
            f.close()
    return tensors


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of one ``.safetensors`` file (no code runs when reading it).

    Raises:
        LoadError: unreadable, damaged, or a dtype torch cannot hold.

    Example:
        >>> state = read_safetensors("model.safetensors")   # doctest: +SKIP
    """
    return load_tensors(read_header(Path(path))[0])


def read_checkpoint(folder: str | Path, base: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors checkpoint in ``folder`` (one file or indexed shards).

    Raises:
        LoadError: as ``find_checkpoint`` and ``read_entries``.
    """
    return load_tensors(read_entries(find_checkpoint(Path(folder), base))[0])
