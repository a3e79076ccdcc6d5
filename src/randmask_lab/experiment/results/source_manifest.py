"""The commit a copy of the checkout holds, named without git: for a machine that receives the working tree but
not its ``.git`` (a lent GPU machine), so that its records still name their commit (issue 26, Must 6).

Where git is (``write_manifest``), the tracked files under the code paths are listed with their git blob ids at
HEAD. Where it is not (``manifest_version``), every file is hashed the way git hashes a blob and compared: the
copy is that commit exactly when each listed file matches and no other file is there (compiled leftovers aside).
A blob id is SHA-1 over ``b"blob <size>\\0" + content``, the hash ``git ls-tree`` prints, so the check needs
neither git nor trust in whoever sent the copy.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from randmask import atomic_write_bytes, read_json_limited
from randmask_lab.errors import RunError

MANIFEST_ENV = "RANDMASK_SOURCE_MANIFEST"
"""Environment variable naming a manifest file: read by ``record.source_version`` outside a git checkout."""

_LEFTOVERS = ("__pycache__", ".pyc", ".egg-info")  # what Python and pip write into a source tree; git ignores them
_SHA1 = re.compile(r"[0-9a-f]{40}")


def blob_id(data: bytes) -> str:
    """The git blob id of a file's content (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def run_git(root: Path, *args: str, timeout: float = 60) -> str:
    """``git -C root args...``'s stdout; a RunError naming the command when git is missing, hangs or fails."""
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RunError(f"git {' '.join(args[:2])} could not run in {root}: {exc}") from exc
    if done.returncode != 0:
        raise RunError(f"git {' '.join(args[:2])} failed in {root}: {done.stderr.strip()[:200]}")
    return done.stdout


def has_uncommitted_changes(root: Path, code_paths: Sequence[str], timeout: float = 60) -> bool:
    """Whether the checkout at ``root`` has uncommitted (or untracked, not ignored) files under ``code_paths``."""
    return bool(run_git(root, "status", "--porcelain", "--untracked-files=normal", "--", *code_paths,
                        timeout=timeout).strip())


def write_manifest(root: Path, code_paths: Sequence[str], path: Path) -> dict[str, Any]:
    """List HEAD's tracked files under ``code_paths`` of the checkout at ``root`` with their blob ids into
    ``path`` (JSON); a RunError when those files have uncommitted changes (the manifest would name a commit that
    is not the code)."""
    if has_uncommitted_changes(root, code_paths):
        raise RunError(f"{', '.join(code_paths)} have uncommitted changes in {root}: commit them first, so that the "
                       "manifest names the code that will run")
    files = {}
    for entry in filter(None, run_git(root, "ls-tree", "-r", "-z", "HEAD", "--", *code_paths).split("\0")):
        meta, name = entry.split("\t", 1)  # -z: names verbatim, never quoted
        files[name] = meta.split()[2]
    manifest = {"commit": run_git(root, "rev-parse", "HEAD").strip(), "code_paths": list(code_paths), "files": files}
    atomic_write_bytes(path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return manifest


def read_manifest(path: Path) -> dict[str, Any]:
    """A manifest written by ``write_manifest``; a RunError naming the file when it is not one."""
    data = read_json_limited(path, 1 << 24, "source manifest", error=RunError)
    files = data.get("files") if isinstance(data, dict) else None
    paths = data.get("code_paths") if isinstance(data, dict) else None
    if (not isinstance(files, dict) or not files or not isinstance(data.get("commit"), str)
            or not _SHA1.fullmatch(data["commit"]) or not isinstance(paths, list) or not paths
            or not all(isinstance(p, str) and p and not _escapes(p) for p in paths)
            or not all(isinstance(k, str) and not _escapes(k) and isinstance(v, str) and _SHA1.fullmatch(v)
                       for k, v in files.items())):
        raise RunError(f"{path} is not a source manifest (write one with experiments/gpu_confirm.py --prepare)")
    return data


def manifest_version(root: Path, path: Path) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the copy at ``root`` against the manifest at ``path``: dirty when a listed file is
    missing or differs, or a file the manifest does not list lies under its code paths."""
    manifest = read_manifest(path)
    listed: dict[str, str] = manifest["files"]
    dirty = any(_blob_of(root / name) != blob for name, blob in listed.items())
    for top in manifest["code_paths"]:
        base = root / top
        found = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file() or p.is_symlink()]
        for file in found:
            name = file.relative_to(root).as_posix()
            if name not in listed and not any(part.endswith(_LEFTOVERS) for part in file.relative_to(root).parts):
                dirty = True
    return {"commit": manifest["commit"], "dirty": dirty}


def _blob_of(file: Path) -> str | None:
    try:
        return blob_id(file.read_bytes()) if file.is_file() and not file.is_symlink() else None
    except OSError:
        return None


def _escapes(name: str) -> bool:
    """A path that leaves the checkout (absolute, or with ``..``): a crafted manifest must not make us hash
    files elsewhere."""
    parts = Path(name).parts
    return Path(name).is_absolute() or ".." in parts or not parts
