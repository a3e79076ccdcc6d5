"""Issue 28: a cached native build is loaded only from a private folder and only when it is the recorded build.

Each case loads in a fresh interpreter: dlopen hands back a library already loaded under the same name,
so only a new process shows what a later run would load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from tests.conftest import REPO_ROOT

from randmask import native, native_cache

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")

# Loads the kernel, runs it against a float64 reference, reports whether a planted constructor ran.
PROBE = textwrap.dedent("""
    import os, sys, warnings
    sys.path.insert(0, {src!r})
    import torch
    from randmask import native
    warnings.simplefilter("always")
    ok = native.available()
    g, x = torch.randn(70, 8, dtype=torch.float64), torch.randn(70, 6, dtype=torch.float64)
    crow = torch.tensor([0, 1, 2, 2, 2, 2, 2, 2, 2], dtype=torch.int32)
    col = torch.tensor([0, 3], dtype=torch.int32)
    got = native.sddmm_csr(g.float(), None, x.float(), None, crow, col).double() if ok else None
    want = torch.stack([(g[:, 0] * x[:, 0]).sum(), (g[:, 1] * x[:, 3]).sum()])
    print("AVAILABLE" if ok else "TORCH-PATH", "RIGHT" if got is not None and torch.allclose(got, want, atol=1e-4)
          else "NO-RESULT" if got is None else "WRONG", "PLANTED-CODE-RAN" if os.path.exists({mark!r}) else "CLEAN")
""")

PLANTED = r"""
#include <stdio.h>
#include <stdint.h>
__attribute__((constructor)) static void planted(void) { FILE *f = fopen("%s", "w"); if (f) fclose(f); }
int randmask_sddmm(void *a, int64_t b, int c, void *d, int64_t e, void *f, int64_t g, int h, void *i, int64_t j,
                   int64_t k, void *l, void *m, int64_t n, float *out, int o) {
    for (int64_t e2 = 0; e2 < n; e2++) out[e2] = 42.0f;  /* wrong gradients */
    return 0;
}
"""


def _probe(cache, tmp_path) -> subprocess.CompletedProcess:
    code = PROBE.format(src=str(REPO_ROOT / "src"), mark=str(tmp_path / "planted-ran"))
    env = {**os.environ, "RANDMASK_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def _built_once(tmp_path_factory):
    cache = tmp_path_factory.mktemp("native_cache") / "cache"
    result = _probe(cache, cache.parent)
    assert result.stdout.split() == ["AVAILABLE", "RIGHT", "CLEAN"], result.stderr[-2000:]
    return cache


@pytest.fixture
def built(tmp_path, _built_once):
    """A copy of a cache holding one good build (built once per module); returns the build's path."""
    shutil.copytree(_built_once, tmp_path / "cache")  # modes kept: the folder stays private
    (library,) = (tmp_path / "cache" / "native").glob("sddmm-*.so")
    return library


