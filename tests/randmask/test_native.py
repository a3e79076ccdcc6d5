"""The compiled SDDMM kernel: built here, equal to a float64 reference, and a clean fallback when it cannot build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from randmask import native, ops, sddmm
from randmask.config import MaskingError
from randmask.masks import bernoulli_mask, make_generator
from randmask.ops import SparsePattern


def _reference(g: torch.Tensor, x: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    return (g.double()[:, pattern.out_index] * x.double()[:, pattern.in_index]).sum(0)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty cache and no library loaded yet: the next call builds from scratch."""
    monkeypatch.setenv("RANDMASK_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_library", None)
    return tmp_path


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")
def test_the_kernel_builds_where_a_compiler_exists(fresh_build):
    """CI has a compiler: a broken build must fail here, not fall back silently everywhere else."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "did not build" warning
        assert native.available()
    built = list((fresh_build / "native").glob("sddmm-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native._tried, native._library = False, None
    assert native.available() and built[0].stat().st_mtime_ns == stamp  # the cached build is reused


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")
def test_a_damaged_cached_build_is_rebuilt(fresh_build):
    assert native.available()
    (built,) = (fresh_build / "native").glob("sddmm-*.so")
    built.unlink()  # a new file, not an overwrite: this process still maps the loaded one
    built.write_bytes(b"not an ELF file")
    # A fresh interpreter (dlopen here would hand back the library already loaded under that name).
    code = "import warnings; warnings.simplefilter('error'); from randmask import native; print(native.available())"
    src = str(Path(native.__file__).parents[1])  # this checkout's randmask, not whichever one is installed
    env = {**os.environ, "RANDMASK_CACHE": str(fresh_build), "PYTHONPATH": src}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "True" and built.read_bytes()[:4] == b"\x7fELF"


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")
def test_a_new_build_prunes_all_but_the_newest_builds(fresh_build):
    folder = fresh_build / "native"
    folder.mkdir()
    old = [folder / f"sddmm-old{i}.so" for i in range(native.KEEP_BUILDS + 2)]
    for i, path in enumerate(old):
        path.write_bytes(b"an older build")
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    other = folder / "notes.txt"
    other.write_text("not a build")
    assert native.available()
    kept = set(folder.glob("sddmm-*.so"))
    assert len(kept) == native.KEEP_BUILDS and set(old[-(native.KEEP_BUILDS - 1):]) < kept
    assert other.exists()


def test_a_failing_compiler_warns_once_and_ops_falls_back(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "false")  # exits 1 and writes nothing
    with pytest.warns(RuntimeWarning, match="did not build"):
        assert not native.available()
    assert not native.available()  # tried once: no second warning, no second build
    g, x = torch.randn(5, 6), torch.randn(5, 4)
    pattern = SparsePattern(bernoulli_mask((6, 4), 0.5, make_generator(0, "w")), (6, 4))
    torch.testing.assert_close(ops.sddmm(g, x, pattern).double(), _reference(g, x, pattern), rtol=1e-5, atol=1e-5)


def test_a_compiler_named_in_cc_but_missing_warns(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc-randmask")
    with pytest.warns(RuntimeWarning, match="not an executable"):
        assert not native.available()


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    assert not native.available()


needs_kernel = pytest.mark.skipif(not native.available(), reason="native kernel not built (no C compiler)")

# Each vector path of the kernel (see native.PATH_DEFINES), and the paths a CPU whose best is the key runs.
PATHS = ("avx512", "avx2", "portable")
RUNS = {"avx512": PATHS, "avx2": ("avx2", "portable"), "portable": ("portable",)}


@pytest.fixture(scope="module")
def path_builds(tmp_path_factory):
    """Every path this CPU runs, each built once (in a private cache) and loaded: {path: library}."""
    if not native.available():
        return {}
    saved = native._tried, native._library
    cache = tmp_path_factory.mktemp("native-paths")
    builds = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RANDMASK_CACHE", str(cache))
        for asked in ("auto", "avx2", "portable"):
            mp.setenv(native.PATH_ENV, asked)
            native._tried, native._library = False, None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "avx2" on a CPU without it: checked below
                assert native.available()
            builds.setdefault(native.compiled_path(), native._library)
    native._tried, native._library = saved
    best = next(p for p in PATHS if p in builds)
    assert set(builds) == set(RUNS[best]), f"a {best} CPU built {sorted(builds)}"  # each forced path built
    return builds


@pytest.fixture(params=PATHS)
def kernel_path(request, path_builds, monkeypatch):
    """The kernel's ``request.param`` path is the one ops calls (skipped where this CPU cannot run it)."""
    if request.param not in path_builds:
        pytest.skip(f"this CPU does not run the {request.param} path" if path_builds else "no native kernel")
    monkeypatch.setattr(native, "_tried", True)
    monkeypatch.setattr(native, "_library", path_builds[request.param])
    monkeypatch.setattr(sddmm, "NATIVE_DENSE_CROSSOVER", 2.0)
    assert native.compiled_path() == request.param
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 63, 64, 65, 150])
@pytest.mark.parametrize(("shape", "transposed", "p"), [((96, 40), False, 0.05), ((40, 96), True, 0.05),
                                                         ((96, 40), False, 0.004), ((30, 20), False, 0.9)])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_matches_float64_reference(kernel_path, dtype, tokens, shape, transposed, p, threads):
    """Every path: token-block edges (TB = 64), a tail block, touched subsets (gathered packing) and all
    features (register-transposed tiles, with partial tiles at 40 and 20 features), entry tails of the
    8- and 16-entry dot blocks, the CSR reorder, 1 and 2 threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pattern = SparsePattern(bernoulli_mask(shape, p, make_generator(tokens, "w")), shape, transposed)
        out_f, in_f = pattern.logical_shape
        gen = torch.Generator().manual_seed(tokens)
        g = torch.randn(tokens, out_f, generator=gen).to(dtype)
        x = torch.randn(tokens, in_f, generator=gen).to(dtype)
        got = ops.sddmm(g, x, pattern)
    finally:
        torch.set_num_threads(before)
    assert got.dtype == torch.float32 and got.shape == (pattern.nnz,)
    torch.testing.assert_close(got.double(), _reference(g, x, pattern), rtol=1e-5, atol=1e-4)


@needs_kernel
def test_native_reads_row_strided_operands_in_place():
    """A column slice of a wider activation (row stride != width) is read without a copy."""
    wide_g, wide_x = torch.randn(70, 50), torch.randn(70, 33)
    g, x = wide_g[:, 5:45], wide_x[:, :30]
    assert not g.is_contiguous() and native.supports(g)
    pattern = SparsePattern(bernoulli_mask((40, 30), 0.1, make_generator(3, "w")), (40, 30))
    plan = pattern.plan()
    lhs, rhs = (g, x) if plan.lhs_is_out else (x, g)
    values = native.sddmm_csr(lhs, plan.lhs_touched, rhs, plan.rhs_touched, plan.crow, plan.col)
    got = torch.empty_like(values)
    got[plan.order if plan.order is not None else slice(None)] = values
    torch.testing.assert_close(got.double(), _reference(g, x, pattern), rtol=1e-5, atol=1e-5)


def test_supports_only_what_the_kernel_reads():
    assert native.supports(torch.zeros(3, 4)) and native.supports(torch.zeros(3, 4, dtype=torch.bfloat16))
    assert not native.supports(torch.zeros(3, 4, dtype=torch.float16))
    assert not native.supports(torch.zeros(3, 4, dtype=torch.float64))
    assert not native.supports(torch.zeros(2, 3, 4))
    assert not native.supports(torch.zeros(4, 3).t())  # column-strided


@needs_kernel
def test_sddmm_csr_rejects_what_it_cannot_read():
    g, x = torch.randn(4, 3), torch.randn(4, 2)
    crow, col = torch.tensor([0, 1, 1, 2], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="int32"):
        native.sddmm_csr(g, None, x, None, crow.long(), col)
    with pytest.raises(ValueError, match="same T"):
        native.sddmm_csr(g, None, x[:3], None, crow, col)
    with pytest.raises(ValueError, match="one row per lhs feature"):
        native.sddmm_csr(g, None, x, None, crow[:3], col)
    with pytest.raises(ValueError, match="integer"):
        native.sddmm_csr(g, torch.tensor([0.0, 1.0, 2.0]), x, None, crow, col)
    with pytest.raises(ValueError, match="rise from 0"):
        native.sddmm_csr(g, None, x, None, torch.tensor([0, 2, 1, 2], dtype=torch.int32), col)
    with pytest.raises(ValueError, match="outside"):
        native.sddmm_csr(g, None, x, None, crow, torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="outside"):
        native.sddmm_csr(g, torch.tensor([0, 1, 3]), x, None, crow, col)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(96, 70), (256, 192)])
def test_every_path_matches_on_wider_layers(kernel_path, dtype, shape):
    """Many full 16x16 tiles (the vector paths' register transposes) and thousands of entries, 2 threads."""
    pattern = SparsePattern(bernoulli_mask(shape, 0.2, make_generator(5, "w")), shape)
    gen = torch.Generator().manual_seed(7)
    g, x = (torch.randn(200, f, generator=gen).to(dtype) for f in shape)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = ops.sddmm(g, x, pattern)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got.double(), _reference(g, x, pattern), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")
def test_the_path_is_chosen_by_environment(fresh_build, monkeypatch):
    """RANDMASK_NATIVE_PATH=portable builds the portable path; an unknown value is a one-line error."""
    monkeypatch.setenv(native.PATH_ENV, "portable")
    assert native.available() and native.compiled_path() == "portable"
    monkeypatch.setenv(native.PATH_ENV, "avx9")
    native._tried, native._library = False, None
    with pytest.raises(MaskingError, match="RANDMASK_NATIVE_PATH='avx9' is not a native kernel path; use one of"):
        native.available()


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")
def test_a_forced_path_that_does_not_build_warns(fresh_build, monkeypatch):
    """Forcing AVX2 where the compiler targets no AVX2 (no -march=native: the last fallback) says so."""
    monkeypatch.setattr(native, "FLAGS", native.BASE_FLAGS)  # the compiler's default target: no AVX2
    monkeypatch.setenv(native.PATH_ENV, "avx2")
    with pytest.warns(RuntimeWarning, match="asked for the avx2 SDDMM path, but this CPU and compiler built the "
                                            "portable one"):
        assert native.available()
    assert native.compiled_path() == "portable"


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")
def test_without_openmp_the_kernel_builds_on_pthreads(fresh_build, monkeypatch):
    """A compiler with no OpenMP: the first build fails, the second (pthreads) is used, with no warning."""
    monkeypatch.setattr(native, "OPENMP_FLAGS", ["-fno-such-option-randmask"])
    monkeypatch.setattr(sddmm, "NATIVE_DENSE_CROSSOVER", 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.available()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        shape = (80, 48)
        pattern = SparsePattern(bernoulli_mask(shape, 0.1, make_generator(6, "w")), shape)
        g, x = torch.randn(200, 80), torch.randn(200, 48)
        got = ops.sddmm(g, x, pattern)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got.double(), _reference(g, x, pattern), rtol=1e-5, atol=1e-4)
