"""An optional compiled SDDMM kernel, built with the system C compiler on first use.

``randmask.ops`` calls :func:`sddmm_csr` for the masked weight gradient when :func:`available`;
otherwise (no compiler, a non-CPU tensor, ``RANDMASK_NATIVE=0``) it uses its pure-torch path. The
kernel (``_native/sddmm.c``) reads the (tokens, features) activations in place, so it skips the
tokens-last copies that ``torch.sparse.sampled_addmm`` needs (benchmarks/sddmm_crossover.py times
both). It is plain C with no torch headers: it builds in about a second, and is called through
ctypes (which releases the GIL) with the tensors' data pointers.

The shared object is cached in ``$RANDMASK_CACHE/native`` (default ``~/.cache/randmask/native``),
named by a hash of the source, the flags, the compiler and this CPU's feature flags (``-march=native``
code must not run on another CPU). Set ``CC`` to choose the compiler. The cache holds code this process
loads and runs, so a cached build is loaded only from a folder private to the user and only when it is
byte for byte the build randmask recorded (``randmask.native_cache``); anything else is built again.

The vector path (AVX-512, else AVX2 + FMA, else portable C) is the best this CPU runs;
``RANDMASK_NATIVE_PATH=avx2`` or ``portable`` builds a lesser one (to test or time it), ``compiled_path()``
says which one is loaded. Each path is its own recorded build (its flags are part of the key), verified
like any other.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from randmask import native_cache
from randmask.config import MaskingError
from randmask.warn import warn_caller

SOURCE = Path(__file__).with_name("_native") / "sddmm.c"
BASE_FLAGS = ["-O3", "-shared", "-fPIC", "-pthread"]
# This CPU's instructions (AVX-512 where it has them: see _native/sddmm.c); x86 compilers otherwise
# prefer 256-bit vectors on CPUs whose 512-bit units downclock.
FLAGS = [*BASE_FLAGS, "-march=native"] + (["-mprefer-vector-width=512"] if platform.machine().lower() in
                                          ("x86_64", "amd64") else [])
# Tried first: OpenMP, so that the kernel runs on torch's own OpenMP pool (see _native/sddmm.c); without
# it (a compiler with no OpenMP) the kernel starts its own pthreads.
OPENMP_FLAGS = ["-fopenmp"]
DISABLE_ENV = "RANDMASK_NATIVE"  # "0": never build or use the kernel
PATH_ENV = "RANDMASK_NATIVE_PATH"  # which vector path to compile: see PATH_DEFINES
# The kernel's vector path is chosen when it is compiled (_native/sddmm.c): "auto" builds the best one
# this CPU runs (AVX-512, else AVX2 + FMA, else portable C); the others force a lesser one, so that a
# machine can build and test every path it can run. Each is its own cached build (the flags differ).
PATH_DEFINES = {"auto": [], "avx2": ["-DRANDMASK_NO_AVX512"], "portable": ["-DRANDMASK_PORTABLE"]}

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


KEEP_BUILDS = 6  # cached builds kept: the flag fallbacks of this source, and a few other checkouts' versions


def _cache_dir() -> Path:
    root = os.environ.get("RANDMASK_CACHE") or Path.home() / ".cache" / "randmask"
    return Path(root) / "native"


def _cpu_signature() -> str:
    """This CPU's feature flags (Linux), else the machine name: part of the build's identity."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def _build(compiler: str, flags: list[str]) -> Path:
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    folder = native_cache.build_folder(_cache_dir())  # a private folder: see native_cache
    target = folder / f"sddmm-{key}.so"
    if native_cache.is_recorded(target):  # exactly the file randmask built and recorded; else build it again
        return target
    # Build beside the target and rename: a concurrent process sees the old state or the whole file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            errors = [line for line in lines if "error" in line.lower()]
            raise RuntimeError((errors or lines or [f"{compiler} exited with {proc.returncode}"])[0].strip())
        os.chmod(tmp, 0o700)
        native_cache.record(Path(tmp), target)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _prune_old_builds(folder, keep=KEEP_BUILDS)
    native_cache.prune_records(folder)
    return target


