"""Mixed batches: every sample of a batch through its own adapter, on the delta path.

During a mixed batch no adapter lives in a weight: each masked layer computes the frozen layer
on the whole batch, then adds, for every adapter named in the batch, that adapter's sparse delta
on the rows (samples) that asked for it::

    y = base(x)                                        # (B, ..., out), W = W0 everywhere
    y[rows_a] += sparse_delta(x[rows_a], values_a, D_a)  # one SpMM per adapter group

Two layouts of the same ``sparse_delta`` compute that sum, chosen per call: one call per group, or
one call for the whole batch over its block-diagonal delta (``randmask.grouped_delta``: best when a
call per group is what costs, as in decode with one token per row and many adapters). The choice:
the block-diagonal call while (its entries) x (tokens per row) <= ``GROUPED_MAX_ELEMENTS``.

Under ``torch.compile`` a third layout runs, traced without a graph break and without a recompile per batch:
every adapter of the model has a slot, each slot's kept entries are padded to the layer's largest adapter, and
each row gathers its slot's entries (``traced_mixed_forward``). Its shapes depend on which adapters the model has,
never on which rows ask for which, so a new mix of names reuses the compiled graph; its memory is O(rows x tokens
x the largest adapter's entries), the per-row form of ``randmask.delta.sparse_delta_reference``.

Rows named ``"__base__"`` (``BASE_ADAPTER``) get the frozen layer alone, as do rows whose adapter
does not target this layer. The same function serves the free-function API (``mixed_batch``) and
the PEFT tuner (``adapter_names=[...]`` in ``forward`` / ``generate``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from randmask.config import MaskingError
from randmask.delta import sparse_delta
from randmask.grouped_delta import BlockDiagonal, block_diagonal, grouped_sparse_delta
from randmask.ops import SparsePattern
from randmask.sharding import is_sharded

if TYPE_CHECKING:
    from randmask.layer import MaskAdapter

BASE_ADAPTER = "__base__"
"""The name that asks for the frozen base model (no adapter) in a mixed batch, as in PEFT."""
GROUPED_MAX_ELEMENTS = 1 << 22
"""(Block-diagonal entries) x (tokens per row) above which one SpMM per group runs instead. Both do the
same multiply-adds; the block-diagonal call saves a call per group but copies x tokens-first when a row
has more than one token (benchmarks/mixed_batch.py --kernels times both)."""


@dataclass(frozen=True)
class RowGroups:
    """The rows of a batch grouped by adapter (``BASE_ADAPTER`` rows are in no group)."""

    names: tuple[str, ...]  # adapter of each row
    groups: tuple[tuple[str, torch.Tensor], ...]  # (adapter, sorted row indices), in first-seen order
    spans: tuple[tuple[int, int] | None, ...]  # (start, stop) where a group's rows are contiguous
    # The model's adapters, sorted (``with_slots``), and each row's position in them (len(slots): no adapter). The
    # traced layout reads only these: the same slots for every batch of one model, so one compiled graph serves all.
    slots: tuple[str, ...] = ()
    row_slot: torch.Tensor | None = None  # (rows,) int64
    _on_device: dict = field(default_factory=dict, compare=False, repr=False)
    _layouts: dict = field(default_factory=dict, compare=False, repr=False)  # id(adapters) -> BlockDiagonal
    _pairs: dict = field(default_factory=dict, compare=False, repr=False)  # id(adapters) -> block-diagonal nnz

    @property
    def rows(self) -> int:
        return len(self.names)

    def pairs(self, adapters: Mapping[str, MaskAdapter]) -> int:
        """Entries of one layer's block-diagonal delta (sum over rows of the row's adapter's nnz), cached."""
        key = id(adapters)
        if key not in self._pairs:
            self._pairs[key] = sum(rows.numel() * adapters[name].nnz for name, rows in self.groups if name in adapters)
        return self._pairs[key]

    def block_diagonal(self, adapters: Mapping[str, MaskAdapter]) -> BlockDiagonal:
        """One layer's block-diagonal delta pattern (built on first use, kept for the batch)."""
        key = id(adapters)
        if key not in self._layouts:
            patterns = {name: adapters[name].pattern() for name, _ in self.groups if name in adapters}
            self._layouts[key] = block_diagonal(self.groups, patterns, self.rows)
        return self._layouts[key]

    def with_slots(self, known: Iterable[str]) -> RowGroups:
        """These groups with a slot for each of the model's adapters ``known`` (all of them, not only this batch's)."""
        slots = tuple(sorted(set(known)))
        position = {name: i for i, name in enumerate(slots)}
        row_slot = torch.tensor([position.get(name, len(slots)) for name in self.names], dtype=torch.long)
        return RowGroups(self.names, self.groups, self.spans, slots, row_slot)

    def rows_on(self, device: torch.device) -> list[torch.Tensor]:
        """Each group's row indices on ``device`` (cached)."""
        if device not in self._on_device:
            self._on_device[device] = [rows.to(device) for _, rows in self.groups]
        return self._on_device[device]


