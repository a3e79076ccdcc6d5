"""A mixed batch's per-adapter-group deltas as opaque custom ops, for ``torch.compile`` above the gathered limit.

Under ``torch.compile`` a mixed batch's shapes must not depend on which rows ask for which adapter, or every new mix
of names would recompile (``randmask.mixed``). The gathered layout has fixed shapes but materialises a
(rows, tokens, N) product, so a long prefill costs that much memory. Above ``TRACED_GATHERED_MAX_ELEMENTS`` the
compiled graph calls these ops instead: Dynamo sees only their output shapes, and inside them the rows of each slot
are selected eagerly (data-dependent shapes are fine there) and run through one SpMM per group, as eager's
per-group layout does. Memory: one layer output, plus each group's rows.

``torch.ops.randmask.grouped_delta_matmul``: each row's slot's ``x @ D^T`` (or ``g @ D`` for the backward's dL/dx).
``torch.ops.randmask.grouped_sddmm``: each slot's dL/dvalues over its own rows.
"""

from __future__ import annotations

import torch

from randmask.compiled import pattern_for
from randmask.delta import delta_matmul
from randmask.ops import autocast_dtype
from randmask.pattern import logical_shape
from randmask.sddmm import compute_dtype, sddmm


def _check(name: str, dense_3d: torch.Tensor, row_slot: torch.Tensor, indices: list[torch.Tensor], features: int,
           values: list[torch.Tensor] | None = None) -> None:
    """One-line errors for operands that do not fit (shape-only: the fake implementations run it too)."""
    if dense_3d.dim() != 3 or dense_3d.shape[2] != features:
        raise ValueError(f"randmask.{name}: the dense operand must be (rows, tokens, {features}), got "
                         f"{tuple(dense_3d.shape)}")
    if row_slot.dim() != 1 or row_slot.shape[0] != dense_3d.shape[0]:
        raise ValueError(f"randmask.{name}: row_slot must be ({dense_3d.shape[0]},), one slot per row, got "
                         f"{tuple(row_slot.shape)}")
    if values is not None and [tuple(v.shape) for v in values] != [(i.shape[0],) for i in indices]:
        raise ValueError(f"randmask.{name}: values and indices must pair up, one (nnz,) tensor each per slot")


def _slot_rows(name: str, row_slot: torch.Tensor, slots: int) -> list[torch.Tensor]:
    """Each slot's rows, (rows_s,) int64: one sort, not one comparison per slot (slot ``slots``: no adapter)."""
    low, high = (int(row_slot.min()), int(row_slot.max())) if row_slot.numel() else (0, 0)
    if row_slot.dtype != torch.long or not 0 <= low <= high <= slots:
        raise ValueError(f"randmask.{name}: row_slot must be int64 slots in [0, {slots}] ({slots}: no adapter), got "
                         f"{row_slot.dtype} in [{low}, {high}]")
    order = torch.argsort(row_slot, stable=True)
    counts = torch.bincount(row_slot, minlength=slots + 1)[:slots].tolist()
    return list(order[:sum(counts)].split(counts))


@torch.library.custom_op("randmask::grouped_delta_matmul", mutates_args=())
def grouped_delta_matmul_op(dense_3d: torch.Tensor, row_slot: torch.Tensor, values: list[torch.Tensor],
                            indices: list[torch.Tensor], stored_rows: int, stored_cols: int, transposed: bool,
                            transpose: bool) -> torch.Tensor:
    """Row b through slot ``row_slot[b]``'s delta: (B, T, in) -> (B, T, out) fp32 (fp64 for fp64 input), or with
    ``transpose`` (B, T, out) -> (B, T, in). A row whose slot is ``len(values)`` (no adapter) gets zeros."""
    out_f, in_f = logical_shape((stored_rows, stored_cols), transposed)
    _check("grouped_delta_matmul", dense_3d, row_slot, indices, out_f if transpose else in_f, values)
    rows_b, tokens = dense_3d.shape[:2]
    out = dense_3d.new_zeros(rows_b, tokens, in_f if transpose else out_f, dtype=compute_dtype(dense_3d))
    for rows, v, idx in zip(_slot_rows("grouped_delta_matmul", row_slot, len(values)), values, indices):
        if rows.numel() == 0 or idx.numel() == 0:
            continue
        part = delta_matmul(dense_3d.index_select(0, rows).reshape(-1, dense_3d.shape[2]), v,
                            pattern_for(idx, stored_rows, stored_cols, transposed), transpose)  # (rows_s * T, f)
        out.index_add_(0, rows, part.reshape(rows.numel(), tokens, -1).to(out.dtype))
    return out


@grouped_delta_matmul_op.register_fake
def _grouped_delta_matmul_shape(dense_3d, row_slot, values, indices, stored_rows, stored_cols, transposed,
                                transpose):
    out_f, in_f = logical_shape((stored_rows, stored_cols), transposed)
    _check("grouped_delta_matmul", dense_3d, row_slot, indices, out_f if transpose else in_f, values)
    return dense_3d.new_empty(*dense_3d.shape[:2], in_f if transpose else out_f, dtype=compute_dtype(dense_3d))


