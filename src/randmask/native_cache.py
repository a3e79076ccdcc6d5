"""The native kernel's build cache: what is checked before a cached shared object is loaded.

A cached ``sddmm-<key>.so`` is code this process runs, so randmask loads one only when, as careful
loaders of cached native code do:

- the cache folder belongs to this user and nobody else can write to it; otherwise (a shared or
  world-writable folder, where anyone could plant a library that runs its own code at load) the
  kernel is built in a private temporary folder for this process, with a warning naming the fix;
- the file is a regular file (not a symlink) owned by this user, not writable by group or others;
- its size and SHA-256 equal those recorded beside it (``sddmm-<key>.so.sha256``, JSON) when randmask
  built it. A truncated file (which would crash the process with SIGBUS at the first call), a
  damaged one, a foreign one or one without a record is built again.

``randmask.native`` calls :func:`build_folder` before building, :func:`is_recorded` before loading and
:func:`record` after compiling.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

from randmask.config import MaskingError
from randmask.files import atomic_write_bytes, private_problem, read_json_limited, read_limited
from randmask.warn import warn_caller

MAX_LIBRARY_BYTES = 64 << 20  # the kernel builds to ~20 KB; anything near this is not ours
RECORD_SUFFIX = ".sha256"
_private_temp: Path | None = None


def _temporary_folder() -> Path:
    """This process's private build folder (mode 0700), removed at exit."""
    global _private_temp
    if _private_temp is None:
        _private_temp = Path(tempfile.mkdtemp(prefix="randmask-native-"))
        atexit.register(shutil.rmtree, _private_temp, ignore_errors=True)
    return _private_temp


def build_folder(folder: Path) -> Path:
    """``folder`` (created mode 0700) when it is private to this user, else a private temporary folder."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.stat(folder)
    except OSError as e:
        problem = f"cannot be used ({e.strerror})"
    else:
        problem = private_problem(info) if stat.S_ISDIR(info.st_mode) else "is not a folder"
    if problem is None:
        return folder
    if _private_temp is None:  # once per process: every later build goes to the same private folder
        warn_caller(f"randmask: the native-kernel cache {folder} {problem}: a library planted there would run in "
                    "this process, so the kernel is built in a private temporary folder instead (about a second "
                    f"per process). Fix: chmod go-w {folder} (or chown it to yourself), or set RANDMASK_CACHE to a "
                    "folder only you can write.", RuntimeWarning)
    return _temporary_folder()


def _record_path(library: Path) -> Path:
    return library.with_name(library.name + RECORD_SUFFIX)


def _digest(library: Path) -> tuple[int, str]:
    data = read_limited(library, MAX_LIBRARY_BYTES, "native kernel build", private=True)
    return len(data), hashlib.sha256(data).hexdigest()


def record(library: Path, target: Path) -> None:
    """Record the size and SHA-256 of the freshly compiled ``library`` for ``target`` (its final name)."""
    size, digest = _digest(library)
    atomic_write_bytes(_record_path(target), (json.dumps({"size": size, "sha256": digest}) + "\n").encode())


def is_recorded(library: Path) -> bool:
    """True when ``library`` is private, regular and exactly the build recorded beside it."""
    if not library.exists() and not library.is_symlink():
        return False
    try:
        saved = read_json_limited(_record_path(library), 4096, "native kernel build record", private=True)
        return isinstance(saved, dict) and _digest(library) == (saved.get("size"), saved.get("sha256"))
    except MaskingError:
        return False


def discard(library: Path) -> None:
    """Remove a cached build and its record (a damaged or foreign file, or one pruned)."""
    for path in (library, _record_path(library)):
        path.unlink(missing_ok=True)


def prune_records(folder: Path) -> None:
    """Remove the records of builds that are gone (pruned by ``randmask.native``)."""
    for path in folder.glob(f"sddmm-*.so{RECORD_SUFFIX}"):
        if not path.with_name(path.name.removesuffix(RECORD_SUFFIX)).exists():
            path.unlink(missing_ok=True)


__all__ = ["MAX_LIBRARY_BYTES", "build_folder", "discard", "is_recorded", "prune_records", "record"]