def group_rows(adapter_names: Sequence[str], rows_per_name: int = 1) -> RowGroups:
    """Group the rows of a batch by adapter; each name covers ``rows_per_name`` consecutive rows.

    ``rows_per_name`` > 1 is how ``generate`` lays out beams and returned sequences: every prompt
    repeated that many times in a row (``repeat_interleave``).
    """
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise MaskingError(f"adapter_names must be a list with one adapter name per sample (or '{BASE_ADAPTER}'), "
                           f"got {type(adapter_names).__name__}.")
    if not adapter_names or not all(isinstance(n, str) for n in adapter_names):
        raise MaskingError(f"adapter_names must be a non-empty list of strings, one per sample, got {adapter_names!r}.")
    if not isinstance(rows_per_name, int) or rows_per_name < 1:
        raise MaskingError(f"rows_per_name={rows_per_name!r} must be a positive int (e.g. num_beams).")
    names = tuple(n for n in adapter_names for _ in range(rows_per_name))
    positions: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        if name != BASE_ADAPTER:
            positions.setdefault(name, []).append(row)
    groups = tuple((name, torch.tensor(rows, dtype=torch.long)) for name, rows in positions.items())
    spans = tuple((rows[0], rows[-1] + 1) if rows[-1] - rows[0] + 1 == len(rows) else None
                  for rows in positions.values())
    return RowGroups(names, groups, spans)


