"""Files: written atomically, beside their destination, never over anything we did not write.

``atomic_path`` yields a temporary path next to the destination and renames it
into place only when the block succeeds, so a failure never leaves a
half-written output under the final name. Temporary names say who made them
(``.NAME.<pid>.ressurgeon-tmp``): a run that was killed leaves one behind, and
the next run writing the same destination removes it once its process is gone.

``check_output`` is the one output-path rule every command applies before any
work: an output is never an input nor inside an input folder, and it only ever
replaces a regular file (never a device, FIFO, socket, folder, a path under
/proc, /sys or /dev, nor a symbolic link, which is refused rather than followed).
``atomic_path`` applies the file-type half again at write time.

``owned_folder`` writes a folder of files (``--save-code``): the folder's
marker lists each file ressurgeon wrote there with the SHA-256 of what it wrote.
A listed file is ours only while its content still has that hash; only such
files are replaced, and nothing is ever deleted, so a crafted or stale marker
cannot make ressurgeon touch a file it did not write.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ExportError

CODE_MARKER = ".ressurgeon-code"  # lists the files ressurgeon wrote in a --save-code folder
# what save_code writes (pickled_N.pt too, with trust_pickle)
CODE_FILES = ("module.py", "__init__.py", "model.safetensors", "constants.safetensors")
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


SYSTEM_TREES = ("proc", "sys", "dev")  # top-level folders whose entries are not files to replace


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISDIR, "folder"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return name
    return "special file"


def check_replaceable(dest: str | Path, flag: str = "the output") -> None:
    """Refuse a destination that exists and is not a regular file, or lies under /proc, /sys, /dev.

    A symbolic link is refused, never followed: writing through one would
    replace its target (``/dev/null``, ``/proc/self/fd/1``, someone's file).
    """
    dest = Path(dest)
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise ExportError(f"{flag} {dest}: {exc.strerror}") from exc
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise ExportError(f"{flag} {dest} is a symbolic link; ressurgeon never writes through a "
                          "link: remove it or give another file name")
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise ExportError(f"{flag} {dest} is a folder; give a file name")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise ExportError(f"{flag} {dest} is a {_kind(st.st_mode)}, not a regular file; "
                          "ressurgeon only replaces regular files: give a file name")
    try:
        real = dest.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop in a parent
        raise ExportError(f"{flag} {dest}: {getattr(exc, 'strerror', None) or exc}") from None
    if (len(real.parts) > 1 and real.parts[1] in SYSTEM_TREES
            and real.parts[1:3] != ("dev", "shm")):  # /dev/shm holds ordinary files (tmpfs)
        raise ExportError(f"{flag} {dest} is under /{real.parts[1]}, which holds no files to "
                          "write; give a path in an ordinary folder")


def check_output(dest: str | Path, inputs=(), flag: str = "the output") -> Path:
    """The one output-path rule, applied before any work; returns the resolved destination.

    ``dest`` is not one of ``inputs`` nor inside an input folder (a Hugging Face
    folder, a checkpoint folder), replaces nothing but a regular file
    (``check_replaceable``), and its folder takes a new file (``check_writable``).

    Raises:
        ExportError: naming ``flag``, the path and the fix.
    """
    dest = Path(dest)
    check_replaceable(dest, flag)
    real = dest.resolve()
    for source in inputs:
        if source is None:
            continue
        try:
            src = Path(source).resolve()
        except (OSError, RuntimeError) as exc:
            raise ExportError(f"input {source}: {getattr(exc, 'strerror', None) or exc}") from None
        if real == src:
            raise ExportError(f"{flag} {dest} is one of the inputs; ressurgeon never overwrites "
                              "its input: choose another output name")
        if src in real.parents:
            raise ExportError(f"{flag} {dest} lies inside the input {source}; ressurgeon never "
                              "writes into its input: choose a path outside it")
    check_writable(dest)
    return real


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
    check_replaceable(dest)
    _remove_stale(dest, parent)
    # keep the suffix: some writers (torch.export.save) check it
    tmp = parent / f"{_tmp_name(dest)}{dest.suffix}"
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())  # the mode a plain open() would give
        check_replaceable(dest)  # again: something may have appeared there meanwhile
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
        owned = set(owned_files(folder))
        theirs = sorted(({p.name for p in folder.iterdir()} - owned) & set(CODE_FILES))
        if theirs:
            raise ExportError(f"--save-code {folder} holds {theirs[0]}, which ressurgeon did not "
                              "write (or which changed since); move it away or choose a new "
                              "folder")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def owned_files(folder: Path) -> list[str]:
    """The files in ``folder`` that ressurgeon wrote and nobody changed since.

    The marker lists ``SHA256  NAME`` per file written; a name counts only when
    it is a plain file name, the entry is a regular file (no link), and its
    content still hashes to the recorded value. A marker in an older format (no
    hashes), or one somebody wrote by hand, owns nothing whose content it does
    not match.

    Raises:
        ExportError: the marker is not a regular file, or lists a folder, a link or
            anything else that is not a regular file (ressurgeon only writes files).
    """
    marker = folder / CODE_MARKER
    try:
        st = os.lstat(marker)
    except FileNotFoundError:
        return []
    if not stat.S_ISREG(st.st_mode):
        raise ExportError(f"--save-code {folder}: its {CODE_MARKER} is a {_kind(st.st_mode)}, "
                          "not a file ressurgeon wrote; choose a new folder")
    names = []
    for line in marker.read_text(errors="replace").splitlines()[1:]:
        digest, _, name = line.strip().partition("  ")
        if not name or "/" in name or "\\" in name or name in (".", "..") or name == CODE_MARKER:
            continue
        try:
            mode = os.lstat(folder / name).st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(mode):
            raise ExportError(f"--save-code {folder}: its {CODE_MARKER} lists {name!r}, which is "
                              f"a {_kind(mode)}; ressurgeon only writes files: choose a new "
                              "folder")
        if len(digest) == 64 and _sha256(folder / name) == digest:
            names.append(name)
    return names


@contextlib.contextmanager
def owned_folder(folder: str | Path) -> Iterator[Path]:
    """Yield a scratch folder; move its files into ``folder`` if the block succeeds.

    A file already in ``folder`` is replaced only when the marker proves
    ressurgeon wrote it (``owned_files``: name and content hash); nothing is
    deleted. The new marker lists the files written now with their hashes.

    Raises:
        ExportError: the folder holds a file of the same name that ressurgeon did
            not write, the writer made a subfolder or a link, or the disk is full.
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
        if any(not stat.S_ISREG(os.lstat(scratch / n).st_mode) for n in new):
            raise ExportError("the code writer made a subfolder or a link; ressurgeon only "
                              "writes files")
        existing = set(p.name for p in folder.iterdir()) if folder.is_dir() else set()
        clash = sorted((existing - set(owned_files(folder))) & set(new))
        if clash:
            raise ExportError(f"--save-code {folder} holds {clash[0]}, which ressurgeon did not "
                              "write (or which changed since); move it away or choose a new "
                              "folder")
        hashes = {name: _sha256(scratch / name) for name in new}
        folder.mkdir(exist_ok=True)
        mode = 0o666 & ~_umask()
        for name in new:
            (scratch / name).chmod(mode)
            os.replace(scratch / name, folder / name)
        marker = "written by ressurgeon --save-code; it replaces only these files (SHA-256):\n"
        with atomic_path(folder / CODE_MARKER) as tmp:
            tmp.write_text(marker + "".join(f"{hashes[n]}  {n}\n" for n in new))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise ExportError(f"cannot write --save-code {folder}: {exc.strerror}") from exc
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
