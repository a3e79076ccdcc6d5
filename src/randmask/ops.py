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

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Path choice for the weight gradient, from benchmarks/sddmm_crossover.py on CPU (768x768 and
# 3072x768, 1024 tokens; times relative to the dense g^T x):
#   gather:        0.02 at 2 entries, 0.11 at 70, ~0.45 at 0.1% density, 4-7x slower at 1%
#   sampled_addmm: a fixed cost of 0.25-0.5 up to ~1% density, 0.5-0.7 at 5-10%, >1 at 20%
# so: gather up to 0.1% density (or a few hundred entries), sampled_addmm up to 12%, dense above.
GATHER_MAX_NNZ = 512
GATHER_MAX_DENSITY = 1e-3
DENSE_GRAD_CROSSOVER = 0.12
GATHER_CHUNK_ELEMENTS = 1 << 22  # bound the gather path's (tokens x nnz) temporaries to ~16 MB each


@dataclass(eq=False)
class SparsePattern:
    """The kept entries of one stored weight tensor, in the forms the backward needs.

    ``indices`` are sorted flat row-major indices into the *stored* weight of shape
    ``shape`` (``(out, in)`` for ``nn.Linear``; ``(in, out)`` for GPT-2's ``Conv1D``,
    where ``transposed=True``).
    """

    indices: torch.Tensor
    shape: tuple[int, int]
    transposed: bool = False
    rows: torch.Tensor = field(init=False)
    cols: torch.Tensor = field(init=False)
    crow: torch.Tensor = field(init=False)
    _csr_cache: dict = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        n_cols = self.shape[1]
        self.rows = torch.div(self.indices, n_cols, rounding_mode="floor")
        self.cols = self.indices - self.rows * n_cols
        counts = torch.bincount(self.rows, minlength=self.shape[0])
        self.crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])

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

    def to(self, device: torch.device) -> SparsePattern:
        """A copy on ``device`` (no-op if already there)."""
        if self.indices.device == torch.device(device):
            return self
        return SparsePattern(self.indices.to(device), self.shape, self.transposed)

    def csr_template(self, dtype: torch.dtype) -> torch.Tensor:
        """A CSR tensor with this pattern (zero values): ``sampled_addmm``'s sampling input."""
        key = (dtype, self.indices.device)
        if key not in self._csr_cache:
            with warnings.catch_warnings():  # "CSR support is in beta": we only use sampled_addmm
                warnings.simplefilter("ignore", UserWarning)
                self._csr_cache[key] = torch.sparse_csr_tensor(
                    self.crow, self.cols, torch.zeros(self.nnz, dtype=dtype, device=self.indices.device),
                    size=self.shape, check_invariants=False,
                )
        return self._csr_cache[key]


def sddmm(grad_out_2d: torch.Tensor, x_2d: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """Sampled dense-dense product: the weight gradient at the kept entries, (nnz,) float32.

    Args:
        grad_out_2d: (T, out) gradient of the layer output.
        x_2d: (T, in) layer input.
    """
    # Stored-weight gradient = a @ b: (out, T) @ (T, in) for Linear, (in, T) @ (T, out) for Conv1D.
    a, b = (x_2d.t(), grad_out_2d) if pattern.transposed else (grad_out_2d.t(), x_2d)
    if pattern.nnz == 0:
        return grad_out_2d.new_zeros(0, dtype=torch.float32)
    # Accumulate in fp32: CPU sampled_addmm has no bf16/fp16 kernel, and fp32 sums are more exact.
    compute = torch.float64 if a.dtype == torch.float64 else torch.float32
    if pattern.nnz <= GATHER_MAX_NNZ or pattern.density <= GATHER_MAX_DENSITY:
        return _sddmm_gather_chunked(grad_out_2d.to(compute), x_2d.to(compute), pattern)
    a, b = a.to(compute), b.to(compute)
    if pattern.density > DENSE_GRAD_CROSSOVER:
        return (a @ b).reshape(-1)[pattern.indices]
    out = torch.sparse.sampled_addmm(pattern.csr_template(compute), a, b, beta=0.0, alpha=1.0)
    return out.values()


def _sddmm_gather_chunked(grad_out_2d: torch.Tensor, x_2d: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """``sddmm_differentiable`` over token chunks, so temporaries stay small for long batches."""
    chunk = max(1, GATHER_CHUNK_ELEMENTS // max(1, pattern.nnz))
    out = sddmm_differentiable(grad_out_2d[:chunk], x_2d[:chunk], pattern)
    for start in range(chunk, grad_out_2d.shape[0], chunk):
        out += sddmm_differentiable(grad_out_2d[start:start + chunk], x_2d[start:start + chunk], pattern)
    return out


def sddmm_differentiable(
    grad_out_2d: torch.Tensor, x_2d: torch.Tensor, pattern: SparsePattern
) -> torch.Tensor:
    """Same as ``sddmm`` with plain differentiable ops (memory O(T * nnz)); for double backward."""
    # (T, nnz) * (T, nnz) summed over tokens.
    return (grad_out_2d[:, pattern.out_index] * x_2d[:, pattern.in_index]).sum(0)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool):
    if transposed:  # Conv1D: y = x @ W + b with W of shape (in, out)
        y = x @ weight
        return y + bias if bias is not None else y
    return F.linear(x, weight, bias)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
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
    def forward(ctx, x, values, weight, bias, pattern: SparsePattern):  # noqa: D102
        cast = _autocast_dtype(x)
        ctx.input_dtype = x.dtype
        with torch.autocast(x.device.type, enabled=False):
            if cast is not None:  # autocast: run the matmul in the autocast dtype like nn.Linear
                x, weight = x.to(cast), weight.to(cast)
                bias = bias.to(cast) if bias is not None else None
            y = _linear(x, weight, bias, pattern.transposed)
        ctx.save_for_backward(x, values, weight)
        ctx.pattern = pattern
        return y

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, values, weight = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
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
        return grad_x, grad_values, None, grad_bias, None


def masked_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pattern: SparsePattern,
) -> torch.Tensor:
    """Apply the masked linear op. ``weight`` must already equal W0 (+) values at the kept entries."""
    return MaskedLinearFunction.apply(x, values, weight, bias, pattern)


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
    return _linear(x, scatter_delta(base_weight, values, pattern), bias, pattern.transposed)


__all__ = [
    "DENSE_GRAD_CROSSOVER",
    "GATHER_MAX_DENSITY",
    "GATHER_MAX_NNZ",
    "MaskedLinearFunction",
    "SparsePattern",
    "dense_reference_linear",
    "masked_linear",
    "scatter_delta",
    "sddmm",
    "sddmm_differentiable",
]
