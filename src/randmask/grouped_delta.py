"""The delta path for a whole mixed batch in one SpMM: the batch's block-diagonal delta.

A mixed batch adds, per row t and kept entry k of that row's adapter a(t),

    y[t, :, o_k] += x[t, :, i_k] * values_{a(t), k}          # over the L tokens of row t

``randmask.delta.sparse_delta`` per adapter group does this in one SpMM per group. With many small
groups (decode: one token per row, up to one adapter per row) the fixed cost of a call per group
dominates. Here the rows are stacked instead: the batch's delta is one sparse matrix M of shape
(B*out, B*in), block t on the diagonal being row t's adapter's D (empty for a row without one), so

    y_flat = x_flat @ M^T,   x_flat (L, B*in): row t's features at t*in, y_flat (L, B*out)

is a single ``sparse_delta`` over P = sum over rows of its adapter's nnz entries, whatever the number
of groups. Its pattern is built once per layer and mixed batch; the values are gathered from each
adapter's ``values`` per call, so gradients reach them (and x) through ``sparse_delta``'s own backward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from randmask.delta import sparse_delta
from randmask.ops import SparsePattern


@dataclass(eq=False)
class BlockDiagonal:
    """One layer's block-diagonal delta pattern for one mixed batch."""

    pattern: SparsePattern  # over the logical (B*out, B*in) matrix, sorted flat indices
    value_index: torch.Tensor  # (P,) entry p of the pattern takes position value_index[p] of the concatenated values
    names: tuple[str, ...]  # the adapters whose values are concatenated, in order
    rows: int
    shape: tuple[int, int]  # one block's logical (out, in)
    _values: tuple = field(default=(), repr=False)  # (values' versions, gathered values) when nothing needs grad

    def gathered(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(P,) the pattern's values, gathered from each adapter's ``values``.

        Kept between calls (decode steps) while the values are unchanged and no graph is recorded; gathered
        anew, differentiably, otherwise.
        """
        tensors = [values[n] for n in self.names]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return torch.cat(tensors).index_select(0, self.value_index)
        versions = tuple((id(t), t._version) for t in tensors)
        if not self._values or self._values[0] != versions:
            cat = torch.cat(tensors) if tensors else torch.zeros(0)
            self._values = (versions, cat.index_select(0, self.value_index))
        return self._values[1]


def block_diagonal(groups: Sequence[tuple[str, torch.Tensor]], patterns: Mapping[str, SparsePattern],
                   rows: int) -> BlockDiagonal:
    """The pattern of every group whose adapter has one here (rows of other adapters get no delta)."""
    present = [(name, r) for name, r in groups if name in patterns]
    out_f, in_f = next(iter(patterns.values())).logical_shape
    device = next(iter(patterns.values())).indices.device
    flat, value_index, offset = [], [], 0
    for name, group_rows in present:
        p = patterns[name]
        r = group_rows.to(device, torch.int64)[:, None]  # (n, 1)
        big_row = r * out_f + p.out_index.long()[None, :]  # (n, nnz): row of M
        big_col = r * in_f + p.in_index.long()[None, :]
        flat.append((big_row * (rows * in_f) + big_col).reshape(-1))
        value_index.append((offset + torch.arange(p.nnz, device=device)).repeat(group_rows.numel()))
        offset += p.nnz
    flat_all = torch.cat(flat) if flat else torch.empty(0, dtype=torch.int64, device=device)
    order = torch.argsort(flat_all)
    index = torch.cat(value_index)[order] if value_index else flat_all
    pattern = SparsePattern(flat_all[order], (rows * out_f, rows * in_f))
    return BlockDiagonal(pattern, index, tuple(n for n, _ in present), rows, (out_f, in_f))


def grouped_sparse_delta(x: torch.Tensor, values: Mapping[str, torch.Tensor], block: BlockDiagonal) -> torch.Tensor:
    """Every row's own adapter delta, ``(B, ..., in) -> (B, ..., out)``, zero for rows without one."""
    out_f, in_f = block.shape
    batch = x.shape[0]
    tokens = x[0].numel() // in_f  # L: tokens per row
    # (L, B*in): for L = 1 a view; else the tokens-first copy the stacked layout needs.
    x_flat = x.reshape(batch, tokens, in_f).transpose(0, 1).reshape(tokens, batch * in_f)
    y_flat = sparse_delta(x_flat, block.gathered(values), block.pattern)  # (L, B*out)
    return y_flat.view(tokens, batch, out_f).transpose(0, 1).reshape(*x.shape[:-1], out_f)


__all__ = ["BlockDiagonal", "block_diagonal", "grouped_sparse_delta"]
