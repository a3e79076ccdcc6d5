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
for fp64 inputs: MKL's CSR kernel has no bf16/fp16 path in torch 2.13), cast back to x's dtype.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch

from randmask.ops import SparsePattern, sddmm


@dataclass(eq=False)
class _CsrLayout:
    """The kept entries as CSR over output rows (D) and over input rows (D^T), built once per pattern."""

    d_crow: torch.Tensor  # (out + 1,)
    d_col: torch.Tensor  # (nnz,) input feature of each entry, in D's CSR order
    d_order: torch.Tensor  # (nnz,) stored-order position of D's CSR entry k
    t_crow: torch.Tensor  # (in + 1,)
    t_col: torch.Tensor  # (nnz,) output feature, in D^T's CSR order
    t_order: torch.Tensor


_LAYOUTS: weakref.WeakKeyDictionary[SparsePattern, _CsrLayout] = weakref.WeakKeyDictionary()


def _csr(major: torch.Tensor, minor: torch.Tensor, n_major: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow, col, order): entries sorted by (major, minor); ``order[k]`` = the stored position of entry k."""
    n_minor = int(minor.max()) + 1 if minor.numel() else 1
    order = torch.argsort(major * n_minor + minor)
    counts = torch.bincount(major, minlength=n_major)
    crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return crow, minor[order], order


def _layout(pattern: SparsePattern) -> _CsrLayout:
    layout = _LAYOUTS.get(pattern)
    if layout is None or layout.d_col.device != pattern.indices.device:
        out_f, in_f = pattern.logical_shape
        out_idx, in_idx = pattern.out_index.long(), pattern.in_index.long()
        layout = _CsrLayout(*_csr(out_idx, in_idx, out_f), *_csr(in_idx, out_idx, in_f))
        _LAYOUTS[pattern] = layout
    return layout


def _spmm(crow: torch.Tensor, col: torch.Tensor, vals: torch.Tensor, size: tuple[int, int],
          dense_2d: torch.Tensor) -> torch.Tensor:
    """(size[0], size[1]) CSR @ dense_2d^T, returned as (T, size[0]) in ``vals``' dtype."""
    with warnings.catch_warnings():  # "CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.sparse_csr_tensor(crow, col, vals, size=size, check_invariants=False)
        return torch.sparse.mm(csr, dense_2d.to(vals.dtype).t()).t()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class SparseDeltaFunction(torch.autograd.Function):
    """``spmm(x, D)``: (..., in) -> (..., out) with D the sparse delta at ``pattern``'s kept entries."""

    @staticmethod
    def forward(ctx, x, values, pattern: SparsePattern):  # noqa: D102
        out_f, in_f = pattern.logical_shape
        compute = _compute_dtype(x)
        # Under autocast the output takes the autocast dtype, as nn.Linear's would, so that it adds to the
        # base layer's output without promoting it; the SpMM itself runs in fp32 with autocast off (it
        # would cast the dense operand to bf16, which MKL's CSR kernel lacks).
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        layout = _layout(pattern)
        x2d = x.reshape(-1, in_f)  # (T, in)
        with torch.autocast(device, enabled=False):
            y2d = _spmm(layout.d_crow, layout.d_col, values.to(compute)[layout.d_order], (out_f, in_f), x2d)
        ctx.save_for_backward(x, values)
        ctx.pattern = pattern
        return y2d.to(out_dtype).reshape(*x.shape[:-1], out_f)  # (..., out)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, values = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        if torch.is_grad_enabled():
            raise NotImplementedError("double backward through randmask.delta.sparse_delta is not supported; "
                                      "use sparse_delta_reference (plain differentiable ops) for Hessian-vector "
                                      "products")
        with torch.autocast(x.device.type, enabled=False):
            return SparseDeltaFunction._backward(ctx, grad_out, x, values, pattern)

    @staticmethod
    def _backward(ctx, grad_out, x, values, pattern: SparsePattern):
        out_f, in_f = pattern.logical_shape
        g2d, x2d = grad_out.reshape(-1, out_f), x.reshape(-1, in_f)
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            layout, compute = _layout(pattern), _compute_dtype(grad_out)
            # dL/dx = g @ D = (D^T @ g^T)^T: (T, out) -> (T, in)
            grad_x = _spmm(layout.t_crow, layout.t_col, values.to(compute)[layout.t_order], (in_f, out_f), g2d)
            grad_x = grad_x.to(x.dtype).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            # The in-place path's SDDMM, whatever kernel it picks; it expects g and x in one dtype.
            grad_values = sddmm(g2d.to(x.dtype), x2d, pattern).to(values.dtype)
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
    """Plain differentiable ops (gather + index_add, memory O(T * nnz)): the tests' reference and double backward."""
    out_f, in_f = pattern.logical_shape
    x2d = x.reshape(-1, in_f)
    contrib = x2d[:, pattern.in_index] * values.to(x.dtype)  # (T, nnz)
    y2d = x2d.new_zeros(x2d.shape[0], out_f).index_add(1, pattern.out_index, contrib)
    return y2d.reshape(*x.shape[:-1], out_f)


__all__ = ["SparseDeltaFunction", "sparse_delta", "sparse_delta_reference"]
