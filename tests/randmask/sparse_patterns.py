"""Random sparse patterns and their dense fp64 deltas: the reference the delta-path tests compare against."""

from __future__ import annotations

import torch

from randmask.ops import SparsePattern


def random_pattern(shape: tuple[int, int], nnz: int, transposed: bool = False, seed: int = 0) -> SparsePattern:
    """``nnz`` distinct sorted flat indices into a stored ``shape`` matrix, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(shape[0] * shape[1], generator=g)[:nnz].sort().values
    return SparsePattern(idx, shape, transposed)


def dense_delta(values: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """The pattern's delta as a dense fp64 matrix in the logical (out, in) layout."""
    d = torch.zeros(pattern.shape[0] * pattern.shape[1], dtype=torch.float64)
    d[pattern.indices] = values.double()
    d = d.view(pattern.shape)
    return d.t() if pattern.transposed else d  # logical (out, in)
