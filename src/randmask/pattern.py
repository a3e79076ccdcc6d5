"""The kept entries of one weight, and their CSR layout for the weight-gradient kernels.

``SparsePattern`` is what every path of randmask holds per masked matrix: the sorted flat indices of the kept
entries in the stored weight. Its ``plan()`` lays them out once as a CSR over the touched features only
(``CsrPlan``), which the compact, native and Triton SDDMM kernels (``randmask.sddmm``) read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from randmask import native

COMPACT_MAX_FRACTION = 0.8  # gather only the touched rows/columns when at most this fraction is touched
# The native kernel transposes whole 16-feature tiles in registers but gathers touched features one by
# one, and activations read from DRAM cost whole lines either way: at 0.1% (55% touched) all features
# ran 1.0-1.6x faster, at 0.01% (9% touched) alike (cold caches, OPT-125m shapes, 1024 tokens).
NATIVE_COMPACT_MAX_FRACTION = 0.25

INT32_INDEX_LIMIT = 2 ** 31
"""Index tensors whose values all lie below this are kept int32 (half of int64's bytes per entry); int64 otherwise."""


def index_dtype(largest: int, *, smallest: torch.dtype = torch.int32) -> torch.dtype:
    """The narrowest integer dtype from ``smallest`` up (int16, int32, int64) that holds every value to ``largest``.

    The one rule for every index randmask keeps per entry (adapter positions, CSR layouts, gathered tables). int32 is
    the default floor: MKL's and cuSPARSE's CSR take it as it is; int16 suits only tables widened per use.
    """
    if smallest == torch.int16 and largest <= torch.iinfo(torch.int16).max:
        return torch.int16
    return torch.int32 if largest < INT32_INDEX_LIMIT else torch.int64


@dataclass(eq=False)
class CsrPlan:
    """The kept entries laid out for the CSR SDDMM kernels (built once per pattern and device).

    Entries are ordered as a CSR over ``lhs`` (output features when ``lhs_is_out``, else input
    features), with rows/columns renumbered to the touched ones only. Memory per kept entry: a
    4-byte CSR column and, only when the CSR order differs from the stored order, a 4-byte
    position; the CSR tensors are made per call (sampled_addmm only reads their structure).
    """

    lhs_is_out: bool
    lhs_touched: torch.Tensor | None  # touched lhs features (None: all of them)
    rhs_touched: torch.Tensor | None
    crow: torch.Tensor  # (n_lhs + 1,) CSR row pointers
    col: torch.Tensor  # (nnz,) CSR column (renumbered rhs feature) of each entry
    size: tuple[int, int]  # (n_lhs, n_rhs)
    order: torch.Tensor | None  # entry k of the CSR is kept entry order[k] (None: same order)
    # The compact path's block edges per block size, read back once: on CUDA a .tolist() per call is a host sync.
    edges: dict[int, list[int]] = field(default_factory=dict)


def logical_shape(stored_shape: tuple[int, int], transposed: bool) -> tuple[int, int]:
    """(out_features, in_features) of a weight stored as ``stored_shape``: (in, out) when ``transposed`` (Conv1D)."""
    rows, cols = stored_shape
    return (cols, rows) if transposed else (rows, cols)


@dataclass(eq=False)
class SparsePattern:
    """The kept entries of one stored weight tensor, in the forms the backward needs.

    ``indices`` are sorted flat row-major indices into the *stored* weight of shape
    ``shape`` (``(out, in)`` for ``nn.Linear``; ``(in, out)`` for GPT-2's ``Conv1D``,
    where ``transposed=True``). Row and column of each entry are computed when asked for,
    not stored: at 1% of every linear layer they would cost 16 bytes per entry for the
    whole run, while only the small-nnz and double-backward paths read them.
    """

    indices: torch.Tensor
    shape: tuple[int, int]
    transposed: bool = False
    _plan: CsrPlan | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        # A bool mask passed as ``indices`` would index by 0/1 and train the wrong entries without an error.
        if self.indices.dim() != 1 or self.indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"SparsePattern.indices must be a 1-D int32/int64 tensor of flat indices, got "
                            f"{self.indices.dim()}-D {self.indices.dtype}; for a bool mask pass "
                            "mask.flatten().nonzero().squeeze(1)")

    @property
    def rows(self) -> torch.Tensor:
        """Stored-weight row of each kept entry (computed, O(nnz))."""
        return torch.div(self.indices, self.shape[1], rounding_mode="floor")

    @property
    def cols(self) -> torch.Tensor:
        """Stored-weight column of each kept entry (computed, O(nnz))."""
        return self.indices % self.shape[1]

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
        return logical_shape(self.shape, self.transposed)

    def to(self, device: torch.device) -> SparsePattern:
        """A copy on ``device`` (no-op if already there)."""
        if self.indices.device == torch.device(device):
            return self
        return SparsePattern(self.indices.to(device), self.shape, self.transposed)

    def plan(self) -> CsrPlan:
        """The compact-SDDMM layout (cached)."""
        if self._plan is None:
            self._plan = _make_plan(self)
        return self._plan


def _touched(index: torch.Tensor, size: int, max_fraction: float
             ) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """(touched features or None for all, each entry's renumbered feature, number of touched)."""
    used = torch.zeros(size, dtype=torch.bool, device=index.device)
    used[index] = True
    n_used = int(used.sum())
    if n_used > max_fraction * size:  # copying all is cheaper than an index_select
        return None, index, size
    touched = used.nonzero().squeeze(1)
    renumber = torch.cumsum(used, 0) - 1  # feature -> its rank among the touched ones
    return touched, renumber[index], n_used


def _make_plan(pattern: SparsePattern) -> CsrPlan:
    out_f, in_f = pattern.logical_shape
    native_reads = pattern.indices.device.type == "cpu" and native.available()
    fraction = NATIVE_COMPACT_MAX_FRACTION if native_reads else COMPACT_MAX_FRACTION
    out_touched, out_new, n_out = _touched(pattern.out_index, out_f, fraction)
    in_touched, in_new, n_in = _touched(pattern.in_index, in_f, fraction)
    # The kernel reads its lhs rows in order and its rhs rows at random: put the smaller operand on
    # the rhs so that it stays in cache (for fc2, 768 outputs x 3072 inputs, that is g^T).
    lhs_is_out = n_out >= n_in
    lhs, rhs, n_lhs, n_rhs = (out_new, in_new, n_out, n_in) if lhs_is_out else (in_new, out_new, n_in, n_out)
    key = lhs * n_rhs + rhs
    # The kept entries' own order is row-major in the stored weight; the CSR needs (lhs, rhs) order.
    in_order = bool((key[1:] > key[:-1]).all()) if key.numel() > 1 else True
    order = None if in_order else torch.argsort(key)
    del key
    if order is not None:
        lhs, rhs = lhs[order], rhs[order]
    index = index_dtype(max(pattern.nnz, n_rhs))
    counts = torch.bincount(lhs, minlength=n_lhs)
    crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(index)
    return CsrPlan(lhs_is_out, out_touched if lhs_is_out else in_touched,
                 in_touched if lhs_is_out else out_touched, crow, rhs.to(index), (n_lhs, n_rhs),
                 None if order is None else order.to(index_dtype(pattern.nnz)))


__all__ = [
    "COMPACT_MAX_FRACTION",
    "INT32_INDEX_LIMIT",
    "NATIVE_COMPACT_MAX_FRACTION",
    "CsrPlan",
    "SparsePattern",
    "index_dtype",
    "logical_shape",
]