def _forge_record(library) -> None:
    data = library.read_bytes()
    record = library.with_name(library.name + native_cache.RECORD_SUFFIX)
    record.write_text(json.dumps({"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}))


def test_a_build_is_recorded_and_the_folder_is_private(built):
    record = json.loads(built.with_name(built.name + ".sha256").read_text())
    assert record == {"size": built.stat().st_size, "sha256": hashlib.sha256(built.read_bytes()).hexdigest()}
    assert built.parent.stat().st_mode & 0o777 == 0o700 and not built.stat().st_mode & 0o022


def test_a_truncated_build_is_rebuilt_not_loaded(built, tmp_path):
    """Loading it would die with SIGBUS at the first call; it must be rebuilt instead."""
    size = built.stat().st_size
    data = built.read_bytes()
    built.unlink()
    built.write_bytes(data[:8192])
    result = _probe(built.parent.parent, tmp_path)
    assert result.returncode == 0 and result.stdout.split() == ["AVAILABLE", "RIGHT", "CLEAN"], result.stderr[-2000:]
    assert built.stat().st_size == size


@pytest.mark.parametrize("forged_record", [False, True])
def test_a_foreign_library_is_never_a_traceback(built, tmp_path, forged_record):
    foreign = tmp_path / "foreign.c"
    foreign.write_text("int something_else(void) { return 1; }\n")
    built.unlink()
    subprocess.run(["cc", "-shared", "-fPIC", str(foreign), "-o", str(built)], check=True)
    if forged_record:  # as if the record matched: the missing symbol must still not be a traceback
        _forge_record(built)
    result = _probe(built.parent.parent, tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stdout.split()[1:] == ["RIGHT", "CLEAN"]  # another flag set's build, or the torch path
    if forged_record:  # dropped once loaded and found foreign: the next process builds it again
        assert not built.exists()
        assert _probe(built.parent.parent, tmp_path).stdout.split() == ["AVAILABLE", "RIGHT", "CLEAN"]
    assert built.exists() and native_cache.is_recorded(built)


def test_a_library_planted_in_a_shared_folder_never_runs(built, tmp_path):
    """Anyone who can write the folder could plant a library and its record: the folder itself is refused."""
    source = tmp_path / "planted.c"
    source.write_text(PLANTED % (tmp_path / "planted-ran"))
    built.unlink()
    subprocess.run(["cc", "-shared", "-fPIC", str(source), "-o", str(built)], check=True)
    _forge_record(built)
    os.chmod(built.parent, 0o777)
    result = _probe(built.parent.parent, tmp_path)
    assert result.stdout.split() == ["AVAILABLE", "RIGHT", "CLEAN"], result.stderr[-2000:]
    assert "writable by group or others" in result.stderr and "chmod go-w" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_a_cache_folder_of_another_user_is_not_used(built, tmp_path):
    os.chown(built.parent, 65534, 65534)
    result = _probe(built.parent.parent, tmp_path)
    assert result.stdout.split() == ["AVAILABLE", "RIGHT", "CLEAN"] and "owned by uid 65534" in result.stderr


@pytest.mark.parametrize("attack", ["symlink", "group_writable", "unrecorded"])
def test_a_symlinked_writable_or_unrecorded_build_is_rebuilt(built, tmp_path, monkeypatch, attack):
    if attack == "symlink":
        elsewhere = tmp_path / "elsewhere.so"
        shutil.copyfile(built, elsewhere)
        built.unlink()
        built.symlink_to(elsewhere)
    elif attack == "group_writable":
        os.chmod(built, 0o777)
    else:
        built.with_name(built.name + native_cache.RECORD_SUFFIX).unlink()
    assert not native_cache.is_recorded(built)
    monkeypatch.setenv("RANDMASK_CACHE", str(built.parent.parent))
    rebuilt = native._build(native._compiler(), [*native.FLAGS, *native.OPENMP_FLAGS])  # what _open would load
    assert rebuilt == built and native_cache.is_recorded(built)
    assert not built.is_symlink() and not built.stat().st_mode & 0o022


def test_records_of_pruned_builds_go_too(tmp_path, monkeypatch):
    monkeypatch.setenv("RANDMASK_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_library", None)
    folder = tmp_path / "native"
    folder.mkdir(mode=0o700)
    (folder / "sddmm-gone.so.sha256").write_text("{}")
    assert native.available()
    assert not (folder / "sddmm-gone.so.sha256").exists()
    assert len(list(folder.glob("*.sha256"))) == len(list(folder.glob("sddmm-*.so"))) == 1


@pytest.mark.parametrize("path", ["avx2", "portable"])
def test_a_lesser_path_build_is_recorded_and_checked_too(tmp_path, monkeypatch, path):
    """RANDMASK_NATIVE_PATH (issue 29) builds its own file, keyed by its flags, and it goes through the same
    record check: a planted library in its place is rebuilt, never run."""
    monkeypatch.setenv(native.PATH_ENV, path)
    cache = tmp_path / "cache"
    assert _probe(cache, tmp_path).stdout.split() == ["AVAILABLE", "RIGHT", "CLEAN"]
    (library,) = (cache / "native").glob("sddmm-*.so")
    assert native_cache.is_recorded(library)
    monkeypatch.delenv(native.PATH_ENV)
    monkeypatch.setenv("RANDMASK_CACHE", str(cache))
    default = native._build(native._compiler(), [*native.FLAGS, *native.OPENMP_FLAGS])
    assert default != library  # the path's flags are part of the build's key
    monkeypatch.setenv(native.PATH_ENV, path)
    source = tmp_path / "planted.c"
    source.write_text(PLANTED % (tmp_path / "planted-ran"))
    library.unlink()
    subprocess.run(["cc", "-shared", "-fPIC", str(source), "-o", str(library)], check=True)  # no record of it
    result = _probe(cache, tmp_path)
    assert result.stdout.split() == ["AVAILABLE", "RIGHT", "CLEAN"], result.stderr[-2000:]
    assert native_cache.is_recorded(library)
