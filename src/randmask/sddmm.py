"""The masked weight gradient: a sampled dense-dense product (SDDMM) at the kept entries, by several paths.

    grad_values[k] = sum_t g[t, o_k] * x[t, i_k]      (g = dL/dy: (T, out), x: (T, in))

``sddmm`` picks a path per call (``weight_gradient_path``): the native CPU kernel or the Triton kernel where
``randmask.kernels`` chooses them, else a torch path by size and density (gather, compact ``sampled_addmm``, or
dense gᵀx then a gather). Every path sums in fp32 (fp64 for fp64 inputs) and returns the values in the pattern's
stored order; each is tested against the fp64 dense gᵀx (``tests/randmask/test_sddmm.py``).
"""

from __future__ import annotations

import warnings

import torch

from randmask import native
from randmask.kernels import NATIVE_DTYPES, TRITON_DTYPES, kernel_setting, triton_kernel, weight_gradient_kernel
from randmask.pattern import CsrPlan, SparsePattern, index_dtype

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
# Which kernel runs: randmask.kernels.weight_gradient_kernel (RANDMASK_KERNEL=auto|native|triton|torch).
GATHER_MAX_NNZ = 64
DENSE_GRAD_CROSSOVER = 0.06
NATIVE_DENSE_CROSSOVER = 0.3  # the dense crossover when the native kernel runs instead of compact
COMPACT_CHUNK_BYTES = 4 << 20  # the compact path copies its larger operand in blocks of at most this
GATHER_CHUNK_ELEMENTS = 1 << 22  # bound the gather path's (tokens x nnz) temporaries to ~16 MB each
TRITON_DENSE_CROSSOVER = 0.3  # not measured yet (see the table above)


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
        return sddmm_native(grad_out_2d, x_2d, pattern)
    if path == "triton":
        return sddmm_triton(grad_out_2d, x_2d, pattern)
    if path == "gather":
        return sddmm_gather(grad_out_2d, x_2d, pattern, compute)
    if path == "dense":
        return sddmm_dense(grad_out_2d, x_2d, pattern, compute)
    return sddmm_compact(grad_out_2d, x_2d, pattern, compute)


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


def sddmm_dense(grad_out_2d: torch.Tensor, x_2d: torch.Tensor, pattern: SparsePattern,
                compute: torch.dtype) -> torch.Tensor:
    """The dense gᵀx in ``compute``, then the kept entries: O(out * in) memory, fastest at high densities."""
    # Stored-weight gradient = a @ b: (out, T) @ (T, in) for Linear, (in, T) @ (T, out) for Conv1D.
    a, b = (x_2d.t(), grad_out_2d) if pattern.transposed else (grad_out_2d.t(), x_2d)
    return (a.to(compute) @ b.to(compute)).reshape(-1)[pattern.indices]


def _to_stored_order(values: torch.Tensor, plan: CsrPlan) -> torch.Tensor:
    """Values in the plan's CSR order -> the pattern's stored order."""
    if plan.order is None:
        return values
    out = torch.empty_like(values)
    out[plan.order] = values  # index_copy_ would need an int64 index
    return out


def sddmm_native(grad_out_2d: torch.Tensor, x_2d: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """The compiled kernel on the plan's CSR: reads g and x where they lie, no tokens-last copies."""
    plan = pattern.plan()
    lhs_2d, rhs_2d = (grad_out_2d, x_2d) if plan.lhs_is_out else (x_2d, grad_out_2d)
    values = native.sddmm_csr(lhs_2d, plan.lhs_touched, rhs_2d, plan.rhs_touched, plan.crow, plan.col,
                              check_invariants=False)  # the plan is ours
    return _to_stored_order(values, plan)


def sddmm_triton(grad_out_2d: torch.Tensor, x_2d: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """The Triton kernel on the plan's CSR (tokens-last copies of the touched features, in the input dtype)."""
    plan = pattern.plan()
    lhs_2d, rhs_2d = (grad_out_2d, x_2d) if plan.lhs_is_out else (x_2d, grad_out_2d)
    values = triton_kernel(required=True).sddmm_csr(lhs_2d, plan.lhs_touched, rhs_2d, plan.rhs_touched, plan.crow,
                                              plan.col, plan_key=plan)
    return _to_stored_order(values, plan)


def sddmm_compact(grad_out_2d: torch.Tensor, x_2d: torch.Tensor, pattern: SparsePattern,
                  compute: torch.dtype) -> torch.Tensor:
    """``torch.sparse.sampled_addmm`` on the plan's CSR, over tokens-last copies of the touched features only."""
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
        max(1, COMPACT_CHUNK_BYTES // (max(1, lhs_2d.shape[0]) * torch.finfo(compute).bits // 8))
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


def sddmm_gather(grad_out_2d: torch.Tensor, x_2d: torch.Tensor, pattern: SparsePattern,
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


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the sparse kernels accumulate in: fp64 for fp64 input, fp32 for everything else (CPU sampled_addmm
    and MKL's CSR SpMM have no bf16/fp16 kernel in torch 2.13, and bf16 sums would lose small gradients)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


__all__ = [
    "COMPACT_CHUNK_BYTES",
    "DENSE_GRAD_CROSSOVER",
    "GATHER_CHUNK_ELEMENTS",
    "GATHER_MAX_NNZ",
    "NATIVE_DENSE_CROSSOVER",
    "TRITON_DENSE_CROSSOVER",
    "compute_dtype",
    "sddmm",
    "sddmm_compact",
    "sddmm_dense",
    "sddmm_differentiable",
    "sddmm_gather",
    "sddmm_native",
    "sddmm_triton",
    "weight_gradient_path",
]
