"""The masked linear op: dense forward, sparse weight gradient (SDDMM).

The trained entries live inside the frozen weight W, so the forward pass is the
unmodified dense layer. The backward returns

    dL/dx      = dL/dy @ W                      (dense: needed anyway)
    dL/dvalues = sddmm(dL/dy^T, x) at the mask  (grad_values[k] = sum_t g[t, o_k] * x[t, i_k])

and never forms the dense dL/dW = g^T x. ``o_k``/``i_k`` are the output/input
feature of kept entry k. The backward is itself differentiable (for Hessian-vector
products): with ``create_graph=True`` it switches to plain differentiable ops.

The kept entries (``randmask.pattern``), the SDDMM paths (``randmask.sddmm``) and the kernel chooser
(``randmask.kernels``) live in their own modules; this module names the public ones again, as the op's API.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F

from randmask.kernels import KERNEL_ENV, KERNELS, kernel_setting, weight_gradient_kernel
from randmask.pattern import SparsePattern, index_dtype, logical_shape
from randmask.sddmm import compute_dtype, sddmm, sddmm_differentiable, weight_gradient_path

# Tuning constants that moved out of this module. They are not named again here: a copy would read the same but
# setting it would change nothing, so reading one from here is an AttributeError that names its home.
MOVED_CONSTANTS = {"COMPACT_MAX_FRACTION": "randmask.pattern", "INT32_INDEX_LIMIT": "randmask.pattern",
                   "DENSE_GRAD_CROSSOVER": "randmask.sddmm", "GATHER_MAX_NNZ": "randmask.sddmm"}


def __getattr__(name: str) -> object:
    if name in MOVED_CONSTANTS:
        raise AttributeError(f"randmask.ops.{name} moved to {MOVED_CONSTANTS[name]}.{name}; read or set it there "
                             "(the paths read it there)")
    raise AttributeError(f"module 'randmask.ops' has no attribute {name!r}")


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """The layer's dense product with the stored weight: ``F.linear`` (W: (out, in)), or ``x @ W + b`` when
    ``transposed`` (GPT-2's Conv1D, W: (in, out))."""
    if transposed:  # Conv1D: y = x @ W + b with W of shape (in, out)
        y = x @ weight
        return y + bias if bias is not None else y
    return F.linear(x, weight, bias)


class _LastCast(threading.local):
    """The last autocast cast of a layer input: q, k and v read one hidden-state tensor, and each
    saves its cast for the backward's SDDMM, so sharing the cast saves two of three copies. It is made
    under no_grad (it holds no graph, so the cache never keeps one alive); ``_SharedCast`` links each
    consumer to x."""

    source: weakref.ref | None = None
    version: int = -1
    cast: torch.Tensor | None = None


_LAST_CAST = _LastCast()


class _SharedCast(torch.autograd.Function):
    """One consumer's view of x's shared cast, with its own autograd node: its backward turns the consumer's
    gradient back to x's dtype, so autograd sums q's, k's and v's gradients in x's dtype (fp32), as nn.Linear's
    one cast per call does, while all three share one cast's storage. Its backward is a differentiable cast, so a
    double backward reaches x through it (Hessian-vector products under autocast)."""

    @staticmethod
    def forward(ctx, x, cast):  # noqa: D102
        ctx.input_dtype = x.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad.to(ctx.input_dtype), None


def _cast_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, reusing the previous call's cast when it cast this same, unmodified tensor.

    Called outside the autograd Function (``masked_linear``), so that autograd links the cast to an input that
    requires grad: a double backward then reaches x through the cast that the backward's SDDMM reads (cast inside
    the Function, the saved copy had no graph, and Hessian-vector products under autocast lost every term through
    a layer input that autocast cast).
    """
    if x.dtype == dtype:
        return x
    if x.is_inference():  # no version counter (inference_mode): an in-place edit could not be told from none
        return x.to(dtype)
    last = _LAST_CAST
    cast = last.cast
    if not (last.source is not None and last.source() is x and last.version == x._version
            and cast is not None and cast.dtype == dtype):
        with torch.no_grad():
            cast = x.to(dtype)
        last.source, last.version, last.cast = weakref.ref(x), x._version, cast
    return _SharedCast.apply(x, cast) if x.requires_grad and torch.is_grad_enabled() else cast


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
    cast = autocast_dtype(x)
    if cast is not None:  # autocast: cast here, where autograd records it (see _cast_input)
        x = _cast_input(x, cast)
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
    "MaskedLinearFunction",
    "SparsePattern",
    "KERNELS",
    "KERNEL_ENV",
    "autocast_dtype",
    "compute_dtype",
    "dense_linear",
    "dense_reference_linear",
    "index_dtype",
    "kernel_setting",
    "logical_shape",
    "masked_linear",
    "scatter_delta",
    "sddmm",
    "sddmm_differentiable",
    "weight_gradient_kernel",
    "weight_gradient_path",
]
