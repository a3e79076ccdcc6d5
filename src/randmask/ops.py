"""The masked linear op: dense forward, sparse weight gradient (SDDMM).

The trained entries live inside the frozen weight W, so the forward pass is the
unmodified dense layer. The backward returns

    dL/dx      = dL/dy @ W                      (dense: needed anyway)
    dL/dvalues = sddmm(dL/dy^T, x) at the mask  (grad_values[k] = sum_t g[t, o_k] * x[t, i_k])

and never forms the dense dL/dW = g^T x. ``o_k``/``i_k`` are the output/input
feature of kept entry k. The backward is itself differentiable (for Hessian-vector
products): with ``create_graph=True`` it switches to plain differentiable ops.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from types import ModuleType

import torch
import torch.nn.functional as F

from randmask import native
from randmask.config import MaskingError
from randmask.warn import warn_caller

# Path choice for the weight gradient (benchmarks/sddmm_crossover.py; CPU, 2 threads, 1024 tokens, OPT-125m
# shapes, on a shared machine, so only the larger differences count):
#   native:  the compiled kernel (randmask.native), where it builds, for CPU fp32/bf16 inputs: reads g and x
#            in place in token blocks. 0.005-0.02x dense up to 0.1% density, 0.04-0.06x at 1%, 4-7x
#            faster than compact there and faster than gather at every size; 0.3-0.8x dense at 20%,
#            0.6-1.3x at 40%. Otherwise:
#   gather:  gathers the kept entries' columns of g and x (O(tokens * nnz) temporaries): as cheap as
#            anything for a few dozen entries, 5-10x slower than dense g^T x at 1% density.
#   compact: copies only the touched rows/columns of g and x tokens-last, in fp32, then calls
#            torch.sparse.sampled_addmm, whose CPU kernel is then a vectorised dot per kept entry
#            (handed the raw (T, features) activations it makes those transposed copies itself, of
#            every row and column). 0.1-0.5x dense up to 1% density, beats dense up to 3% everywhere
#            and up to 10% on two of the three shapes; dense wins at 20%.
#   dense:   g^T x, then gather the kept entries.
#   triton:  randmask.triton_sddmm (extra randmask[gpu]), for CUDA fp32/bf16/fp16 inputs: the plan's CSR, one
#            program per (lhs row, up to 64 of its entries). Not measured on a GPU yet (benchmarks/gpu/run.sh
#            measures it): its dense crossover below is the native kernel's, a placeholder.
# Which kernel runs: weight_gradient_kernel (RANDMASK_KERNEL=auto|native|triton|torch).
GATHER_MAX_NNZ = 64
DENSE_GRAD_CROSSOVER = 0.06
NATIVE_DENSE_CROSSOVER = 0.3  # the dense crossover when the native kernel runs instead of compact
COMPACT_MAX_FRACTION = 0.8  # gather only the touched rows/columns when at most this fraction is touched
# The native kernel transposes whole 16-feature tiles in registers but gathers touched features one by
# one, and activations read from DRAM cost whole lines either way: at 0.1% (55% touched) all features
# ran 1.0-1.6x faster, at 0.01% (9% touched) alike (cold caches, OPT-125m shapes, 1024 tokens).
NATIVE_COMPACT_MAX_FRACTION = 0.25
COMPACT_CHUNK_BYTES = 4 << 20  # the compact path copies its larger operand in blocks of at most this
GATHER_CHUNK_ELEMENTS = 1 << 22  # bound the gather path's (tokens x nnz) temporaries to ~16 MB each
TRITON_DENSE_CROSSOVER = 0.3  # not measured yet (see the table above)

KERNEL_ENV = "RANDMASK_KERNEL"
KERNELS = ("auto", "native", "triton", "torch")
NATIVE_DTYPES = (torch.float32, torch.bfloat16)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


INT32_INDEX_LIMIT = 2 ** 31
"""Index tensors whose values all lie below this are kept int32 (half of int64's bytes per entry); int64 otherwise."""


def index_dtype(largest: int, *, smallest: torch.dtype = torch.int32) -> torch.dtype:
    """The narrowest integer dtype from ``smallest`` up (int16, int32, int64) that holds every value to ``largest``.

    The one rule for every index randmask keeps per entry (adapter positions, CSR layouts, gathered tables). int32 is
    the default floor: MKL's and cuSPARSE's CSR take it as it is; int16 suits only tables widened per use.
    """
    if smallest == torch.int16 and largest <= torch.iinfo(torch.int16).max:
        return torch.int16
    return torch.int32 if largest < INT32_INDEX_LIMIT else torch.int64


@dataclass(eq=False)
class _Plan:
    """The kept entries laid out for the compact SDDMM (built once per pattern and device).

    Entries are ordered as a CSR over ``lhs`` (output features when ``lhs_is_out``, else input
    features), with rows/columns renumbered to the touched ones only. Memory per kept entry: a
    4-byte CSR column and, only when the CSR order differs from the stored order, a 4-byte
    position; the CSR tensors are made per call (sampled_addmm only reads their structure).
    """

    lhs_is_out: bool
    lhs_touched: torch.Tensor | None  # touched lhs features (None: all of them)
    rhs_touched: torch.Tensor | None
    crow: torch.Tensor  # (n_lhs + 1,) CSR row pointers
    col: torch.Tensor  # (nnz,) CSR column (renumbered rhs feature) of each entry
    size: tuple[int, int]  # (n_lhs, n_rhs)
    order: torch.Tensor | None  # entry k of the CSR is kept entry order[k] (None: same order)
    # The compact path's block edges per block size, read back once: on CUDA a .tolist() per call is a host sync.
    edges: dict[int, list[int]] = field(default_factory=dict)


def logical_shape(stored_shape: tuple[int, int], transposed: bool) -> tuple[int, int]:
    """(out_features, in_features) of a weight stored as ``stored_shape``: (in, out) when ``transposed`` (Conv1D)."""
    rows, cols = stored_shape
    return (cols, rows) if transposed else (rows, cols)


@dataclass(eq=False)
class SparsePattern:
    """The kept entries of one stored weight tensor, in the forms the backward needs.

    ``indices`` are sorted flat row-major indices into the *stored* weight of shape
    ``shape`` (``(out, in)`` for ``nn.Linear``; ``(in, out)`` for GPT-2's ``Conv1D``,
    where ``transposed=True``). Row and column of each entry are computed when asked for,
    not stored: at 1% of every linear layer they would cost 16 bytes per entry for the
    whole run, while only the small-nnz and double-backward paths read them.
    """

    indices: torch.Tensor
    shape: tuple[int, int]
    transposed: bool = False
    _plan: _Plan | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        # A bool mask passed as ``indices`` would index by 0/1 and train the wrong entries without an error.
        if self.indices.dim() != 1 or self.indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"SparsePattern.indices must be a 1-D int32/int64 tensor of flat indices, got "
                            f"{self.indices.dim()}-D {self.indices.dtype}; for a bool mask pass "
                            "mask.flatten().nonzero().squeeze(1)")

    @property
    def rows(self) -> torch.Tensor:
        """Stored-weight row of each kept entry (computed, O(nnz))."""
        return torch.div(self.indices, self.shape[1], rounding_mode="floor")

    @property
    def cols(self) -> torch.Tensor:
        """Stored-weight column of each kept entry (computed, O(nnz))."""
        return self.indices % self.shape[1]

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    @property
    def density(self) -> float:
        return self.nnz / (self.shape[0] * self.shape[1])

    @property
    def out_index(self) -> torch.Tensor:
        """Output feature of each kept entry."""
        return self.cols if self.transposed else self.rows

    @property
    def in_index(self) -> torch.Tensor:
        """Input feature of each kept entry."""
        return self.rows if self.transposed else self.cols

    @property
    def logical_shape(self) -> tuple[int, int]:
        """(out_features, in_features)."""
        return logical_shape(self.shape, self.transposed)

    def to(self, device: torch.device) -> SparsePattern:
        """A copy on ``device`` (no-op if already there)."""
        if self.indices.device == torch.device(device):
            return self
        return SparsePattern(self.indices.to(device), self.shape, self.transposed)

    def plan(self) -> _Plan:
        """The compact-SDDMM layout (cached)."""
        if self._plan is None:
            self._plan = _make_plan(self)
        return self._plan