def _prune_old_builds(folder: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest cached builds. Each source, flag, compiler or CPU change builds a new
    file and nothing else removes the old ones. A process that has one loaded keeps its mapping (POSIX unlink),
    and one about to load a pruned file rebuilds it (``_open``)."""
    builds = []
    for path in folder.glob("sddmm-*.so"):
        try:
            builds.append((path.stat().st_mtime, path))
        except OSError:  # removed meanwhile by another process's prune
            pass
    for _, path in sorted(builds, reverse=True)[keep:]:
        path.unlink(missing_ok=True)


def _open(compiler: str, flags: list[str]) -> ctypes.CDLL:
    path = _build(compiler, flags)  # checked against its build record (native_cache)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:  # a recorded build the loader still refuses: build it again, once
        native_cache.discard(path)
        lib = ctypes.CDLL(str(_build(compiler, flags)))
    if not hasattr(lib, "randmask_sddmm"):  # never randmask's own build: drop it (the next process builds anew)
        native_cache.discard(path)
        raise RuntimeError(f"{path} does not export randmask_sddmm")
    return lib


def _path_flags() -> list[str]:
    """The defines for the path ``RANDMASK_NATIVE_PATH`` asks for (unset: ``auto``)."""
    choice = os.environ.get(PATH_ENV, "").strip().lower() or "auto"
    if choice not in PATH_DEFINES:
        raise MaskingError(f"{PATH_ENV}={os.environ[PATH_ENV]!r} is not a native kernel path; use one of "
                           f"{', '.join(PATH_DEFINES)} (or unset it)")
    return PATH_DEFINES[choice]


def _declare_path(lib: ctypes.CDLL) -> None:
    """Declare ``randmask_sddmm_path`` and warn when a forced path did not build (a CPU or compiler without it)."""
    lib.randmask_sddmm_path.argtypes = []
    lib.randmask_sddmm_path.restype = ctypes.c_char_p
    asked = os.environ.get(PATH_ENV, "").strip().lower() or "auto"
    built = lib.randmask_sddmm_path().decode()
    if asked != "auto" and built != asked:
        warn_caller(f"randmask: {PATH_ENV}={asked} asked for the {asked} SDDMM path, but this CPU and compiler "
                    f"built the {built} one", RuntimeWarning)


def compiled_path() -> str | None:
    """The vector path the loaded kernel was compiled with: ``avx512``, ``avx2``, ``portable``; None without one."""
    if not available():
        return None
    assert _library is not None
    return _library.randmask_sddmm_path().decode()


def _load() -> ctypes.CDLL | None:
    global _library, _tried
    path_flags = _path_flags()  # before _tried: a bad value fails every call, not just the first
    with _lock:
        if _tried:
            return _library
        _tried = True
        compiler = _compiler()
        if compiler is None:
            if os.environ.get("CC"):  # asked for by name: say it is missing (no compiler at all is quiet)
                warn_caller(f"randmask: CC={os.environ['CC']!r} is not an executable; the native SDDMM kernel "
                            "is not built, the torch path runs. Point CC at a C compiler.", RuntimeWarning)
            return None
        errors = []
        # OpenMP on this CPU's instructions, then pthreads, then plain -O3 (a compiler that knows neither
        # OpenMP nor -march=native still gets the kernel).
        for flags in ([*FLAGS, *OPENMP_FLAGS, *path_flags], [*FLAGS, *path_flags], [*BASE_FLAGS, *path_flags]):
            try:
                lib = _open(compiler, flags)
                break
            except (OSError, RuntimeError) as err:
                errors.append(str(err))
        else:
            warn_caller(f"randmask: the native SDDMM kernel did not build ({errors[0]}); using the torch path. "
                        f"Set {DISABLE_ENV}=0 to skip the attempt.", RuntimeWarning)
            return None
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.randmask_sddmm.argtypes = [p, i64, i32, p, i64, p, i64, i32, p, i64, i64, p, p, i64, p, i32]
        lib.randmask_sddmm.restype = ctypes.c_int
        _declare_path(lib)
        _library = lib
        return lib


def available() -> bool:
    """Whether the kernel is built and enabled (builds it on the first call)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return False
    return _load() is not None


def supports(t: torch.Tensor) -> bool:
    """Whether the kernel can read ``t`` as an operand: a CPU fp32/bf16 matrix with unit column stride."""
    return t.device.type == "cpu" and t.dim() == 2 and t.dtype in (torch.float32, torch.bfloat16) \
        and (t.stride(1) == 1 or t.shape[1] <= 1)


def _check_csr(crow: torch.Tensor, col: torch.Tensor, n_rhs: int,
               features: tuple[tuple[torch.Tensor | None, int], ...]) -> None:
    if crow.numel() < 1 or int(crow[0]) != 0 or int(crow[-1]) != col.numel() or bool((crow[1:] < crow[:-1]).any()):
        raise ValueError("sddmm_csr: crow must rise from 0 to len(col)")
    for index, bound in ((col, n_rhs), *features):
        if index is not None and index.numel() and (int(index.min()) < 0 or int(index.max()) >= bound):
            raise ValueError("sddmm_csr: an index lies outside its operand")


def sddmm_csr(lhs: torch.Tensor, lhs_features: torch.Tensor | None, rhs: torch.Tensor,
              rhs_features: torch.Tensor | None, crow: torch.Tensor, col: torch.Tensor,
              check_invariants: bool = True) -> torch.Tensor:
    """``out[e] = sum_t lhs[t, lhs_features[r]] * rhs[t, rhs_features[col[e]]]`` for entry e of CSR row r.

    Args:
        lhs, rhs: (T, F) activations (see :func:`supports`), read in place.
        lhs_features, rhs_features: int64 feature ids the CSR rows / columns stand for (None: all).
        crow, col: int32 CSR structure over (len(lhs_features), len(rhs_features)).
        check_invariants: check every index (O(nnz)) before the C code reads it; pass False only for
            structures built by randmask itself (``SparsePattern.plan``), as torch's sparse tensors do.

    Returns:
        (nnz,) float32, in CSR order.
    """
    lib = _load()
    if lib is None:
        raise RuntimeError("the native SDDMM kernel is not available; check native.available() first")
    if not (supports(lhs) and supports(rhs)) or lhs.shape[0] != rhs.shape[0]:
        raise ValueError("sddmm_csr: lhs and rhs must be CPU fp32/bf16 (T, F) matrices with the same T")
    if crow.dtype != torch.int32 or col.dtype != torch.int32:
        raise ValueError("sddmm_csr: crow and col must be int32")
    if any(f is not None and (f.is_floating_point() or f.is_complex() or f.dim() != 1)
           for f in (lhs_features, rhs_features)):
        raise ValueError("sddmm_csr: lhs_features and rhs_features must be 1-D integer tensors (or None)")
    feats = [None if f is None else f.to(torch.int64).contiguous() for f in (lhs_features, rhs_features)]
    crow, col = crow.contiguous(), col.contiguous()
    n_lhs = crow.numel() - 1
    n_rhs = rhs.shape[1] if feats[1] is None else feats[1].numel()
    if n_lhs != (lhs.shape[1] if feats[0] is None else feats[0].numel()):
        raise ValueError("sddmm_csr: crow has one row per lhs feature")
    if check_invariants:  # the C code trusts every index: a bad CSR must be an error, not a stray read
        _check_csr(crow, col, n_rhs, ((feats[0], lhs.shape[1]), (feats[1], rhs.shape[1])))
    out = torch.empty(col.numel(), dtype=torch.float32)

    def ptr(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    status = lib.randmask_sddmm(
        ptr(lhs), lhs.stride(0), int(lhs.dtype == torch.bfloat16), ptr(feats[0]), n_lhs,
        ptr(rhs), rhs.stride(0), int(rhs.dtype == torch.bfloat16), ptr(feats[1]), n_rhs,
        lhs.shape[0], ptr(crow), ptr(col), col.numel(), ptr(out), torch.get_num_threads())
    if status != 0:
        raise MemoryError("the native SDDMM kernel ran out of memory for its token-block buffers")
    return out


__all__ = ["DISABLE_ENV", "PATH_ENV", "available", "compiled_path", "sddmm_csr", "supports"]
