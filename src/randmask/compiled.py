"""The masked linear op as ``torch.compile`` traces it: no graph break per masked layer.

The eager op (``randmask.ops.MaskedLinearFunction``) picks a weight-gradient kernel, caches a plan on its
``SparsePattern`` and reuses autocast casts through weak references: Python that Dynamo cannot trace, so a
compiled model broke its graph four or five times at every masked layer (19 graphs for a 2-layer Llama with
q and v masked). Under ``torch.compiler.is_compiling()`` a masked layer (``randmask.MaskedLayer``, and the PEFT
path's ``RandMaskLayer``) calls ``compiled_masked_linear`` instead:

- the forward is the plain dense layer (the weight already holds W0 (+) values at the kept entries), traced
  and fused like any ``nn.Linear``;
- the backward's dL/dx is the dense ``g @ W``, traced; dL/dvalues is ``torch.ops.randmask.sddmm``, one opaque
  custom op (``torch.library.custom_op``) that Dynamo sees only through its output shape, (nnz,), and that runs
  ``randmask.ops.sddmm`` eagerly: the same kernels, still never the dense dL/dW.

Mixed batches trace through ``randmask.mixed`` (and ``randmask.compiled_mixed`` above the gathered limit), quantized
bases through ``CompiledSparseDelta`` below. Not traced (they still break the graph, and still compute the right
thing): double backward (Hessian-vector products). FSDP2's gathered weights trace as the delta path does: the dense
layer through the weight as gathered, plus the sparse delta from what it holds at the kept entries to W0 + values
(``MaskAdapter.linear_beside``): nothing is written into the copy that FSDP2 gathers again for the backward.
"""

from __future__ import annotations

import weakref

import torch

from randmask.delta import delta_matmul
from randmask.ops import autocast_dtype, dense_linear
from randmask.pattern import SparsePattern, logical_shape
from randmask.sddmm import compute_dtype, sddmm

# id(indices) -> (a weak reference to that tensor, its pattern): the pattern caches the compact-SDDMM plan, which
# a custom op, handed tensors only, would otherwise rebuild at every backward.
_PATTERNS: dict[int, tuple[weakref.ref, int, SparsePattern]] = {}


def pattern_for(indices: torch.Tensor, stored_rows: int, stored_cols: int, transposed: bool) -> SparsePattern:
    """The cached ``SparsePattern`` of this very ``indices`` tensor (unmodified since), else a new one. A tensor made
    under ``inference_mode`` has no version counter to tell an in-place edit by, so its pattern is built anew."""
    key, cacheable = id(indices), not indices.is_inference()
    hit = _PATTERNS.get(key) if cacheable else None
    if hit is not None:
        ref, version, pattern = hit
        if ref() is indices and version == indices._version and pattern.shape == (stored_rows, stored_cols) \
                and pattern.transposed == transposed:
            return pattern
    pattern = SparsePattern(indices, (stored_rows, stored_cols), transposed)  # refuses a non-1-D, non-int tensor
    _check_indices(indices, stored_rows, stored_cols)
    if cacheable:
        # The callback drops the entry when the tensor dies, before its id can be reused.
        ref = weakref.ref(indices, lambda _, key=key, cache=_PATTERNS: cache.pop(key, None))
        _PATTERNS[key] = (ref, indices._version, pattern)
    return pattern


def _check_indices(indices: torch.Tensor, stored_rows: int, stored_cols: int) -> None:
    """The ops are public (``torch.ops.randmask.*``) and their kernels trust the pattern: check it once per indices
    tensor (the pattern cache holds it afterwards). Sorted and unique (one pass), then inside the stored weight (its
    two ends), as ``randmask.integrity.check_explicit_indices`` checks a saved adapter's."""
    if indices.numel() > 1 and bool((indices.diff() <= 0).any()):
        raise ValueError("randmask op: indices must be sorted and unique (flat row-major positions of the kept "
                         "entries); sort them with torch.unique(indices)")
    if indices.numel() and (int(indices[0]) < 0 or int(indices[-1]) >= stored_rows * stored_cols):
        raise ValueError(f"randmask op: indices must lie in [0, {stored_rows} * {stored_cols}) for a stored weight of "
                         f"shape ({stored_rows}, {stored_cols}), got [{int(indices[0])}, {int(indices[-1])}]")


