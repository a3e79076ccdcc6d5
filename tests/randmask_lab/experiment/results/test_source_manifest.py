"""A copy of a checkout without its .git names its commit through a source manifest, and only when it is that
commit's code exactly."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from randmask_lab.errors import RunError
from randmask_lab.experiment.results.source_manifest import blob_id, manifest_version, read_manifest, write_manifest

CODE = ("src", "pyproject.toml")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    (repo / "src" / "pkg").mkdir(parents=True)
    (repo / "src" / "pkg" / "__init__.py").write_text("x = 1\n")
    (repo / "src" / "pkg" / "data.bin").write_bytes(b"\0\1\2")
    (repo / "src" / "pkg" / "a b ü.txt").write_text("a name git would quote\n")
    (repo / "pyproject.toml").write_text("[project]\nname = 'pkg'\n")
    (repo / "README.md").write_text("not code\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    return repo


def _copy_without_git(repo: Path, to: Path) -> Path:
    shutil.copytree(repo, to, ignore=shutil.ignore_patterns(".git"))
    return to


def test_blob_ids_are_gits(repo: Path) -> None:
    assert blob_id(b"x = 1\n") == _git(repo, "hash-object", "src/pkg/__init__.py").strip()


def test_a_copy_of_the_commit_names_it_and_any_change_makes_it_dirty(repo: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    written = write_manifest(repo, CODE, manifest)
    head = _git(repo, "rev-parse", "HEAD").strip()
    assert written["commit"] == head and set(written["files"]) == {"src/pkg/__init__.py", "src/pkg/data.bin",
                                                                   "src/pkg/a b ü.txt", "pyproject.toml"}
    copy = _copy_without_git(repo, tmp_path / "copy")
    (copy / "src" / "pkg" / "__pycache__").mkdir()
    (copy / "src" / "pkg" / "__pycache__" / "x.pyc").write_bytes(b"compiled")  # Python's leftovers are not code
    (copy / "README.md").write_text("edited, but not code\n")
    assert manifest_version(copy, manifest) == {"commit": head, "dirty": False}

    (copy / "src" / "pkg" / "__init__.py").write_text("x = 2\n")  # an edit
    assert manifest_version(copy, manifest)["dirty"] is True
    (copy / "src" / "pkg" / "__init__.py").write_text("x = 1\n")
    (copy / "src" / "pkg" / "extra.py").write_text("")  # a file the commit lacks
    assert manifest_version(copy, manifest)["dirty"] is True
    (copy / "src" / "pkg" / "extra.py").unlink()
    (copy / "pyproject.toml").unlink()  # a file missing
    assert manifest_version(copy, manifest)["dirty"] is True


def test_a_manifest_of_uncommitted_code_is_refused(repo: Path, tmp_path: Path) -> None:
    (repo / "src" / "pkg" / "__init__.py").write_text("x = 3\n")
    with pytest.raises(RunError, match="uncommitted changes"):
        write_manifest(repo, CODE, tmp_path / "m.json")
    (repo / "src" / "pkg" / "__init__.py").write_text("x = 1\n")
    (repo / "README.md").write_text("docs change: not code\n")
    assert write_manifest(repo, CODE, tmp_path / "m.json")["commit"]


@pytest.mark.parametrize("content", [
    "[]", '{"commit": "abc", "code_paths": ["src"], "files": {"a": "' + "0" * 40 + '"}}',
    '{"commit": "' + "a" * 40 + '", "code_paths": ["src"], "files": {"../../etc/passwd": "' + "0" * 40 + '"}}',
    '{"commit": "' + "a" * 40 + '", "code_paths": ["/"], "files": {"a": "' + "0" * 40 + '"}}',
    '{"commit": "' + "a" * 40 + '", "code_paths": ["src"], "files": {}}', "not json"])
def test_a_crafted_manifest_is_one_clear_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "m.json"
    path.write_text(content)
    with pytest.raises(RunError, match="not a source manifest|m.json"):
        read_manifest(path)


def test_source_version_reads_the_manifest_outside_a_checkout(monkeypatch, tmp_path: Path, repo: Path) -> None:
    """What a record says on a machine that got the tree without .git: the manifest's commit, checked."""
    from randmask_lab.experiment.results import record

    manifest = tmp_path / "manifest.json"
    write_manifest(repo, CODE, manifest)
    copy = _copy_without_git(repo, tmp_path / "copy")
    monkeypatch.setattr(record, "checkout_root", lambda: None)
    monkeypatch.setattr(record, "source_folder", lambda: copy / "src")
    monkeypatch.setenv("RANDMASK_SOURCE_MANIFEST", str(manifest))
    record.source_version.cache_clear()
    try:
        assert record.source_version()["commit"] == json.loads(manifest.read_text())["commit"]
        assert record.source_version()["dirty"] is False
        monkeypatch.setattr(record, "source_folder", lambda: tmp_path / "site-packages")  # an installed copy
        record.source_version.cache_clear()
        with pytest.raises(RunError, match="unset it"):
            record.source_version()
        monkeypatch.delenv("RANDMASK_SOURCE_MANIFEST")
        record.source_version.cache_clear()
        assert record.source_version()["commit"] is None
    finally:
        record.source_version.cache_clear()


def test_git_status_of_the_code_paths_is_shared_by_records_and_manifests(monkeypatch, repo: Path) -> None:
    """``has_uncommitted_changes`` is the one check ``record.source_version`` and ``write_manifest`` make: an
    edit or a new file under the code paths counts, one elsewhere does not, and a missing git is a RunError that
    ``source_version`` turns into "no commit" rather than a crash."""
    from randmask_lab.experiment.results import record
    from randmask_lab.experiment.results.source_manifest import has_uncommitted_changes

    assert not has_uncommitted_changes(repo, CODE)
    (repo / "README.md").write_text("edited, but not code\n")
    assert not has_uncommitted_changes(repo, CODE)
    (repo / "src" / "pkg" / "new.py").write_text("y = 2\n")
    assert has_uncommitted_changes(repo, CODE)

    monkeypatch.setattr(record, "checkout_root", lambda: repo)
    record.source_version.cache_clear()
    try:
        assert record.source_version()["commit"] == _git(repo, "rev-parse", "HEAD").strip()
        assert record.source_version()["dirty"] is True
        monkeypatch.setenv("PATH", "")  # no git at all
        with pytest.raises(RunError, match=r"git status --porcelain could not run in .*No such file"):
            has_uncommitted_changes(repo, CODE)
        record.source_version.cache_clear()
        assert record.source_version()["commit"] is None and record.source_version()["dirty"] is None
    finally:
        record.source_version.cache_clear()