def mixed_forward(base_layer: nn.Module, x: torch.Tensor, adapters: Mapping[str, MaskAdapter],
                  groups: RowGroups) -> torch.Tensor:
    """The frozen layer on every row plus each group's sparse delta on its rows: (B, ..., in) -> (B, ..., out).

    The caller guarantees that ``base_layer``'s weight holds no adapter (W0 at every entry).
    """
    if torch.compiler.is_compiling() and groups.row_slot is not None:
        return traced_mixed_forward(base_layer, x, adapters, groups)
    if x.dim() < 2 or x.shape[0] != groups.rows:
        raise MaskingError(f"a mixed batch names {groups.rows} samples but a masked layer got input of shape "
                           f"{tuple(x.shape)} (batch first expected). Pass one adapter name per sample; under "
                           "generate() with num_beams or num_return_sequences, one per prompt (they are expanded).")
    y = base_layer(x)  # (B, ..., out)
    pairs = groups.pairs(adapters)
    if pairs == 0:  # no row asks for an adapter of this layer (or its masks are empty): the frozen layer alone
        return y
    # In place when no graph is recorded (y is a fresh output); out of place otherwise, so autograd sees it.
    in_place = not (torch.is_grad_enabled() and (x.requires_grad or _any_grad(adapters, groups)))
    if pairs * (x[0].numel() // x.shape[-1]) <= GROUPED_MAX_ELEMENTS:
        values = {name: adapters[name].values for name, _ in groups.groups if name in adapters}
        delta = grouped_sparse_delta(x, values, groups.block_diagonal(adapters)).to(y.dtype)  # (B, ..., out)
        return y.add_(delta) if in_place else y + delta
    for (name, _), rows, span in zip(groups.groups, groups.rows_on(x.device), groups.spans):
        if name not in adapters:
            continue
        adapter = adapters[name]
        if span is not None:  # contiguous rows: a view, no copy
            start, stop = span
            delta = sparse_delta(x[start:stop], adapter.values, adapter.pattern()).to(y.dtype)  # (b, ..., out)
            if in_place:
                y[start:stop] += delta
            else:
                y = torch.cat([y[:start], y[start:stop] + delta, y[stop:]])
        else:
            delta = sparse_delta(x.index_select(0, rows), adapter.values, adapter.pattern()).to(y.dtype)
            y = y.index_add_(0, rows, delta) if in_place else y.index_add(0, rows, delta)
    return y


def traced_mixed_forward(base_layer: nn.Module, x: torch.Tensor, adapters: Mapping[str, MaskAdapter],
                       groups: RowGroups) -> torch.Tensor:
    """``mixed_forward`` for ``torch.compile``: the frozen layer on every row plus each row's slot's delta, by gather
    and scatter-add over the slots' padded entries. (B, ..., in) -> (B, ..., out). Needs ``groups.with_slots``."""
    row_slot = groups.row_slot
    if x.dim() < 2 or x.shape[0] != row_slot.shape[0]:
        raise MaskingError(f"a mixed batch names {row_slot.shape[0]} samples but a masked layer got input of shape "
                           f"{tuple(x.shape)} (batch first expected). Pass one adapter name per sample; under "
                           "generate() with num_beams or num_return_sequences, one per prompt (they are expanded).")
    y = base_layer(x)  # (B, ..., out)
    present = [adapters[name] if name in adapters else None for name in groups.slots]
    width = max([a.nnz for a in present if a is not None] or [0])  # N: the layer's largest adapter
    if width == 0:  # no adapter of the model targets this layer (or its masks are empty)
        return y
    # Per slot, and a last one for rows without an adapter: (S+1, N) output and input features and values. A
    # padded entry reads input 0 and adds 0 * x to output 0.
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32  # as the eager delta: fp32, rounded once
    outs, ins, values = [], [], []
    for adapter in [*present, None]:
        if adapter is None:
            zeros = torch.zeros(width, dtype=torch.long, device=x.device)
            outs.append(zeros)
            ins.append(zeros)
            values.append(torch.zeros(width, dtype=compute, device=x.device))
            continue
        pattern = SparsePattern(adapter.indices, adapter.stored_shape, adapter.transposed)
        pad = (0, width - adapter.nnz)
        outs.append(torch.nn.functional.pad(pattern.out_index.long(), pad))
        ins.append(torch.nn.functional.pad(pattern.in_index.long(), pad))
        values.append(torch.nn.functional.pad(adapter.values.to(compute), pad))
    slot = row_slot.to(x.device)
    rows, in_f, out_f = x.shape[0], x.shape[-1], y.shape[-1]
    x3 = x.reshape(rows, -1, in_f).to(compute)  # (B, T, in)
    tokens = x3.shape[1]
    out_index = torch.stack(outs)[slot][:, None, :].expand(rows, tokens, width)  # (B, T, N)
    in_index = torch.stack(ins)[slot][:, None, :].expand(rows, tokens, width)
    contrib = x3.gather(2, in_index) * torch.stack(values)[slot][:, None, :]  # (B, T, N)
    delta = x3.new_zeros(rows, tokens, out_f).scatter_add(2, out_index, contrib)  # (B, T, out)
    return y + delta.reshape(y.shape).to(y.dtype)


def _any_grad(adapters: Mapping[str, MaskAdapter], groups: RowGroups) -> bool:
    return any(name in adapters and adapters[name].values.requires_grad for name, _ in groups.groups)


def check_adapter_names(groups: RowGroups, known: Iterable[str]) -> None:
    """MaskingError naming any adapter of ``groups`` that the model does not have."""
    known = set(known)
    unknown = sorted({name for name, _ in groups.groups} - known)
    if unknown:
        raise MaskingError(f"adapter_names holds {unknown}, which this model does not have; it has {sorted(known)} "
                           f"(and '{BASE_ADAPTER}' for the base model).")


@contextlib.contextmanager
def row_groups_set(layers: Sequence[nn.Module], groups: RowGroups) -> Iterator[None]:
    """Set ``layer.row_groups`` on every layer for the duration (the layers then run ``mixed_forward``)."""

    if any(getattr(layer, "row_groups", None) is not None for layer in layers):
        raise MaskingError("a mixed batch is already running on this model; mixed batches do not nest.")
    if any(is_sharded(layer.base_layer.weight) for layer in layers):
        raise MaskingError("mixed batches run on unsharded weights; this model is sharded (FSDP2 / DTensor). Serve "
                           "an unsharded copy (load the adapters onto a plain model), or set_adapter per batch.")
    for layer in layers:
        layer.row_groups = groups
    try:
        yield
    finally:
        for layer in layers:
            layer.row_groups = None


__all__ = ["BASE_ADAPTER", "RowGroups", "check_adapter_names", "group_rows", "mixed_forward", "row_groups_set",
           "traced_mixed_forward"]
