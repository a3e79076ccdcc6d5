"""Mixed batches: every sample of a batch through its own adapter, on the delta path.

During a mixed batch no adapter lives in a weight: each masked layer computes the frozen layer
on the whole batch, then adds, for every adapter named in the batch, that adapter's sparse delta
on the rows (samples) that asked for it::

    y = base(x)                                        # (B, ..., out), W = W0 everywhere
    y[rows_a] += sparse_delta(x[rows_a], values_a, D_a)  # one SpMM per adapter group

Two layouts of the same sum, chosen per call. The gathered layout: each row gathers its adapter's kept entries,
padded to the layer's largest adapter (N entries), scales them by its values and scatter-adds them into its
outputs, in one call for the whole batch whatever the number of adapters (``gathered_delta``). It costs
O(rows x tokens x N), so above ``GATHERED_MAX_ELEMENTS`` one ``sparse_delta`` SpMM per adapter group runs instead,
whose calls then cost less than the padded product (a long prefill, dense adapters).

Under ``torch.compile`` (``traced_mixed_forward``) the slots are every adapter of the model
(``RowGroups.with_slots``), never only the batch's: the shapes then depend on which adapters the model has, never on
which rows ask for which, so a new mix of names reuses the compiled graph without a break. The gathered layout runs up
to ``TRACED_GATHERED_MAX_ELEMENTS``; above, one SpMM per adapter group inside opaque custom ops
(``randmask.compiled_mixed``). Eager, the same slots serve, and each layer keeps its index tables across batches
until its adapters change (and, without gradients, its stack of values until they change).

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

from randmask.compiled_mixed import compiled_grouped_delta
from randmask.config import MaskingError
from randmask.delta import sparse_delta
from randmask.gathered import IndexTables, gathered_delta, layer_tables, slot_member
from randmask.sharding import is_sharded

if TYPE_CHECKING:
    from randmask.adapter import MaskAdapter

BASE_ADAPTER = "__base__"
"""The name that asks for the frozen base model (no adapter) in a mixed batch, as in PEFT."""
GATHERED_MAX_ELEMENTS = 1 << 19
"""(Rows) x (tokens per row) x (the layer's largest adapter's entries) above which an eager mixed batch runs one
SpMM per adapter group instead of the gathered layout: it bounds the gathered products' memory (2 MiB of fp32 per
layer) where neither layout is reliably faster. ``benchmarks/mixed_layouts.py`` (768 x 768, 32 rows, adapters at
1e-3, N = 640; benchmarks/results/mixed_layouts_{8,32}.json): at 1-4 tokens per row the gathered layout is faster
(1.60 against 6.10 of the plain layer at 1 token over 32 adapters); from 16 tokens which one is faster changes from
run to run and with the adapter count."""
TRACED_GATHERED_MAX_ELEMENTS = 1 << 26
"""The same bound under ``torch.compile``: above it the compiled graph runs one SpMM per adapter group inside opaque
custom ops (``randmask.compiled_mixed``), whose memory is one layer output (``benchmarks/mixed_layouts.py
--compiled`` times both)."""


@dataclass(frozen=True)
class RowGroups:
    """The rows of a batch grouped by adapter (``BASE_ADAPTER`` rows are in no group)."""

    names: tuple[str, ...]  # adapter of each row
    groups: tuple[tuple[str, torch.Tensor], ...]  # (adapter, sorted row indices), in first-seen order
    spans: tuple[tuple[int, int] | None, ...]  # (start, stop) where a group's rows are contiguous
    # The model's adapters, sorted (``with_slots``), and each row's position in them (len(slots): no adapter). The
    # gathered layout reads these: the same slots for every batch of one model, so one compiled graph serves all and
    # each layer keeps its tables across batches (``layer_tables``).
    slots: tuple[str, ...] = ()
    row_slot: torch.Tensor | None = None  # (rows,) int64
    _on_device: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def rows(self) -> int:
        return len(self.names)

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

    def row_members(self, device: torch.device) -> torch.Tensor:
        """(rows,) int64 on ``device``, cached (one copy per batch, not per layer): each row's slot
        (``with_slots``), or without slots its position in ``groups``; the last position for a row without one."""
        key = ("row_members", device)
        if key not in self._on_device:
            if self.row_slot is not None:
                self._on_device[key] = self.row_slot.to(device)
            else:
                position = {name: i for i, (name, _) in enumerate(self.groups)}
                self._on_device[key] = torch.tensor([position.get(name, len(self.groups)) for name in self.names],
                                                    dtype=torch.long, device=device)
        return self._on_device[key]


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
    _check_rows(x, groups.rows)
    y = base_layer(x)  # (B, ..., out)
    if not any(name in adapters and adapters[name].nnz for name, _ in groups.groups):
        return y  # no row asks for an adapter of this layer (or its masks are empty): the frozen layer alone
    # In place when no graph is recorded (y is a fresh output); out of place otherwise, so autograd sees it.
    in_place = not (torch.is_grad_enabled() and (x.requires_grad or _any_grad(adapters, groups)))
    if groups.row_slot is not None:  # slots over the model's adapters: tables kept on the layer across batches
        tables = layer_tables(base_layer, adapters, groups.slots, x.device)
    else:  # slots over this batch's groups (a RowGroups made without with_slots)
        tables = IndexTables.build([slot_member(adapters, name) for name, _ in groups.groups], x.device,
                                   cached_patterns=True)
    if x.numel() // x.shape[-1] * tables.width <= GATHERED_MAX_ELEMENTS:  # rows x tokens x N
        delta = gathered_delta(x, y.shape[-1], tables, groups.row_members(x.device)).to(y.dtype)  # (B, ..., out)
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
    """``mixed_forward`` for ``torch.compile``, over a slot for every adapter of the model: (B, ..., in) -> (B, ...,
    out). Needs ``groups.with_slots``.

    Up to ``TRACED_GATHERED_MAX_ELEMENTS`` the gathered layout, its tables traced into the graph. Above (a long
    prefill, dense adapters) eager's one SpMM per adapter group, inside opaque custom ops
    (``randmask.compiled_mixed``): the gathered (B, tokens, N) product is materialised (inductor does not fuse it
    into the scatter), and selecting rows per adapter in the graph would make its shapes depend on the mix of
    names. Dynamo guards on the size: at most a graph of each kind.
    """
    row_slot = groups.row_slot
    _check_rows(x, row_slot.shape[0])  # the count from the tensor: no guard on the names
    y = base_layer(x)  # (B, ..., out)
    members = [slot_member(adapters, name) for name in groups.slots]
    width = max([a.nnz for a in members if a is not None] or [0])
    if width == 0:  # no adapter of the model targets this layer (or its masks are empty)
        return y
    row_slot = row_slot.to(x.device)
    if x.numel() // x.shape[-1] * width <= TRACED_GATHERED_MAX_ELEMENTS:  # rows x tokens x N
        tables = IndexTables.build(members, x.device)
        return y + gathered_delta(x, y.shape[-1], tables, row_slot).to(y.dtype)
    present = [a for a in members if a is not None]
    empty = present[0].indices.new_zeros(0)  # the slot of an adapter that does not target this layer
    values = [a.values if a is not None else present[0].values.new_zeros(0) for a in members]
    indices = [a.indices if a is not None else empty for a in members]
    delta = compiled_grouped_delta(x, row_slot, values, indices, present[0].stored_shape, present[0].transposed)
    return y + delta.to(y.dtype)


def _check_rows(x: torch.Tensor, rows: int) -> None:
    if x.dim() < 2 or x.shape[0] != rows:
        raise MaskingError(f"a mixed batch names {rows} samples but a masked layer got input of shape "
                           f"{tuple(x.shape)} (batch first expected). Pass one adapter name per sample; under "
                           "generate() with num_beams or num_return_sequences, one per prompt (they are expanded).")


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


# IndexTables, gathered_delta and layer_tables are named again here: randmask.mixed's public API before they moved.
__all__ = ["BASE_ADAPTER", "GATHERED_MAX_ELEMENTS", "IndexTables", "RowGroups", "TRACED_GATHERED_MAX_ELEMENTS",
           "check_adapter_names", "gathered_delta", "group_rows", "layer_tables", "mixed_forward", "row_groups_set",
           "traced_mixed_forward"]