def _check_operands(name: str, values: torch.Tensor | None, indices: torch.Tensor, dense_2d: torch.Tensor,
                    features: int, what: str) -> None:
    """One-line errors for operands that do not fit the pattern (shape-only: the fake implementations run it too)."""
    if values is not None and tuple(values.shape) != (indices.shape[0],):
        raise ValueError(f"randmask.{name}: values has shape {tuple(values.shape)}, the pattern has "
                         f"{indices.shape[0]} entries")
    if dense_2d.dim() != 2 or dense_2d.shape[1] != features:
        raise ValueError(f"randmask.{name}: {what} must be 2-D with {features} columns, got shape "
                         f"{tuple(dense_2d.shape)}")


@torch.library.custom_op("randmask::sddmm", mutates_args=())
def sddmm_op(grad_out_2d: torch.Tensor, x_2d: torch.Tensor, indices: torch.Tensor, stored_rows: int,
             stored_cols: int, transposed: bool) -> torch.Tensor:
    """``randmask.ops.sddmm`` as one custom op: (T, out) and (T, in) -> (nnz,) fp32 (fp64 for fp64 inputs)."""
    _check_sddmm(grad_out_2d, x_2d, indices, stored_rows, stored_cols, transposed)
    out = sddmm(grad_out_2d, x_2d, pattern_for(indices, stored_rows, stored_cols, transposed))
    return out.to(compute_dtype(grad_out_2d))  # the op's declared dtype, whichever kernel ran


@sddmm_op.register_fake
def _sddmm_shape(grad_out_2d: torch.Tensor, x_2d: torch.Tensor, indices: torch.Tensor, stored_rows: int,
                 stored_cols: int, transposed: bool) -> torch.Tensor:
    _check_sddmm(grad_out_2d, x_2d, indices, stored_rows, stored_cols, transposed)
    return grad_out_2d.new_empty(indices.shape[0], dtype=compute_dtype(grad_out_2d))


def _check_sddmm(grad_out_2d: torch.Tensor, x_2d: torch.Tensor, indices: torch.Tensor, stored_rows: int,
                 stored_cols: int, transposed: bool) -> None:
    out_f, in_f = logical_shape((stored_rows, stored_cols), transposed)
    _check_operands("sddmm", None, indices, grad_out_2d, out_f, "grad_out_2d")
    _check_operands("sddmm", None, indices, x_2d, in_f, "x_2d")
    if grad_out_2d.shape[0] != x_2d.shape[0]:
        raise ValueError(f"randmask.sddmm: grad_out_2d has {grad_out_2d.shape[0]} rows, x_2d {x_2d.shape[0]}")


@torch.library.custom_op("randmask::delta_matmul", mutates_args=())
def delta_matmul_op(dense_2d: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, stored_rows: int,
                    stored_cols: int, transposed: bool, transpose: bool) -> torch.Tensor:
    """``randmask.delta.delta_matmul`` as one custom op: (T, in) -> (T, out) fp32 (fp64 for fp64 inputs), or with
    ``transpose`` (T, out) -> (T, in)."""
    _check_delta(dense_2d, values, indices, stored_rows, stored_cols, transposed, transpose)
    out = delta_matmul(dense_2d, values, pattern_for(indices, stored_rows, stored_cols, transposed), transpose)
    return out.contiguous()  # the CSR product comes back as a transposed view; the op declares row-major


@delta_matmul_op.register_fake
def _delta_matmul_shape(dense_2d: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, stored_rows: int,
                        stored_cols: int, transposed: bool, transpose: bool) -> torch.Tensor:
    _check_delta(dense_2d, values, indices, stored_rows, stored_cols, transposed, transpose)
    out_f, in_f = logical_shape((stored_rows, stored_cols), transposed)
    return dense_2d.new_empty(dense_2d.shape[0], in_f if transpose else out_f, dtype=compute_dtype(dense_2d))


def _check_delta(dense_2d: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, stored_rows: int,
                 stored_cols: int, transposed: bool, transpose: bool) -> None:
    out_f, in_f = logical_shape((stored_rows, stored_cols), transposed)
    _check_operands("delta_matmul", values, indices, dense_2d, out_f if transpose else in_f, "dense_2d")


