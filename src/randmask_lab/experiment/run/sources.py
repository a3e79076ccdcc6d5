"""What data a run reads: the fingerprint that goes into its id, and where each split came from.

A fingerprint lists each original file the task reads (its name inside the data folder, its size and
SHA-256), or the Hub source. Hashes are cached per process, keyed by (path, size, mtime), so a sweep
hashes SST-2's 67k rows once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from randmask import open_limited
from randmask_lab.errors import DataFormatError
from randmask_lab.tasks import TaskSplits, get_task
from randmask_lab.tasks.readers import MAX_DATA_BYTES

_HASHES: dict[tuple[str, int, int], str] = {}


MAX_MODEL_FILE_BYTES = 1 << 40


def _sha256(path: Path, limit: int, what: str) -> tuple[int, str]:
    """(size, SHA-256) of one file, the hash cached per process by (path, size, mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open_limited(path, limit, what, error=DataFormatError) as (f, _):
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return stat.st_size, _HASHES[key]


def file_fingerprint(path: Path) -> dict[str, Any]:
    """{"file": the path's last three parts, "size", "sha256"} of one file (hash cached by path, size, mtime)."""
    path = Path(path)
    size, sha256 = _sha256(path, MAX_DATA_BYTES, "task data file")
    # The name inside the data folder, not the absolute path: the same files elsewhere are the same data.
    return {"file": "/".join(path.resolve().parts[-3:]), "size": size, "sha256": sha256}


def model_fingerprint(model: str) -> list[dict[str, Any]] | None:
    """A local model folder's files (each top-level file's name, size and SHA-256), so that other weights at the
    same path, or the same relative path from another folder, are another run; None for a name the model zoo
    knows (a versioned weight package) or a Hub id, which are identified by their name."""
    from randmask_lab.zoo import model_names

    folder = Path(model).expanduser()
    if model in model_names() or not folder.is_dir():
        return None
    return [{"file": p.name, "size": size, "sha256": sha256} for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".")
            for size, sha256 in [_sha256(p, MAX_MODEL_FILE_BYTES, "model file")]]


def data_fingerprint(task: str, data_dir: str | None, source: str | None) -> dict[str, Any]:
    """The data a run of ``task`` reads: {"train": [file fingerprints], "test": [...]} or {"hub": source}.

    Raises the task layer's DataError when the files are missing, before any model is loaded.
    """
    where = get_task(task).files(data_dir, source)
    if where.hub is not None:
        return {"hub": where.hub}
    return {"train": [file_fingerprint(p) for p in where.train or ()],
            "test": [file_fingerprint(p) for p in where.test or ()] if where.test else None}


def split_sources(splits: TaskSplits, fingerprint: dict[str, Any], train_origin: str,
                  test_origin: str | None) -> dict[str, Any]:
    """For a record: where train, val and test came from, their sizes, and the data fingerprint."""
    carved = test_origin is None
    return {
        "train": {"from": train_origin, "pool": "train", "rows": len(splits.train)},
        "val": {"from": train_origin, "pool": "train", "rows": len(splits.val)},
        "test": {"from": train_origin if carved else test_origin, "pool": "train (carved)" if carved else "test",
                 "rows": len(splits.test)},
        "fingerprint": fingerprint,
    }