@torch.library.custom_op("randmask::grouped_sddmm", mutates_args=())
def grouped_sddmm_op(grad_3d: torch.Tensor, x_3d: torch.Tensor, row_slot: torch.Tensor, indices: list[torch.Tensor],
                     stored_rows: int, stored_cols: int, transposed: bool) -> list[torch.Tensor]:
    """Each slot's dL/dvalues over its own rows: (B, T, out) and (B, T, in) -> one (nnz_s,) fp32 tensor per slot."""
    out_f, in_f = logical_shape((stored_rows, stored_cols), transposed)
    _check("grouped_sddmm", grad_3d, row_slot, indices, out_f)
    _check("grouped_sddmm", x_3d, row_slot, indices, in_f)
    grads = []
    for rows, idx in zip(_slot_rows("grouped_sddmm", row_slot, len(indices)), indices):
        if rows.numel() == 0 or idx.numel() == 0:
            grads.append(grad_3d.new_zeros(idx.shape[0], dtype=compute_dtype(grad_3d)))
            continue
        g, x = grad_3d.index_select(0, rows).reshape(-1, out_f), x_3d.index_select(0, rows).reshape(-1, in_f)
        grads.append(sddmm(g, x, pattern_for(idx, stored_rows, stored_cols, transposed)).to(compute_dtype(grad_3d)))
    return grads


@grouped_sddmm_op.register_fake
def _grouped_sddmm_shape(grad_3d, x_3d, row_slot, indices, stored_rows, stored_cols, transposed):
    out_f, in_f = logical_shape((stored_rows, stored_cols), transposed)
    _check("grouped_sddmm", grad_3d, row_slot, indices, out_f)
    _check("grouped_sddmm", x_3d, row_slot, indices, in_f)
    return [grad_3d.new_empty(i.shape[0], dtype=compute_dtype(grad_3d)) for i in indices]


class CompiledGroupedDelta(torch.autograd.Function):
    """Each row's adapter's ``x @ D^T`` over slots: both products and the SDDMM as custom ops. Traceable.

    ``forward(x, row_slot, stored_shape, transposed, slots, *values_then_indices)``: the values come as separate
    arguments, so that autograd gives each its gradient.
    """

    @staticmethod
    def forward(ctx, x, row_slot, stored_shape: tuple[int, int], transposed: bool, slots: int,
                *values_then_indices):  # noqa: D102
        values, indices = list(values_then_indices[:slots]), list(values_then_indices[slots:])
        out_dtype = autocast_dtype(x) or x.dtype  # as randmask.delta: the output in the autocast dtype
        out_f, in_f = logical_shape(stored_shape, transposed)
        x3 = x.reshape(x.shape[0], -1, in_f)  # (B, T, in)
        y3 = grouped_delta_matmul_op(x3, row_slot, values, indices, *stored_shape, transposed, False)
        ctx.save_for_backward(x3, row_slot, *values, *indices)
        ctx.stored_shape, ctx.transposed, ctx.slots, ctx.x_shape = stored_shape, transposed, slots, x.shape
        return y3.to(out_dtype).reshape(*x.shape[:-1], out_f)  # (B, ..., out)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x3, row_slot, *rest = ctx.saved_tensors
        values, indices = rest[:ctx.slots], rest[ctx.slots:]
        out_f, _ = logical_shape(ctx.stored_shape, ctx.transposed)
        g3 = grad_out.reshape(x3.shape[0], -1, out_f)
        grad_x = None
        if ctx.needs_input_grad[0]:  # dL/dx = g @ D per row's slot
            grad_x = grouped_delta_matmul_op(g3, row_slot, values, indices, *ctx.stored_shape, ctx.transposed, True)
            grad_x = grad_x.to(x3.dtype).reshape(ctx.x_shape)
        grad_values = [None] * ctx.slots
        if any(ctx.needs_input_grad[5:5 + ctx.slots]):
            grads = grouped_sddmm_op(g3.to(x3.dtype), x3, row_slot, indices, *ctx.stored_shape, ctx.transposed)
            grad_values = [g.to(v.dtype) for g, v in zip(grads, values)]
        return grad_x, None, None, None, None, *grad_values, *[None] * ctx.slots


def compiled_grouped_delta(x: torch.Tensor, row_slot: torch.Tensor, values: list[torch.Tensor],
                           indices: list[torch.Tensor], stored_shape: tuple[int, int],
                           transposed: bool) -> torch.Tensor:
    """Each row's slot's sparse delta, (B, ..., in) -> (B, ..., out): ``values[s]``/``indices[s]`` are slot s's (empty
    for a slot whose adapter does not target the layer); a row whose slot is ``len(values)`` gets zeros."""
    return CompiledGroupedDelta.apply(x, row_slot, tuple(stored_shape), transposed, len(values), *values, *indices)


__all__ = ["CompiledGroupedDelta", "compiled_grouped_delta", "grouped_delta_matmul_op", "grouped_sddmm_op"]
