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

# Path choice for the weight gradient (benchmarks/sddmm_crossover.py; CPU, 2 threads, 1024 tokens, OPT-125m
# shapes, on a shared machine, so only the larger differences count):
#   gather:  gathers the kept entries' columns of g and x (O(tokens * nnz) temporaries): as cheap as
#            anything for a few dozen entries, 5-10x slower than dense g^T x at 1% density.
#   compact: copies only the touched rows/columns of g and x tokens-last, in fp32, then calls
#            torch.sparse.sampled_addmm, whose CPU kernel is then a vectorised dot per kept entry
#            (handed the raw (T, features) activations it makes those transposed copies itself, of
#            every row and column). 0.1-0.5x dense up to 1% density, beats dense up to 3% everywhere
#            and up to 10% on two of the three shapes; dense wins at 20%.
#   dense:   g^T x, then gather the kept entries.
GATHER_MAX_NNZ = 64
DENSE_GRAD_CROSSOVER = 0.06
COMPACT_MAX_FRACTION = 0.8  # gather only the touched rows/columns when at most this fraction is touched
GATHER_CHUNK_ELEMENTS = 1 << 22  # bound the gather path's (tokens x nnz) temporaries to ~16 MB each


@dataclass(eq=False)
class _Plan:
    """The kept entries laid out for the compact SDDMM (built once per pattern and device).

    Entries are ordered as a CSR over ``lhs`` (output features when ``lhs_is_out``, else input
    features), with rows/columns renumbered to the touched ones only.
    """

    lhs_is_out: bool
    lhs_touched: torch.Tensor | None  # touched lhs features (None: all of them)
    rhs_touched: torch.Tensor | None
    csr: torch.Tensor  # (n_lhs, n_rhs) CSR with zero fp32 values
    order: torch.Tensor | None  # entry k of the CSR is kept entry order[k] (None: same order)


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
    _plan: _Plan | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        n_cols = self.shape[1]
        self.rows = torch.div(self.indices, n_cols, rounding_mode="floor")
        self.cols = self.indices - self.rows * n_cols

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
        return (self.shape[1], self.shape[0]) if self.transposed else self.shape

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


def _touched(index: torch.Tensor, size: int) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """(touched features or None for all, each entry's renumbered feature, number of touched)."""
    used = torch.zeros(size, dtype=torch.bool, device=index.device)
    used[index] = True
    n_used = int(used.sum())
    if n_used > COMPACT_MAX_FRACTION * size:  # copying all is cheaper than an index_select
        return None, index, size
    touched = used.nonzero().squeeze(1)
    renumber = torch.cumsum(used, 0) - 1  # feature -> its rank among the touched ones
    return touched, renumber[index], n_used


def _make_plan(pattern: SparsePattern) -> _Plan:
    out_f, in_f = pattern.logical_shape
    out_touched, out_new, n_out = _touched(pattern.out_index, out_f)
    in_touched, in_new, n_in = _touched(pattern.in_index, in_f)
    # The kernel reads its lhs rows in order and its rhs rows at random: put the smaller operand on
    # the rhs so that it stays in cache (for fc2, 768 outputs x 3072 inputs, that is g^T).
    lhs_is_out = n_out >= n_in
    lhs, rhs, n_lhs, n_rhs = (out_new, in_new, n_out, n_in) if lhs_is_out else (in_new, out_new, n_in, n_out)
    key = lhs * n_rhs + rhs
    # The kept entries' own order is row-major in the stored weight; the CSR needs (lhs, rhs) order.
    in_order = bool((key[1:] > key[:-1]).all()) if key.numel() > 1 else True
    order = None if in_order else torch.argsort(key)
    if order is not None:
        lhs, rhs = lhs[order], rhs[order]
    counts = torch.bincount(lhs, minlength=n_lhs)
    crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    with warnings.catch_warnings():  # "CSR support is in beta": we only use sampled_addmm
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.sparse_csr_tensor(
            crow, rhs, torch.zeros(pattern.nnz, dtype=torch.float32, device=pattern.indices.device),
            size=(n_lhs, n_rhs), check_invariants=False,
        )
    return _Plan(lhs_is_out, out_touched if lhs_is_out else in_touched,
                 in_touched if lhs_is_out else out_touched, csr, order)


def _tokens_last(m2d: torch.Tensor, touched: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(T, F) -> (F', T) contiguous in ``dtype``, F' = the touched features only."""
    if touched is not None:
        m2d = m2d.index_select(1, touched)
    return m2d.t().contiguous().to(dtype)


def sddmm(grad_out_2d: torch.Tensor, x_2d: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """Sampled dense-dense product: the weight gradient at the kept entries, (nnz,) float32.

    Args:
        grad_out_2d: (T, out) gradient of the layer output.
        x_2d: (T, in) layer input.
    """
    # Accumulate in fp32 (fp64 for fp64 inputs): CPU sampled_addmm has no bf16/fp16 kernel (torch 2.13),
    # and bf16 products summed over thousands of tokens would lose the small gradients we train on.
    compute = torch.float64 if grad_out_2d.dtype == torch.float64 else torch.float32
    if pattern.nnz == 0:
        return grad_out_2d.new_zeros(0, dtype=compute)
    if pattern.nnz <= GATHER_MAX_NNZ:
        return _sddmm_gather_chunked(grad_out_2d, x_2d, pattern, compute)
    if pattern.density > DENSE_GRAD_CROSSOVER:
        # Stored-weight gradient = a @ b: (out, T) @ (T, in) for Linear, (in, T) @ (T, out) for Conv1D.
        a, b = (x_2d.t(), grad_out_2d) if pattern.transposed else (grad_out_2d.t(), x_2d)
        return (a.to(compute) @ b.to(compute)).reshape(-1)[pattern.indices]
    return _sddmm_compact(grad_out_2d, x_2d, pattern, compute)


def _sddmm_compact(grad_out_2d: torch.Tensor, x_2d: torch.Tensor, pattern: SparsePattern,
                   compute: torch.dtype) -> torch.Tensor:
    plan = pattern.plan()
    lhs_2d, rhs_2d = (grad_out_2d, x_2d) if plan.lhs_is_out else (x_2d, grad_out_2d)
    lhs = _tokens_last(lhs_2d, plan.lhs_touched, compute)  # (n_lhs, T)
    rhs = _tokens_last(rhs_2d, plan.rhs_touched, compute)  # (n_rhs, T)
    csr = plan.csr if compute == torch.float32 else plan.csr.to(compute)
    # lhs @ rhs^T at the CSR entries: rhs.t() is a view, so the kernel's own rhs^T copy is a no-op.
    values = torch.sparse.sampled_addmm(csr, lhs, rhs.t(), beta=0.0, alpha=1.0).values()
    if plan.order is None:
        return values
    return torch.empty_like(values).index_copy_(0, plan.order, values)


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
    "COMPACT_MAX_FRACTION",
    "DENSE_GRAD_CROSSOVER",
    "GATHER_MAX_NNZ",
    "MaskedLinearFunction",
    "SparsePattern",
    "dense_reference_linear",
    "masked_linear",
    "scatter_delta",
    "sddmm",
    "sddmm_differentiable",
]
