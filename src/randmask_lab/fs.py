"""File-system problems that are the user's to fix, not the code's: a full disk, a read-only folder, a file
where a folder goes.

``disk_problem`` turns such an ``OSError`` into a one-line message naming the file and what to do; the
CLI prints it with exit code 2 and a sweep or study stops on it (rather than recording every later
run as failed). Nothing is lost: every file the lab writes is written atomically (a reader sees the
old file or the new one) and a checkpoint's ``state.json`` is replaced last, so the same command run
again resumes from the last whole checkpoint. ``sqlite_problem`` classifies the same two conditions
for the results store.
"""

from __future__ import annotations

import errno
import io
import json
import sqlite3
from pathlib import Path
from typing import Any

from randmask import atomic_write_bytes
from randmask_lab.errors import RunError

DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
IN_THE_WAY = {errno.ENOTDIR, errno.EEXIST, errno.EISDIR}  # a file where a folder goes, or the reverse
RESUME = ("run the same command again: a run resumes from its last checkpoint (files are written atomically, "
          "so none is half-written)")


def make_folder(folder: str | Path) -> Path:
    """``mkdir -p folder``. A file system that refuses new folders with "No such file or directory" although the
    parent exists (/proc, /sys, a mount removed under the run), or a file where a parent folder should be, is the
    user's to fix, like a read-only one: a one-line RunError naming the folder, not a traceback."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileNotFoundError, NotADirectoryError) as e:  # /proc/x; a path under a file (/etc/hostname/x)
        raise RunError(f"cannot create the folder {folder} ({e.strerror}): its file system does not take new "
                       "folders there, or a file stands where a folder is needed. Point the command's output option "
                       "(--out, --out-dir, --figures, ...) at a writable folder") from None
    return folder


def write_json(path: str | Path, data: Any, indent: int = 1, allow_nan: bool = True) -> Path:
    """Atomically write ``data`` as indented JSON, making the folder (every JSON file the lab writes goes through
    here). ``allow_nan=False``: a non-finite number is a ValueError and nothing is written."""
    path = Path(path)
    make_folder(path.parent)
    atomic_write_bytes(path, (json.dumps(data, indent=indent, allow_nan=allow_nan) + "\n").encode())
    return path


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Atomically write a matplotlib ``Figure`` to ``path`` (format from its suffix), making the folder: rendered
    into memory first, so a killed run never leaves half a PNG where the last whole one was."""
    path = Path(path)
    make_folder(path.parent)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format=path.suffix.lstrip(".").lower() or "png")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def disk_problem(error: BaseException) -> str | None:
    """A one-line message for a full disk, a read-only / forbidden path or a file in a folder's place (or the
    reverse); None for any other error."""
    if not isinstance(error, OSError) or error.errno not in DISK_FULL | READ_ONLY | IN_THE_WAY:
        return None
    if error.errno in IN_THE_WAY:
        return (f"cannot use {error.filename or 'an output path'} ({error.strerror}): a file stands where a folder is "
                "needed, or a folder where a file is. Point the command's output option (--out, --out-dir, "
                "--figures, ...) at another path, or move what is in the way")
    where = f" writing {error.filename}" if error.filename else ""
    if error.errno in DISK_FULL:
        return f"no space left on the device{where} ({error.strerror}): free some space, then {RESUME}"
    return (f"cannot write{where or ' a file'} ({error.strerror}): the folder is read-only or not yours. Pass a "
            f"writable --out-dir (or fix its permissions), then {RESUME}")


def sqlite_problem(error: sqlite3.Error) -> str | None:
    """"full" or "read-only" for those conditions of a SQLite store, None for anything else."""
    name = getattr(error, "sqlite_errorname", "")  # Python >= 3.11; the message is the fallback
    text = str(error).lower()
    if name.startswith("SQLITE_FULL") or "disk is full" in text:
        return "full"
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")) or (
            "readonly" in text or "unable to open database file" in text):
        return "read-only"
    return None


__all__ = ["DISK_FULL", "IN_THE_WAY", "READ_ONLY", "disk_problem", "sqlite_problem"]
