"""The delta path for a mixed batch in one gather/scatter: every row's own adapter, all groups at once.

A mixed batch adds, per row t and per kept entry k of that row's adapter a(t),

    y[t, :, o_k] += x[t, :, i_k] * values_{a(t), k}          # over the L tokens of row t

``randmask.delta.sparse_delta`` does this one adapter group at a time (one SpMM per group). With many
small groups (decode: one token per row, up to one adapter per row) the fixed cost of a call per group
dominates, so this kernel flattens all (row, entry) pairs of the batch into one list, built once per
layer and mixed batch:

    xg   = x^T[t * in + i_k]            # (P, L) one gather, P = sum over groups of rows x nnz
    y^T[t * out + o_k] += xg * v        # one index_add

Cost O(P * L) time and O(P) cached indices (int32), independent of the number of groups. The ops are
plain differentiable torch ops (gradients reach x and every adapter's values).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from randmask.ops import SparsePattern


@dataclass(eq=False)
class PairLayout:
    """The (row, entry) pairs of one layer in one mixed batch."""

    x_index: torch.Tensor  # (P,) int32 (int64 for huge batches): row * in + input feature
    y_index: torch.Tensor  # (P,) row * out + output feature
    value_index: torch.Tensor  # (P,) position in the concatenation of the groups' values
    names: tuple[str, ...]  # the adapters whose values are concatenated, in order
    rows: int
    shape: tuple[int, int]  # logical (out, in)


def pair_layout(groups: Sequence[tuple[str, torch.Tensor]], patterns: Mapping[str, SparsePattern],
                rows: int) -> PairLayout:
    """Pairs of every group whose adapter has a pattern here (rows of other adapters get no delta)."""
    present = [(name, r) for name, r in groups if name in patterns]
    out_f, in_f = next(iter(patterns.values())).logical_shape
    xs, ys, vs, offset = [], [], [], 0
    for name, group_rows in present:
        p = patterns[name]
        r = group_rows.to(p.indices.device, torch.int64)[:, None]  # (n, 1)
        xs.append((r * in_f + p.in_index.long()[None, :]).reshape(-1))  # (n * nnz,)
        ys.append((r * out_f + p.out_index.long()[None, :]).reshape(-1))
        vs.append((offset + torch.arange(p.nnz, device=p.indices.device)).repeat(group_rows.numel()))
        offset += p.nnz
    small = rows * max(in_f, out_f) < 2**31  # int32 halves the cached bytes where it holds every position
    kind = torch.int32 if small else torch.int64
    cat = lambda parts: torch.cat(parts).to(kind) if parts else torch.empty(0, dtype=kind)  # noqa: E731
    return PairLayout(cat(xs), cat(ys), cat(vs), tuple(n for n, _ in present), rows, (out_f, in_f))


def grouped_sparse_delta(x: torch.Tensor, values: Mapping[str, torch.Tensor], layout: PairLayout) -> torch.Tensor:
    """Every row's own adapter delta, ``(B, ..., in) -> (B, ..., out)``, zero for rows without one."""
    out_f, in_f = layout.shape
    batch = x.shape[0]
    tokens = x[0].numel() // in_f  # L: tokens per row
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xt = x.reshape(batch, tokens, in_f).transpose(1, 2).reshape(batch * in_f, tokens).to(compute)  # (B*in, L)
    v = torch.cat([values[n].to(compute) for n in layout.names]) if layout.names else x.new_zeros(0, dtype=compute)
    contrib = xt.index_select(0, layout.x_index) * v.index_select(0, layout.value_index)[:, None]  # (P, L)
    yt = xt.new_zeros(batch * out_f, tokens).index_add_(0, layout.y_index, contrib)  # (B*out, L)
    return yt.view(batch, out_f, tokens).transpose(1, 2).reshape(*x.shape[:-1], out_f).to(x.dtype)


__all__ = ["PairLayout", "grouped_sparse_delta", "pair_layout"]
