"""The delta path: ``y = base(x) + spmm(x, delta)``, for weights that cannot hold the trained entries.

The in-place path (``randmask.ops.masked_linear``) writes ``W0 + values`` into the frozen weight, so
the forward is the plain dense layer. Three needs cannot write into W: a quantized base (W is packed
4/8-bit), a mixed batch (each sample its own adapter), and a weight sharded by FSDP2 (a rank holds
only some rows). They share this op: the sparse delta D (out, in), nnz entries at the pattern's kept
positions, applied as

    y[t, o_k] += x[t, i_k] * values_k            # SpMM: (T, in) -> (T, out)

and differentiated as

    dL/dvalues = sddmm(dL/dy^T, x) at the mask   # the same kernel as the in-place path (ops.sddmm)
    dL/dx     += dL/dy @ D                       # the delta's transpose, another SpMM

Both SpMMs run as torch CSR matmuls (MKL on CPU) on a layout built once per pattern, in fp32 (fp64
for fp64 inputs: MKL's CSR kernel has no bf16/fp16 path in torch 2.13), cast back to x's dtype. Two
orientations: CSR-first, ``(D @ x^T)^T``, whose (T, out) result is a transposed view; and, on CPU for many
tokens and few entries per output row, dense-first, ``x @ D^T`` by ``torch.mm(x, csr(D^T))``, contiguous, which
spares the strided passes over (T, out) that then outweigh the product (``dense_first``).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch

from randmask.ops import autocast_dtype
from randmask.pattern import SparsePattern, index_dtype
from randmask.sddmm import compute_dtype, sddmm, sddmm_differentiable


@dataclass(eq=False)
class _Csr:
    """One orientation of the kept entries as CSR: D over output rows, or D^T over input rows."""

    crow: torch.Tensor  # (major + 1,)
    col: torch.Tensor  # (nnz,) minor feature of each entry, in CSR order
    order: torch.Tensor | None  # (nnz,) stored-order position of CSR entry k (None: the same order)


@dataclass(eq=False)
class _CsrLayout:
    """Both orientations, each built on first use: a forward without gradients (serving) needs D only."""

    d: _Csr | None = None
    t: _Csr | None = None


_LAYOUTS: weakref.WeakKeyDictionary[SparsePattern, _CsrLayout] = weakref.WeakKeyDictionary()


def _csr(major: torch.Tensor, minor: torch.Tensor, n_major: int) -> _Csr:
    """Entries sorted by (major, minor); ``order[k]`` = the stored position of entry k. int32 indices where they fit
    (MKL's and cuSPARSE's CSR take them as they are, and as fast): half the memory of a layout kept per adapter."""
    n_minor = int(minor.max()) + 1 if minor.numel() else 1
    order = torch.argsort(major * n_minor + minor)
    counts = torch.bincount(major, minlength=n_major)
    crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    # Sorted row-major indices of a Linear weight are already in D's CSR order: no gather per call then.
    same = bool(torch.equal(order, torch.arange(order.numel(), device=order.device)))
    index = index_dtype(max(major.numel(), n_major, n_minor))
    return _Csr(crow.to(index), minor[order].to(index), None if same else order.to(index))


def _layout(pattern: SparsePattern, transpose: bool) -> _Csr:
    """The pattern's CSR of D (``transpose``: of D^T), built once per pattern and orientation."""
    layout = _LAYOUTS.get(pattern)
    if layout is None or any(c is not None and c.col.device != pattern.indices.device for c in (layout.d, layout.t)):
        layout = _LAYOUTS[pattern] = _CsrLayout()
    if (layout.t if transpose else layout.d) is None:
        out_f, in_f = pattern.logical_shape
        out_idx, in_idx = pattern.out_index.long(), pattern.in_index.long()
        if transpose:
            layout.t = _csr(in_idx, out_idx, in_f)
        else:
            layout.d = _csr(out_idx, in_idx, out_f)
    return layout.t if transpose else layout.d


