"""Writing an expanded checkpoint: output shards copied tensor by tensor through one buffer.

The folders are checked first (a new or empty destination outside the source,
enough free space); the shards, their index and the other files are written into
a scratch folder and published with renames once complete. Each tensor's bytes
are copied verbatim with plain reads through one fixed buffer of ``CHUNK_BYTES``
(a zeroed tensor is written from a buffer of zeros), so the peak memory is
``2 * CHUNK_BYTES`` whatever the size of tensors and shards.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .._io import check_parent, check_writable
from ..errors import ExportError, LoadError
from ..load.safetensors import DTYPE_BYTES, Checkpoint, TensorEntry
from .decide import StackPlan

CHUNK_BYTES = 8 << 20                 # one read or write; two such buffers are all we hold
DISK_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES)  # as _io
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack",
                   ".index.json")


@dataclass(frozen=True)
class _Out:
    """One tensor of the expanded checkpoint: its new name, its source, and whether it is zero."""

    name: str
    source: TensorEntry
    zero: bool = False


def _plan_tensors(tensors: dict[str, TensorEntry], plan: StackPlan) -> list[_Out]:
    """Every output tensor in order (natural sort of the new names)."""
    in_stack = {name for block in plan.layers for name in block.values()}
    outputs = [_Out(name, t) for name, t in tensors.items() if name not in in_stack]
    for new_index, (src, is_new) in enumerate(plan.sources):
        zeroed = plan.zeroed[src][1] if is_new else frozenset()
        for rest, name in plan.layers[src].items():
            outputs.append(_Out(f"{plan.prefix}.{new_index}.{rest}", tensors[name],
                                rest in zeroed))
    return sorted(outputs, key=lambda t: _natural(t.name))


def _natural(name: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name))


def _check_dirs(src: Path, dst: Path) -> None:
    if not src.is_dir():
        raise LoadError(f"{src} is not a folder; pass the checkpoint's folder")
    real_src, real_dst = src.resolve(), dst.resolve()
    if real_dst == real_src or real_src in real_dst.parents:
        raise ExportError(f"the destination {dst} lies inside the source {src}; give a folder "
                          "outside it")
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise ExportError(f"{dst} is a file or a link; give a new or empty folder")
    if dst.is_dir() and any(p for p in dst.iterdir() if not _ours(p, real_dst)):
        raise ExportError(f"{dst} is not empty; give a new or empty folder (nothing there is "
                          "overwritten)")
    check_writable(dst / "config.json" if dst.is_dir() else dst)


def _ours(path: Path, dst: Path) -> bool:
    """A scratch folder an earlier run left inside ``dst`` (scratch_dir removes it if stale)."""
    return path.name.startswith(f".{dst.name}.") and ".ressurgeon-tmp" in path.name


def _check_space(dst: Path, need: int) -> None:
    folder = dst if dst.is_dir() else check_parent(dst)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise ExportError(f"the expanded checkpoint needs {need / 1e9:.1f} GB but {folder} has "
                          f"{free / 1e9:.1f} GB free; free space or choose another disk")


def _split_shards(outputs: list[_Out], cap: int, base: str) -> list[tuple[str, list[_Out]]]:
    """Consecutive groups of at most ``cap`` bytes (a larger tensor alone), named as HF does."""
    groups: list[list[_Out]] = [[]]
    size = 0
    for t in outputs:
        if groups[-1] and size + t.source.nbytes > cap:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.source.nbytes
    if len(groups) == 1:
        return [(f"{base}.safetensors", groups[0])]
    n = len(groups)
    return [(f"{base}-{i:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups, 1)]


def _write_shards(folder: Path, shards, metadata: dict) -> int:
    buffer, zeros = memoryview(bytearray(CHUNK_BYTES)), memoryview(bytes(CHUNK_BYTES))
    handles: dict[Path, object] = {}
    written = 0
    try:
        for name, group in shards:
            # widest elements first, and a header padded to 8 bytes: every tensor is aligned
            group = sorted(group, key=lambda t: -DTYPE_BYTES.get(t.source.dtype, 1))
            header, offset = {"__metadata__": metadata}, 0
            for t in group:
                header[t.name] = {"dtype": t.source.dtype, "shape": list(t.source.shape),
                                  "data_offsets": [offset, offset + t.source.nbytes]}
                offset += t.source.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            with (folder / name).open("wb") as out:
                out.write(len(raw).to_bytes(8, "little"))
                out.write(raw)
                for t in group:
                    if t.zero:
                        _write_zeros(out, t.source.nbytes, zeros)
                    else:
                        f = handles.get(t.source.file)
                        if f is None:
                            f = handles[t.source.file] = t.source.file.open("rb", buffering=0)
                        _copy(f, t.source, out, buffer)
                out.flush()
                os.fsync(out.fileno())
            written += 8 + len(raw) + offset
    finally:
        for f in handles.values():
            f.close()
    return written


def _copy(f, t: TensorEntry, out, buffer: memoryview) -> None:
    f.seek(t.start)
    left = t.nbytes
    while left:
        got = f.readinto(buffer[:min(left, len(buffer))])
        if not got:
            raise LoadError(f"{t.file} ended early; it was truncated while being read")
        out.write(buffer[:got])
        left -= got


def _write_zeros(out, n: int, zeros: memoryview) -> None:
    while n:
        k = min(n, len(zeros))
        out.write(zeros[:k])
        n -= k


def _write_index(path: Path, shards, metadata: dict) -> int:
    total = sum(t.source.nbytes for _, group in shards for t in group)
    metadata = {**metadata, "total_size": total}
    if "total_parameters" in metadata:
        metadata["total_parameters"] = sum(math.prod(t.source.shape)
                                           for _, group in shards for t in group)
    weight_map = {t.name: name for name, group in shards for t in group}
    return _write_json(path, {"metadata": metadata,
                              "weight_map": dict(sorted(weight_map.items()))})


def _write_json(path: Path, data: dict) -> int:
    text = json.dumps(data, indent=2) + "\n"
    path.write_text(text, encoding="utf-8")
    return len(text.encode())


def _other_files(src: Path, source: Checkpoint, *,
                 rewrite_config: bool) -> tuple[list[Path], list[str]]:
    """Files copied unchanged (tokenizer, generation config), and those left out, by name."""
    copied, skipped = [], []
    ours = {*source.files, source.index} | ({src / "config.json"} if rewrite_config else set())
    for path in sorted(src.iterdir()):
        if path in ours:
            continue
        if not path.is_file():
            skipped.append(path.name + "/")
        elif path.name.endswith(WEIGHT_SUFFIXES):
            skipped.append(path.name)   # other weights (pytorch_model.bin) have the old depth
        else:
            copied.append(path)
    return copied, skipped


def _publish(scratch: Path, dst: Path) -> None:
    """Move the finished folder into place: one rename, or one per file into an empty ``dst``."""
    try:
        if not dst.exists():
            os.rename(scratch, dst)
            return
        for path in scratch.iterdir():
            os.replace(path, dst / path.name)
    except OSError as exc:
        raise ExportError(f"cannot move the expanded checkpoint into {dst}: {exc.strerror}; "
                          "give a new folder") from exc