class CompiledSparseDelta(torch.autograd.Function):
    """``x @ D^T`` for the delta path (a quantized base): both SpMMs and the SDDMM as custom ops. Traceable."""

    @staticmethod
    def forward(ctx, x, values, indices, stored_shape: tuple[int, int], transposed: bool):  # noqa: D102
        # As randmask.delta: the output in the autocast dtype (it adds to the base layer's), the SpMM in fp32.
        out_dtype = autocast_dtype(x) or x.dtype
        out_f, in_f = logical_shape(stored_shape, transposed)
        y2d = delta_matmul_op(x.reshape(-1, in_f), values, indices, *stored_shape, transposed, False)
        ctx.save_for_backward(x, values, indices)
        ctx.stored_shape, ctx.transposed = stored_shape, transposed
        return y2d.to(out_dtype).reshape(*x.shape[:-1], out_f)  # (..., out)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, values, indices = ctx.saved_tensors
        out_f, in_f = logical_shape(ctx.stored_shape, ctx.transposed)
        g2d, x2d = grad_out.reshape(-1, out_f), x.reshape(-1, in_f)
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:  # dL/dx = g @ D: (T, out) -> (T, in)
            grad_x = delta_matmul_op(g2d, values, indices, *ctx.stored_shape, ctx.transposed, True)
            grad_x = grad_x.to(x.dtype).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            grad_values = sddmm_op(g2d.to(x.dtype), x2d, indices, *ctx.stored_shape, ctx.transposed)
            grad_values = grad_values.to(values.dtype)
        return grad_x, grad_values, None, None, None


def compiled_sparse_delta(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                          stored_shape: tuple[int, int], transposed: bool) -> torch.Tensor:
    """``randmask.delta.sparse_delta`` for a forward traced by ``torch.compile``: (..., in) -> (..., out)."""
    return CompiledSparseDelta.apply(x, values, indices, tuple(stored_shape), transposed)


class CompiledMaskedLinear(torch.autograd.Function):
    """y = linear(x, W, b) with W holding W0 (+) values; dvalues through ``sddmm_op``. Traceable by Dynamo."""

    @staticmethod
    def forward(ctx, x, values, weight, bias, indices, stored_shape: tuple[int, int], transposed: bool):  # noqa: D102
        ctx.input_dtype = x.dtype
        cast = autocast_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            if cast is not None:
                # As the eager op and nn.Linear: the matmul in the autocast dtype; the casts are what the backward
                # reads, so dx and the SDDMM run in that dtype too (bf16 in, fp32 sums).
                x, weight = x.to(cast), weight.to(cast)
                bias = bias.to(cast) if bias is not None else None
            y = dense_linear(x, weight, bias, transposed)
        ctx.save_for_backward(x, weight, indices)
        ctx.stored_shape, ctx.transposed, ctx.values_dtype = stored_shape, transposed, values.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, weight, indices = ctx.saved_tensors
        g = grad_out.to(weight.dtype)
        g2d, x2d = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:  # dL/dx = g @ W (Linear, W: (out, in)) or g @ W^T (Conv1D, W: (in, out))
            grad_x = (g2d @ (weight.t() if ctx.transposed else weight)).reshape(x.shape).to(ctx.input_dtype)
        if ctx.needs_input_grad[1]:
            grad_values = sddmm_op(g2d, x2d, indices, *ctx.stored_shape, ctx.transposed).to(ctx.values_dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = g2d.sum(0)
        return grad_x, grad_values, None, grad_bias, None, None, None


def compiled_masked_linear(x: torch.Tensor, values: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           indices: torch.Tensor, stored_shape: tuple[int, int], transposed: bool) -> torch.Tensor:
    """The masked linear op for a forward traced by ``torch.compile``; ``weight`` must hold W0 (+) values until the
    backward (not FSDP2's gathered copy, freed after the forward: the caller takes the eager op for that)."""
    return CompiledMaskedLinear.apply(x, values, weight, bias, indices, stored_shape, transposed)


__all__ = ["CompiledMaskedLinear", "CompiledSparseDelta", "compiled_masked_linear", "compiled_sparse_delta",
           "delta_matmul_op", "pattern_for", "sddmm_op"]