# Dense-first from this many output elements (T x out: the size of the strided passes it spares), up to this many
# kept entries per output row, on CPU. Measured by benchmarks/delta_orientation.py (forward SpMM + add, then the dx
# SpMM; AVX512 EPYC, 2 threads; benchmarks/results/delta_orientation.json): at T x out >= 2^21 and <= 4 entries per
# row dense-first took 0.37-0.89x the CSR-first time (0.48x for OPT's 50272-row LM head at T = 1024); at 2^19-2^21
# it was mixed (0.72-1.87x), below it 1.01-3.51x, and at 8 entries per row 0.86-5.56x: MKL's dense-first kernel is the
# slower product, worth it only where the (T, out) passes dominate.
DENSE_FIRST_MIN_OUTPUT = 1 << 21
DENSE_FIRST_MAX_PER_ROW = 4


def dense_first(dense_2d: torch.Tensor, pattern: SparsePattern) -> bool:
    """Whether ``delta_matmul`` runs ``torch.mm(dense, CSR)`` (True) or ``(CSR @ dense^T)^T`` (False) here."""
    out_f = pattern.logical_shape[0]
    return (dense_2d.device.type == "cpu" and dense_2d.shape[0] * out_f >= DENSE_FIRST_MIN_OUTPUT
            and pattern.nnz <= DENSE_FIRST_MAX_PER_ROW * out_f)


def _spmm(crow: torch.Tensor, col: torch.Tensor, vals: torch.Tensor, size: tuple[int, int],
          dense_2d: torch.Tensor, first: bool) -> torch.Tensor:
    """CSR (size[0], size[1]) times ``dense_2d`` in ``vals``' dtype: ``first``, dense_2d (T, size[0]) @ CSR, giving
    (T, size[1]); else (CSR @ dense_2d^T)^T, dense_2d (T, size[1]) giving (T, size[0])."""
    with warnings.catch_warnings():  # "CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.sparse_csr_tensor(crow, col, vals, size=size, check_invariants=False)
        dense = dense_2d.to(vals.dtype)
        return torch.mm(dense, csr) if first else torch.sparse.mm(csr, dense.t()).t()


