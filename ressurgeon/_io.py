"""Files: written atomically, beside their destination, never over anything we did not write.

``atomic_path`` yields a temporary path next to the destination and renames it
into place only when the block succeeds, so a failure never leaves a
half-written output under the final name. Temporary names say who made them
(``.NAME.<pid>.ressurgeon-tmp``): a run that was killed leaves one behind, and
the next run writing the same destination removes it once its process is gone.

``owned_folder`` writes a folder of files (``--save-code``): the folder's
marker lists the files ressurgeon wrote there, and only those are ever replaced
or removed; a user's own files in the folder are left alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ExportError

CODE_MARKER = ".ressurgeon-code"  # lists the files ressurgeon wrote in a --save-code folder
CODE_FILES = ("module.py", "__init__.py", "state_dict.pt")  # what GraphModule.to_folder writes
TMP_TAG = "ressurgeon-tmp"


def check_parent(dest: str | Path) -> Path:
    """The folder ``dest`` goes into; ExportError when it is missing or not writable."""
    dest = Path(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        is_dir = parent.is_dir()
    except OSError as exc:
        raise ExportError(f"cannot use output folder {parent}: {exc.strerror}") from exc
    if not is_dir:
        raise ExportError(f"output folder {parent} does not exist; create it first")
    return parent


def check_writable(dest: str | Path) -> None:
    """Refuse early, before any work, a destination whose folder cannot take a new file."""
    parent = check_parent(dest)
    name = Path(dest).name
    if len(os.fsencode(name)) > 255:
        raise ExportError(f"the file name {name[:40]}... is too long ({len(name)} characters); "
                          "choose a shorter name")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{os.getpid()}.probe.",
                                         suffix=f".{TMP_TAG}"):
            pass
    except OSError as exc:
        raise ExportError(f"cannot write into {parent}: {exc.strerror}; choose a folder you "
                          "can write to") from exc


def _tmp_name(dest: Path) -> str:
    return f".{dest.name}.{os.getpid()}.{TMP_TAG}"


def _remove_stale(dest: Path, parent: Path) -> None:
    """Temporary files of earlier runs for ``dest`` whose process is gone (a killed run)."""
    for old in parent.glob(f".{_glob_escape(dest.name)}.*.{TMP_TAG}*"):
        pid = old.name[len(dest.name) + 2:].partition(f".{TMP_TAG}")[0]
        if pid.isdecimal() and not _alive(int(pid)):
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; move it onto ``dest`` only if the block succeeds."""
    dest = Path(dest)
    parent = check_parent(dest)
    if dest.is_dir():
        raise ExportError(f"{dest} is a folder; give a file name")
    _remove_stale(dest, parent)
    # keep the suffix: some writers (torch.export.save) check it
    tmp = parent / f"{_tmp_name(dest)}{dest.suffix}"
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())  # the mode a plain open() would give
        os.replace(tmp, dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise ExportError(f"cannot write {dest}: {exc.strerror}; nothing was written "
                              "there") from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def scratch_dir(dest: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``dest`` for a writer that makes several files; removed after."""
    dest = Path(dest)
    parent = check_parent(dest)
    _remove_stale(dest, parent)
    scratch = parent / f"{_tmp_name(dest)}.d"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check_code_folder(folder: str | Path) -> None:
    """Refuse a --save-code destination that is not a folder of ours (or a new one)."""
    folder = Path(folder)
    if folder.is_symlink():
        raise ExportError(f"--save-code {folder} is a symbolic link; give a real folder")
    if folder.resolve() == Path.cwd().resolve() or str(folder) in (".", ""):
        raise ExportError("--save-code cannot be the current folder; give a new folder name, "
                          "e.g. --save-code rewritten_code")
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"--save-code {folder} is a file; give a folder name")
    if folder.is_dir() and not (folder / CODE_MARKER).is_file() and any(folder.iterdir()):
        raise ExportError(f"--save-code {folder} already exists and is not a folder ressurgeon "
                          "wrote; choose a new folder (ressurgeon only replaces its own files)")
    if folder.is_dir():
        theirs = sorted(({p.name for p in folder.iterdir()} - set(owned_files(folder)))
                        & set(CODE_FILES))
        if theirs:
            raise ExportError(f"--save-code {folder} holds {theirs[0]}, which ressurgeon did not "
                              "write; move it away or choose a new folder")


def owned_files(folder: Path) -> list[str]:
    """The files a marker says ressurgeon wrote in ``folder`` (plain names, nothing else)."""
    marker = folder / CODE_MARKER
    if not marker.is_file():
        return []
    names = []
    for line in marker.read_text(errors="replace").splitlines()[1:]:
        name = line.strip()
        if name and "/" not in name and "\\" not in name and name not in (".", ".."):
            names.append(name)
    return names


@contextlib.contextmanager
def owned_folder(folder: str | Path) -> Iterator[Path]:
    """Yield a scratch folder; move its files into ``folder`` if the block succeeds.

    Only the files listed in ``folder``'s marker from an earlier run are replaced
    or removed; the new marker lists the files written now. Any other file in
    the folder stays as it is.
    """
    folder = Path(folder)
    check_code_folder(folder)
    parent = check_parent(folder)
    _remove_stale(folder, parent)
    scratch = parent / _tmp_name(folder)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        yield scratch
        new = sorted(p.name for p in scratch.iterdir() if p.name != CODE_MARKER)
        if any((scratch / n).is_dir() for n in new):
            raise ExportError("the code writer made a subfolder; ressurgeon only writes files")
        existing = set(p.name for p in folder.iterdir()) if folder.is_dir() else set()
        clash = sorted((existing - set(owned_files(folder))) & set(new))
        if clash:
            raise ExportError(f"--save-code {folder} holds {clash[0]}, which ressurgeon did not "
                              "write; move it away or choose a new folder")
        folder.mkdir(exist_ok=True)
        for name in owned_files(folder):
            if name not in new:
                (folder / name).unlink(missing_ok=True)
        mode = 0o666 & ~_umask()
        for name in new:
            (scratch / name).chmod(mode)
            os.replace(scratch / name, folder / name)
        marker = "written by ressurgeon --save-code; it replaces only these files:\n"
        (folder / CODE_MARKER).write_text(marker + "".join(f"{n}\n" for n in new))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