def _touched(index: torch.Tensor, size: int, max_fraction: float
             ) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """(touched features or None for all, each entry's renumbered feature, number of touched)."""
    used = torch.zeros(size, dtype=torch.bool, device=index.device)
    used[index] = True
    n_used = int(used.sum())
    if n_used > max_fraction * size:  # copying all is cheaper than an index_select
        return None, index, size
    touched = used.nonzero().squeeze(1)
    renumber = torch.cumsum(used, 0) - 1  # feature -> its rank among the touched ones
    return touched, renumber[index], n_used


def _make_plan(pattern: SparsePattern) -> _Plan:
    out_f, in_f = pattern.logical_shape
    native_reads = pattern.indices.device.type == "cpu" and native.available()
    fraction = NATIVE_COMPACT_MAX_FRACTION if native_reads else COMPACT_MAX_FRACTION
    out_touched, out_new, n_out = _touched(pattern.out_index, out_f, fraction)
    in_touched, in_new, n_in = _touched(pattern.in_index, in_f, fraction)
    # The kernel reads its lhs rows in order and its rhs rows at random: put the smaller operand on
    # the rhs so that it stays in cache (for fc2, 768 outputs x 3072 inputs, that is g^T).
    lhs_is_out = n_out >= n_in
    lhs, rhs, n_lhs, n_rhs = (out_new, in_new, n_out, n_in) if lhs_is_out else (in_new, out_new, n_in, n_out)
    key = lhs * n_rhs + rhs
    # The kept entries' own order is row-major in the stored weight; the CSR needs (lhs, rhs) order.
    in_order = bool((key[1:] > key[:-1]).all()) if key.numel() > 1 else True
    order = None if in_order else torch.argsort(key)
    del key
    if order is not None:
        lhs, rhs = lhs[order], rhs[order]
    index = index_dtype(max(pattern.nnz, n_rhs))
    counts = torch.bincount(lhs, minlength=n_lhs)
    crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(index)
    return _Plan(lhs_is_out, out_touched if lhs_is_out else in_touched,
                 in_touched if lhs_is_out else out_touched, crow, rhs.to(index), (n_lhs, n_rhs),
                 None if order is None else order.to(index_dtype(pattern.nnz)))