def _in_order(values: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    return values if order is None else values.index_select(0, order)


def delta_matmul(dense_2d: torch.Tensor, values: torch.Tensor, pattern: SparsePattern,
                 transpose: bool = False) -> torch.Tensor:
    """The sparse delta D (out, in) at ``pattern``'s kept entries applied to token rows, autocast off, in fp32 (fp64
    for fp64 input): ``dense_2d @ D^T``, (T, in) -> (T, out); with ``transpose``, ``dense_2d @ D``, (T, out) -> (T, in).
    """
    out_f, in_f = pattern.logical_shape
    first = dense_first(dense_2d, pattern)
    # CSR-first: x @ D^T = (D @ x^T)^T takes D's CSR, g @ D = (D^T @ g^T)^T D^T's; dense-first the other one.
    of_transpose = transpose != first
    csr = _layout(pattern, of_transpose)
    compute = compute_dtype(dense_2d)
    # index_select, not values[order]: advanced indexing (aten::index) costs ~10x more on CPU at 10^4-10^5 entries
    with torch.autocast(dense_2d.device.type, enabled=False):
        ordered = _in_order(values.to(compute), csr.order)
        return _spmm(csr.crow, csr.col, ordered, (in_f, out_f) if of_transpose else (out_f, in_f), dense_2d, first)


def _gather_scale_add(rows: torch.Tensor, values: torch.Tensor, gather: torch.Tensor, scatter: torch.Tensor,
                      width: int) -> torch.Tensor:
    """``out[t, scatter_k] += rows[t, gather_k] * values_k``, (T, ...) -> (T, width), in plain differentiable ops:
    ``x @ D^T`` (gather the inputs, scatter into the outputs) and, mirrored, ``g @ D``."""
    contrib = rows[:, gather] * values.to(rows.dtype)  # (T, nnz)
    return rows.new_zeros(rows.shape[0], width).index_add(1, scatter, contrib)


class SparseDeltaFunction(torch.autograd.Function):
    """``spmm(x, D)``: (..., in) -> (..., out) with D the sparse delta at ``pattern``'s kept entries."""

    @staticmethod
    def forward(ctx, x, values, pattern: SparsePattern):  # noqa: D102
        out_f, in_f = pattern.logical_shape
        # Under autocast the output takes the autocast dtype, as nn.Linear's would, so that it adds to the
        # base layer's output without promoting it; the SpMM itself runs in fp32 with autocast off (it
        # would cast the dense operand to bf16, which MKL's CSR kernel lacks).
        out_dtype = autocast_dtype(x) or x.dtype
        y2d = delta_matmul(x.reshape(-1, in_f), values, pattern)  # (T, in) -> (T, out)
        ctx.save_for_backward(x, values)
        ctx.pattern = pattern
        return y2d.to(out_dtype).reshape(*x.shape[:-1], out_f)  # (..., out)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, values = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        with torch.autocast(x.device.type, enabled=False):
            if torch.is_grad_enabled():  # backward(create_graph=True): a graph for H v products (analysis)
                return SparseDeltaFunction._backward_differentiable(ctx, grad_out, x, values, pattern)
            return SparseDeltaFunction._backward(ctx, grad_out, x, values, pattern)

    @staticmethod
    def _backward(ctx, grad_out, x, values, pattern: SparsePattern):
        out_f, in_f = pattern.logical_shape
        g2d, x2d = grad_out.reshape(-1, out_f), x.reshape(-1, in_f)
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:  # dL/dx = g @ D: (T, out) -> (T, in)
            grad_x = delta_matmul(g2d, values, pattern, transpose=True).to(x.dtype).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            # The in-place path's SDDMM, whatever kernel it picks; it expects g and x in one dtype.
            grad_values = sddmm(g2d.to(x.dtype), x2d, pattern).to(values.dtype)
        return grad_x, grad_values, None

    @staticmethod
    def _backward_differentiable(ctx, grad_out, x, values, pattern: SparsePattern):
        """The same gradients in plain differentiable ops (memory O(T * nnz)), as the in-place path's double backward:
        dL/dx is bilinear in (g, values) and dL/dvalues in (g, x), and both terms carry into the second derivative."""
        out_f, in_f = pattern.logical_shape
        g2d, x2d = grad_out.reshape(-1, out_f), x.reshape(-1, in_f)
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:  # dL/dx[t, i_k] += g[t, o_k] * values_k: (T, out) -> (T, in)
            grad_x = _gather_scale_add(g2d, values, pattern.out_index, pattern.in_index, in_f)
            grad_x = grad_x.to(x.dtype).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            grad_values = sddmm_differentiable(g2d.to(x.dtype), x2d, pattern).to(values.dtype)
        return grad_x, grad_values, None


def sparse_delta(x: torch.Tensor, values: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """The sparse delta's contribution ``x @ D^T``: (..., in) -> (..., out), differentiable in x and values.

    Add it to the frozen layer's own output: ``y = base(x) + sparse_delta(x, values, pattern)``.
    ``pattern`` gives the kept entries' positions in the stored weight (Linear or Conv1D layout).
    """
    if values.shape != (pattern.nnz,):
        raise ValueError(f"sparse_delta: values has shape {tuple(values.shape)}, the pattern has {pattern.nnz} entries")
    if x.shape[-1] != pattern.logical_shape[1]:
        raise ValueError(f"sparse_delta: x has {x.shape[-1]} features, the pattern's matrix has "
                         f"{pattern.logical_shape[1]} inputs")
    return SparseDeltaFunction.apply(x, values, pattern)


def sparse_delta_reference(x: torch.Tensor, values: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """Plain differentiable ops (gather + index_add, memory O(T * nnz)): the tests' reference, and the delta under
    ``torch.func`` transforms (the fused Function has no ``setup_context``)."""
    out_f, in_f = pattern.logical_shape
    y2d = _gather_scale_add(x.reshape(-1, in_f), values, pattern.in_index, pattern.out_index, out_f)
    return y2d.reshape(*x.shape[:-1], out_f)


__all__ = ["DENSE_FIRST_MAX_PER_ROW", "DENSE_FIRST_MIN_OUTPUT", "SparseDeltaFunction", "delta_matmul", "dense_first",
           "sparse_delta", "sparse_delta_reference"]
