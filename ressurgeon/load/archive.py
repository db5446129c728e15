"""Zip archives (.pt2, TorchScript, torch.save) checked before any reader opens them: CRCs, ratios, empty records."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path


from ..errors import LoadError, brief
from .common import _size


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


def _check_zip(path: Path) -> None:
    """Both .pt2 and torch.save files are zip archives: check the layout, then every CRC.

    The layout comes first and reads only the central directory: a zip bomb
    must be refused before anything inflates it. torch's own readers check no
    CRC, so a flipped bit in a weight would otherwise load silently as a
    different model.
    """
    try:
        if not zipfile.is_zipfile(path):
            return
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:  # e.g. a multi-disk end
        raise LoadError(f"{path} is a zip archive ressurgeon cannot read ({brief(exc)}); "
                        "write it again with torch.save or torch.export.save") from exc
    try:
        with zipfile.ZipFile(path) as z:
            _check_members(path, z.infolist())
            _check_empty_records(path, z)
            bad = z.testzip()
    except UnicodeDecodeError as exc:  # a member flagged UTF-8 whose name is not
        raise LoadError(f"{path} holds a member whose file name is not valid UTF-8 "
                        f"({exc.object[:40]!r}); write it again with torch.save or "
                        "torch.export.save") from exc
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