def _tokens_last(m2d: torch.Tensor, touched: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(T, F) -> (F', T) contiguous in ``dtype``, F' = the touched features only.

    One allocation, cast and transpose in one copy: a bf16 input never has a bf16 transposed copy
    alive beside the fp32 one (that was 1.5x the fp32 size at the backward's memory peak).
    """
    if touched is not None:
        m2d = m2d.index_select(1, touched)
    return torch.empty((m2d.shape[1], m2d.shape[0]), dtype=dtype, device=m2d.device).copy_(m2d.t())


def sddmm(grad_out_2d: torch.Tensor, x_2d: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """Sampled dense-dense product: the weight gradient at the kept entries, (nnz,) float32.

    Args:
        grad_out_2d: (T, out) gradient of the layer output.
        x_2d: (T, in) layer input.
    """
    # Accumulate in fp32 (fp64 for fp64 inputs): CPU sampled_addmm has no bf16/fp16 kernel (torch 2.13),
    # and bf16 products summed over thousands of tokens would lose the small gradients we train on.
    compute = compute_dtype(grad_out_2d)
    path = weight_gradient_path(grad_out_2d, x_2d, pattern)
    if path == "empty":
        return grad_out_2d.new_zeros(0, dtype=compute)
    if path == "native":
        return _sddmm_native(grad_out_2d, x_2d, pattern)
    if path == "triton":
        return _sddmm_triton(grad_out_2d, x_2d, pattern)
    if path == "gather":
        return _sddmm_gather_chunked(grad_out_2d, x_2d, pattern, compute)
    if path == "dense":
        return _sddmm_dense(grad_out_2d, x_2d, pattern, compute)
    return _sddmm_compact(grad_out_2d, x_2d, pattern, compute)


def weight_gradient_path(grad_out_2d: torch.Tensor, x_2d: torch.Tensor, pattern: SparsePattern) -> str:
    """The weight-gradient path ``sddmm`` takes: empty, native, triton, gather, dense or compact (see the table
    above). A kernel forced with ``RANDMASK_KERNEL`` runs at every density; ``auto`` switches to dense above it."""
    if pattern.nnz == 0:
        return "empty"
    kernel = weight_gradient_kernel(grad_out_2d.device, grad_out_2d.dtype)
    forced = kernel_setting() == kernel
    # The native kernel takes int32 CSRs only; the plan's indices reach nnz and the features at most.
    int32_plan = index_dtype(max(pattern.nnz, *pattern.shape)) == torch.int32
    if kernel == "native" and x_2d.dtype in NATIVE_DTYPES and int32_plan \
            and native.supports(grad_out_2d) and native.supports(x_2d):
        return "native" if forced or pattern.density <= NATIVE_DENSE_CROSSOVER else "dense"
    if kernel == "triton" and x_2d.dtype in TRITON_DTYPES:
        return "triton" if forced or pattern.density <= TRITON_DENSE_CROSSOVER else "dense"
    if pattern.nnz <= GATHER_MAX_NNZ:
        return "gather"
    return "dense" if pattern.density > DENSE_GRAD_CROSSOVER else "compact"


def kernel_setting() -> str:
    """``$RANDMASK_KERNEL`` (auto when unset); ``RANDMASK_NATIVE=0``, the older switch, means ``torch``."""
    value = os.environ.get(KERNEL_ENV, "").strip().lower() or "auto"
    if value not in KERNELS:
        raise MaskingError(f"{KERNEL_ENV}={os.environ[KERNEL_ENV]!r} is not a kernel; use one of {', '.join(KERNELS)}.")
    if os.environ.get(native.DISABLE_ENV) == "0":
        if value not in ("auto", "torch"):
            raise MaskingError(f"{KERNEL_ENV}={value} contradicts {native.DISABLE_ENV}=0 (an alias of "
                               f"{KERNEL_ENV}=torch); unset one of them.")
        return "torch"
    return value


def weight_gradient_kernel(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """The SDDMM kernel the backward runs for work on ``device`` in ``dtype``: "native" (randmask.native, CPU
    fp32/bf16), "triton" (randmask.triton_sddmm, CUDA fp32/bf16/fp16) or "torch" (the torch paths).

    The one place the kernel is chosen. ``RANDMASK_KERNEL=auto`` (default) takes native on the CPU where it builds
    and triton on CUDA where it is installed, else torch; ``native``/``triton``/``torch`` force one, and a forced
    kernel that cannot run here is a MaskingError, never a quiet fallback. Work in a dtype the kernel does not
    take (fp64; fp16 for native) runs the torch paths.
    """
    setting = kernel_setting()
    kind = torch.device(device).type
    if setting == "torch":
        return "torch"
    if setting == "native" or (setting == "auto" and kind == "cpu"):
        if kind != "cpu":
            raise MaskingError(f"{KERNEL_ENV}=native: the native kernel runs on CPU tensors, this work is on {kind}. "
                               f"Use {KERNEL_ENV}=auto or triton.")
        if dtype not in NATIVE_DTYPES:
            return "torch"
        if native.available():
            return "native"
        if setting == "native":
            raise MaskingError(f"{KERNEL_ENV}=native but the native kernel did not build here (no C compiler, or "
                               f"a build error warned about above). Use {KERNEL_ENV}=auto.")
        return "torch"
    if setting == "auto" and kind != "cuda":
        return "torch"
    # triton: forced, or auto on CUDA
    if dtype not in TRITON_DTYPES:
        return "torch"
    if setting == "triton":
        if kind == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "on"):
            raise MaskingError(f"{KERNEL_ENV}=triton: Triton runs CUDA tensors; on CPU tensors only under "
                               f"TRITON_INTERPRET=1 (slow: for tests). Use a CUDA device or {KERNEL_ENV}=auto.")
        if kind not in ("cpu", "cuda"):
            raise MaskingError(f"{KERNEL_ENV}=triton: Triton runs CUDA tensors, this work is on {kind}.")
        _triton(required=True)
        return "triton"
    return "triton" if _triton(required=False) is not None else "torch"


_TRITON: list[ModuleType | None] = []  # [module or None] once tried


def _triton(required: bool) -> ModuleType | None:
    """randmask.triton_sddmm, imported on first use (None when triton is missing, unless ``required``)."""
    if not _TRITON:
        module = None
        if importlib.util.find_spec("triton") is not None:
            try:
                module = importlib.import_module("randmask.triton_sddmm")
            except (ImportError, RuntimeError) as err:  # a triton that does not load here (driver, version)
                warn_caller(f"randmask: triton is installed but does not load ({err}); the torch paths run. "
                            f"Set {KERNEL_ENV}=torch to skip the attempt.", RuntimeWarning)
        _TRITON.append(module)
    if _TRITON[0] is None and required:
        raise MaskingError(f"{KERNEL_ENV}=triton but triton is not installed (or did not load): pip install "
                           "'randmask[gpu]'.")
    return _TRITON[0]


def _sddmm_dense(grad_out_2d: torch.Tensor, x_2d: torch.Tensor, pattern: SparsePattern,
                 compute: torch.dtype) -> torch.Tensor:
    # Stored-weight gradient = a @ b: (out, T) @ (T, in) for Linear, (in, T) @ (T, out) for Conv1D.
    a, b = (x_2d.t(), grad_out_2d) if pattern.transposed else (grad_out_2d.t(), x_2d)
    return (a.to(compute) @ b.to(compute)).reshape(-1)[pattern.indices]


def _to_stored_order(values: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Values in the plan's CSR order -> the pattern's stored order."""
    if plan.order is None:
        return values
    out = torch.empty_like(values)
    out[plan.order] = values  # index_copy_ would need an int64 index
    return out


def _sddmm_native(grad_out_2d: torch.Tensor, x_2d: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """The compiled kernel on the plan's CSR: reads g and x where they lie, no tokens-last copies."""
    plan = pattern.plan()
    lhs_2d, rhs_2d = (grad_out_2d, x_2d) if plan.lhs_is_out else (x_2d, grad_out_2d)
    values = native.sddmm_csr(lhs_2d, plan.lhs_touched, rhs_2d, plan.rhs_touched, plan.crow, plan.col,
                              check_invariants=False)  # the plan is ours
    return _to_stored_order(values, plan)


def _sddmm_triton(grad_out_2d: torch.Tensor, x_2d: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """The Triton kernel on the plan's CSR (tokens-last copies of the touched features, in the input dtype)."""
    plan = pattern.plan()
    lhs_2d, rhs_2d = (grad_out_2d, x_2d) if plan.lhs_is_out else (x_2d, grad_out_2d)
    values = _triton(required=True).sddmm_csr(lhs_2d, plan.lhs_touched, rhs_2d, plan.rhs_touched, plan.crow,
                                              plan.col, plan_key=plan)
    return _to_stored_order(values, plan)


def _sddmm_compact(grad_out_2d: torch.Tensor, x_2d: torch.Tensor, pattern: SparsePattern,
                   compute: torch.dtype) -> torch.Tensor:
    plan = pattern.plan()
    lhs_2d, rhs_2d = (grad_out_2d, x_2d) if plan.lhs_is_out else (x_2d, grad_out_2d)
    rhs = _tokens_last(rhs_2d, plan.rhs_touched, compute)  # (n_rhs, T), the smaller operand
    n_lhs, n_rhs = plan.size
    # Half inputs: the lhs copy goes in row blocks of at most COMPACT_CHUNK_BYTES. It is made at the
    # backward's memory peak (the first layers back still hold every activation), and whole it is
    # twice the bf16 activation (fp32 (features x tokens), 12.6 MB for an OPT-125m fc1 at 1024 tokens).
    # fp32 inputs copy it whole: blocks cost them ~35% of this op (strided column reads) and the
    # copy is no larger than the activation (measured with benchmarks/bench_memory.py).
    step = n_lhs if lhs_2d.dtype == compute else \
        max(1, COMPACT_CHUNK_BYTES // (lhs_2d.shape[0] * torch.finfo(compute).bits // 8))
    starts = list(range(0, n_lhs, step))
    edges = plan.edges.get(step)
    if edges is None:  # the entries of block b are edges[b]:edges[b + 1]
        edges = plan.edges[step] = plan.crow[starts + [n_lhs]].tolist()
    values = torch.empty(pattern.nnz, dtype=compute, device=grad_out_2d.device)
    for b, r0 in enumerate(starts):
        r1, e0, e1 = min(n_lhs, r0 + step), edges[b], edges[b + 1]
        if e0 == e1:
            continue
        if plan.lhs_touched is not None:
            lhs = _tokens_last(lhs_2d, plan.lhs_touched[r0:r1], compute)  # (r1 - r0, T)
        else:
            lhs = _tokens_last(lhs_2d[:, r0:r1], None, compute)
        with warnings.catch_warnings():  # "CSR support is in beta": we only use sampled_addmm
            warnings.simplefilter("ignore", UserWarning)
            csr = torch.sparse_csr_tensor(plan.crow[r0:r1 + 1] - e0, plan.col[e0:e1],
                                          values.new_zeros(e1 - e0), size=(r1 - r0, n_rhs), check_invariants=False)
        # lhs @ rhs^T at the CSR entries: rhs.t() is a view, so the kernel's own rhs^T copy is a no-op.
        values[e0:e1] = torch.sparse.sampled_addmm(csr, lhs, rhs.t(), beta=0.0, alpha=1.0).values()
    return _to_stored_order(values, plan)


def _sddmm_gather_chunked(grad_out_2d: torch.Tensor, x_2d: torch.Tensor, pattern: SparsePattern,
                          compute: torch.dtype) -> torch.Tensor:
    """Gather the kept entries' columns, cast to ``compute``, multiply, sum over tokens; in token chunks
    so the (tokens x nnz) temporaries stay small. Casting after the gather: bf16 -> fp32 on nnz columns only."""
    out_idx, in_idx = pattern.out_index, pattern.in_index
    chunk = max(1, GATHER_CHUNK_ELEMENTS // max(1, pattern.nnz))
    out = torch.zeros(pattern.nnz, dtype=compute, device=grad_out_2d.device)
    for start in range(0, grad_out_2d.shape[0], chunk):
        g = grad_out_2d[start:start + chunk, out_idx].to(compute)  # (chunk, nnz)
        x = x_2d[start:start + chunk, in_idx].to(compute)
        out += (g * x).sum(0)
    return out


def sddmm_differentiable(
    grad_out_2d: torch.Tensor, x_2d: torch.Tensor, pattern: SparsePattern
) -> torch.Tensor:
    """Same as ``sddmm`` with plain differentiable ops (memory O(T * nnz)); for double backward."""
    # (T, nnz) * (T, nnz) summed over tokens.
    return (grad_out_2d[:, pattern.out_index] * x_2d[:, pattern.in_index]).sum(0)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """The layer's dense product with the stored weight: ``F.linear`` (W: (out, in)), or ``x @ W + b`` when
    ``transposed`` (GPT-2's Conv1D, W: (in, out))."""
    if transposed:  # Conv1D: y = x @ W + b with W of shape (in, out)
        y = x @ weight
        return y + bias if bias is not None else y
    return F.linear(x, weight, bias)


class _LastCast(threading.local):
    """The last autocast cast of a layer input: q, k and v read one hidden-state tensor, and each
    saves its cast for the backward's SDDMM, so sharing the cast saves two of three copies."""

    source: weakref.ref | None = None
    version: int = -1
    cast: torch.Tensor | None = None


_LAST_CAST = _LastCast()


def _cast_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, reusing the previous call's result when it cast this same, unmodified tensor."""
    if x.dtype == dtype:
        return x
    last = _LAST_CAST
    if last.source is not None and last.source() is x and last.version == x._version \
            and last.cast is not None and last.cast.dtype == dtype:
        return last.cast
    cast = x.to(dtype)
    last.source, last.version, last.cast = weakref.ref(x), x._version, cast
    return cast


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the sparse kernels accumulate in: fp64 for fp64 input, fp32 for everything else (CPU sampled_addmm
    and MKL's CSR SpMM have no bf16/fp16 kernel in torch 2.13, and bf16 sums would lose small gradients)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a matmul on ``x`` in, or None when autocast is off (or ``x`` is not float)."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


class MaskedLinearFunction(torch.autograd.Function):
    """y = linear(x, W, b) where W already holds W0 + delta at the kept entries.

    ``values`` (the delta) is an input only so that autograd routes its gradient;
    the caller keeps W in sync with it (see ``randmask.layer``).
    """

    @staticmethod
    def forward(ctx, x, values, weight, bias, pattern: SparsePattern, refresh=None):  # noqa: D102
        cast = autocast_dtype(x)
        ctx.input_dtype = x.dtype
        with torch.autocast(x.device.type, enabled=False):
            if cast is not None:  # autocast: run the matmul in the autocast dtype like nn.Linear
                x, weight = _cast_input(x, cast), weight.to(cast)
                bias = bias.to(cast) if bias is not None else None
            y = dense_linear(x, weight, bias, pattern.transposed)
        ctx.save_for_backward(x, values, weight, refresh)
        ctx.pattern = pattern
        return y

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, values, weight, refresh = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        if refresh is not None:  # the weight was gathered again since the forward (FSDP2): write the delta again
            with torch.no_grad():
                weight.view(-1)[pattern.indices] = refresh.to(weight.dtype)
        create_graph = torch.is_grad_enabled()  # True only under backward(create_graph=True)
        g = grad_out.to(weight.dtype)
        g2d, x2d = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = grad_values = grad_bias = None

        if ctx.needs_input_grad[0]:
            # dL/dx = g @ W (Linear, W: (out, in)) or g @ W^T (Conv1D, W: (in, out)).
            grad_x2d = g2d @ (weight.t() if pattern.transposed else weight)
            if create_graph and values.requires_grad:
                # W depends on values, so d(dL/dx)/dvalues != 0. Add a zero-valued term that
                # carries that dependence: g[:, o_k] * (values_k - values_k) into column i_k.
                tangent = values - values.detach()
                grad_x2d = grad_x2d.index_add(
                    1, pattern.in_index, g2d[:, pattern.out_index] * tangent.to(g2d.dtype)
                )
            grad_x = grad_x2d.reshape(x.shape).to(ctx.input_dtype)

        if ctx.needs_input_grad[1]:
            if create_graph:
                grad_values = sddmm_differentiable(g2d, x2d, pattern)
            else:
                grad_values = sddmm(g2d, x2d, pattern)
            grad_values = grad_values.to(values.dtype)

        if ctx.needs_input_grad[3]:
            grad_bias = g2d.sum(0)
        return grad_x, grad_values, None, grad_bias, None, None


def masked_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pattern: SparsePattern,
    refresh: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply the masked linear op. ``weight`` must already equal W0 (+) values at the kept entries.

    ``refresh``: (nnz,) entries to write into ``weight`` again before the backward reads it, for a weight that is
    gathered anew between forward and backward (FSDP2 frees it after the forward); None: the weight keeps them.
    """
    return MaskedLinearFunction.apply(x, values, weight, bias, pattern, refresh)


def scatter_delta(base_weight: torch.Tensor, values: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """Dense reference weight W0 + scatter(values), differentiable in ``values``."""
    delta = torch.zeros(base_weight.numel(), dtype=base_weight.dtype, device=base_weight.device)
    delta = delta.index_add(0, pattern.indices, values.to(base_weight.dtype))
    return base_weight + delta.view_as(base_weight)


def dense_reference_linear(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    pattern: SparsePattern,
) -> torch.Tensor:
    """Plain dense reference for tests: autograd computes the dense dL/dW, masked by the scatter."""
    return dense_linear(x, scatter_delta(base_weight, values, pattern), bias, pattern.transposed)


__all__ = [
    "COMPACT_MAX_FRACTION",
    "INT32_INDEX_LIMIT",
    "DENSE_GRAD_CROSSOVER",
    "GATHER_MAX_NNZ",
    "MaskedLinearFunction",
    "SparsePattern",
    "KERNELS",
    "KERNEL_ENV",
    "autocast_dtype",
    "compute_dtype",
    "dense_linear",
    "dense_reference_linear",
    "kernel_setting",
    "logical_shape",
    "masked_linear",
    "scatter_delta",
    "sddmm",
    "sddmm_differentiable",
    "weight_gradient_kernel",
    "weight_gradient_path",
]
