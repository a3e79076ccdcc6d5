"""Force each weight-gradient path of ``randmask.sddmm.sddmm``, and the fp64 reference every path must match."""

from __future__ import annotations

import pytest
import torch

from randmask import native, pattern, sddmm
from randmask.pattern import SparsePattern

# The module constants that force each path (compact: touched rows/columns only; -all: every one). The native
# kernel takes fp32 work (fp32/bf16 inputs) only: fp64 and fp16 work falls back from it to a torch path.
SDDMM_PATHS: dict[str, dict[str, float]] = {
    "native": {"NATIVE_DENSE_CROSSOVER": 2.0},
    "gather": {"GATHER_MAX_NNZ": 10**9, "GATHER_CHUNK_ELEMENTS": 5},  # several token chunks
    "compact": {"GATHER_MAX_NNZ": -1, "DENSE_GRAD_CROSSOVER": 2.0, "COMPACT_MAX_FRACTION": 1.0},
    "compact-all": {"GATHER_MAX_NNZ": -1, "DENSE_GRAD_CROSSOVER": 2.0, "COMPACT_MAX_FRACTION": -1.0},
    "dense": {"GATHER_MAX_NNZ": -1, "DENSE_GRAD_CROSSOVER": -1.0},
}


def force_sddmm_path(mp: pytest.MonkeyPatch, name: str) -> None:
    """Make ``sddmm`` take path ``name`` (the torch paths with the native kernel switched off)."""
    if name != "native":
        mp.setenv(native.DISABLE_ENV, "0")
    for attr, value in SDDMM_PATHS[name].items():
        mp.setattr(pattern if hasattr(pattern, attr) else sddmm, attr, value)


def sddmm_reference(g: torch.Tensor, x: torch.Tensor, kept: SparsePattern) -> torch.Tensor:
    """Dense g^T x in float64, at the kept entries (stored-weight order)."""
    dense = g.double().t() @ x.double()  # (out, in)
    return (dense.t() if kept.transposed else dense).reshape(-1)[kept.indices]
