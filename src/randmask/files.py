"""The one way randmask (library and lab) reads a file: a regular file, of bounded size.

Every file randmask opens goes through here: adapters, SHiRA files, PEFT configs, checkpoints, study
files and specs, caches. A symlink to ``/dev/zero``, a FIFO, a device or a folder is refused before a
byte is read (opened non-blocking, so even opening a FIFO cannot hang), and the size is checked on
the open file (``fstat``) before anything is allocated, so a file that is replaced between the check
and the read cannot slip past it. A file that grows past its limit while being read is refused too.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from randmask.config import MaskingError

ErrorType = type[Exception]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _fail(error: ErrorType, problem: str, fix: str) -> Exception:
    return error(f"{problem}; {fix}" if fix else problem)


def private_problem(info: os.stat_result) -> str | None:
    """Why a file or folder with this ``stat`` is not private to this user (None when it is): another owner, or
    write permission for group or others (anyone who can write it can plant code or data there)."""
    if info.st_uid != os.getuid():
        return f"is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


@contextmanager
def open_limited(path: str | os.PathLike, max_bytes: int, what: str = "file", *, fix: str = "",
                 error: ErrorType = MaskingError, private: bool = False) -> Iterator[tuple[BinaryIO, int]]:
    """Open ``path`` for reading as ``(binary file, size)`` after checking it is a regular file (symlinks to
    one are fine) of at most ``max_bytes``; ``error`` (naming ``what`` and ``fix``) otherwise. ``private``:
    also refuse a symlink, and a file another user owns or can write (cached code, see ``randmask.native``)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if private:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise _fail(error, f"{path} not found ({what})", fix) from None
    except OSError as e:
        raise _fail(error, f"cannot open {path} ({e.strerror})", fix) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _fail(error, f"{path} is {_kind(info.st_mode)}, not a regular file ({what}); refused unread", fix)
        if private and private_problem(info):
            raise _fail(error, f"{path} {private_problem(info)} ({what}); refused unread", fix)
        if info.st_size > max_bytes:
            raise _fail(error, f"{path} is {info.st_size:,} bytes, over the {max_bytes:,}-byte limit ({what})", fix)
        file = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with file:
        yield file, info.st_size


def read_limited(path: str | os.PathLike, max_bytes: int, what: str = "file", *, fix: str = "",
                 error: ErrorType = MaskingError, private: bool = False) -> bytes:
    """The bytes of regular file ``path``, at most ``max_bytes`` of them (checked before reading); ``private``
    as in ``open_limited``."""
    with open_limited(path, max_bytes, what, fix=fix, error=error, private=private) as (file, _):
        try:
            data = file.read(max_bytes + 1)
        except OSError as e:
            raise _fail(error, f"cannot read {path} ({e.strerror})", fix) from None
    if len(data) > max_bytes:  # it grew while being read
        raise _fail(error, f"{path} grew past the {max_bytes:,}-byte limit while being read ({what})", fix)
    return data


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e400 parses to inf, which no JSON writer emits
        raise ValueError(f"{text[:30]} is out of the float range")
    return value


def loads_strict(text: str) -> Any:
    """``json.loads`` that refuses what Python's parser lets through: NaN, Infinity and overflowing numbers.

    Raises ``ValueError`` (``JSONDecodeError`` included) or ``RecursionError`` (nesting too deep); callers
    turn those into their own one-line error. :func:`parse_json` is the version that does that for you.
    """
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)


def read_json_limited(path: str | os.PathLike, max_bytes: int, what: str = "JSON file", *, fix: str = "",
                      error: ErrorType = MaskingError, private: bool = False) -> Any:
    """Strict JSON from regular file ``path`` (UTF-8; NaN/Infinity refused; nesting bounded by the parser)."""
    return parse_json(read_limited(path, max_bytes, what, fix=fix, error=error, private=private), f"{path}", what,
                      fix=fix, error=error)


def parse_json(data: bytes | str, where: str, what: str = "JSON", *, fix: str = "",
               error: ErrorType = MaskingError) -> Any:
    """Strict JSON: bad UTF-8, NaN/Infinity/1e400, deep nesting and syntax errors: ``error`` naming ``where``."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return loads_strict(text)
    except UnicodeDecodeError as e:
        problem = f"{where} is not UTF-8 text ({e.reason} at byte {e.start})"
    except RecursionError:
        problem = f"{where} nests JSON deeper than Python's parser allows"
    except ValueError as e:  # JSONDecodeError, and NaN/Infinity/1e400 from loads_strict
        problem = f"{where} is not valid JSON ({str(e)[:80]})"
    raise _fail(error, f"{problem}; the {what} is damaged or not one", fix) from None


def file_size(path: str | Path) -> int | None:
    """The size of regular file ``path`` (following symlinks), or None when it is absent or not a regular file."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def _umask() -> int:
    # The only portable way to read the umask is to set it; put it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """A temp file beside ``path`` for the block to write, by any means (a writer that replaces it with a file of its
    own, as safetensors' ``save_file`` does, too). When the block ends, the file gets the permissions a plain
    ``open(path, "wb")`` would (0666 minus the umask, not mkstemp's 0600), is synced and moved onto ``path``, so
    readers see the old file or the new one, never half of one. On an error it is removed and ``path`` untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:  # the block's writer may have closed (or replaced) the file it wrote
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never half of one (``atomic_target``)."""
    with atomic_target(path) as tmp:
        tmp.write_bytes(data)


__all__ = ["atomic_target", "atomic_write_bytes", "file_size", "loads_strict", "open_limited", "parse_json",
           "private_problem", "read_json_limited", "read_limited"]
