"""Files: written atomically, beside their destination, never over an input.

``atomic_path`` yields a temporary path next to the destination and renames
it into place only when the block succeeds, so a failure (or a killed run)
never leaves a half-written output under the final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ExportError

CODE_MARKER = ".ressurgeon-code"  # marks a --save-code folder, the only kind we replace


def check_parent(dest: str | Path) -> Path:
    """The folder ``dest`` goes into; ExportError when it does not exist."""
    dest = Path(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"output folder {parent} does not exist; create it first")
    return parent


@contextlib.contextmanager
def atomic_path(dest: str | Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; move it onto ``dest`` only if the block succeeds."""
    dest = Path(dest)
    parent = check_parent(dest)
    if is_dir and dest.is_dir() and any(dest.iterdir()) and not (dest / CODE_MARKER).exists():
        raise ExportError(f"{dest} already exists and is not a folder ressurgeon wrote; "
                          "choose a new folder (ressurgeon only replaces its own)")
    if not is_dir and dest.is_dir():
        raise ExportError(f"{dest} is a folder; give a file name")
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=parent))
    else:
        # keep the suffix: some writers (torch.export.save) check it
        fd, name = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".tmp{dest.suffix}",
                                    dir=parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        # mkstemp/mkdtemp create 0600/0700; give the result the mode a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod((0o777 if is_dir else 0o666) & ~umask)
        if is_dir and dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
