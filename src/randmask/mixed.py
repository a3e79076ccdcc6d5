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
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from randmask.compiled_mixed import compiled_grouped_delta
from randmask.config import MaskingError
from randmask.delta import sparse_delta
from randmask.pattern import SparsePattern, index_dtype
from randmask.sddmm import compute_dtype
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


@dataclass(frozen=True)
class IndexTables:
    """One layer's gathered layout: every member adapter's kept entries as (output, input) feature indices, padded
    to the largest member's count N, plus a last all-padding member for rows without an adapter (or whose adapter
    does not target this layer). A padded entry reads input 0 and adds 0 * x to output 0."""

    members: tuple[MaskAdapter | None, ...]
    # (members + 1, N) feature indices in the narrowest dtype that holds the layer's features (index_dtype): int16 up
    # to 32,768 features (a quarter of int64's memory, kept per layer), widened per batch (gathered_delta).
    out_index: torch.Tensor
    in_index: torch.Tensor  # (members + 1, N)
    # values(dtype)'s last stacked values and what they were read from; shared by the copies that layer_tables makes
    # with dataclasses.replace, so a layer's decode steps reuse it.
    _values_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def width(self) -> int:
        return self.out_index.shape[1]

    @classmethod
    def build(cls, members: Sequence[MaskAdapter | None], device: torch.device,
              cached_patterns: bool = False) -> IndexTables:
        """``cached_patterns``: read each adapter's cached ``pattern()`` (eager); off under ``torch.compile``, which
        traces the index arithmetic from the adapter's indices instead."""
        present = [a for a in members if a is not None]
        width = max([a.nnz for a in present] or [0])
        # int16 up to 32,768 features (any attention or MLP matrix of today's LLMs), then int32, then int64.
        dtype = index_dtype(max(present[0].stored_shape) - 1 if present else 0, smallest=torch.int16)
        outs, ins = [], []
        for adapter in [*members, None]:
            if adapter is None:
                outs.append(torch.zeros(width, dtype=dtype, device=device))
                ins.append(outs[-1])
                continue
            pattern = (adapter.pattern() if cached_patterns
                       else SparsePattern(adapter.indices, adapter.stored_shape, adapter.transposed))
            pad = (0, width - adapter.nnz)
            outs.append(torch.nn.functional.pad(pattern.out_index.to(device, dtype), pad))
            ins.append(torch.nn.functional.pad(pattern.in_index.to(device, dtype), pad))
        return cls(tuple(members), torch.stack(outs), torch.stack(ins))

    def values(self, dtype: torch.dtype) -> torch.Tensor:
        """(members + 1, N) every member's values in ``dtype``, zero-padded.

        With gradients on they are stacked in every call, so gradients reach them. Without (``generate``, eval) the
        last stack is reused while every member's values are the same tensor, storage and version: an in-place edit
        (an optimizer step, ``load_state_dict``) bumps the version, ``.data =`` moves the storage, and either rebuilds.
        """
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._stacked(dtype)
        tensors = [a.values for a in self.members if a is not None]
        read = (dtype, torch.is_inference_mode_enabled(), tuple((t.data_ptr(), t._version) for t in tensors))
        cached = self._values_cache.get("last")
        if cached is not None:
            refs, cached_read, stacked = cached
            if cached_read == read and all(ref() is t for ref, t in zip(refs, tensors, strict=True)):
                return stacked
        stacked = self._stacked(dtype)
        self._values_cache["last"] = (tuple(weakref.ref(t) for t in tensors), read, stacked)
        return stacked

    def _stacked(self, dtype: torch.dtype) -> torch.Tensor:
        pad = lambda adapter: (0, self.width - adapter.nnz)  # noqa: E731
        zeros = self.out_index.new_zeros(self.width, dtype=dtype)
        return torch.stack([torch.nn.functional.pad(a.values.to(dtype), pad(a)) if a is not None else zeros
                            for a in [*self.members, None]])


def gathered_delta(x: torch.Tensor, out_features: int, tables: IndexTables, row_member: torch.Tensor) -> torch.Tensor:
    """Each row's member adapter's sparse delta: (B, ..., in) -> (B, ..., out), in fp32 (fp64 for fp64 x).

    ``row_member`` (B,) int64 picks each row's member of ``tables`` (the last one: no adapter). The per-row form of
    ``randmask.delta.sparse_delta_reference``: O(B x tokens x N) memory, one gather and one scatter-add.
    """
    compute = compute_dtype(x)  # as the eager delta: rounded once
    rows, in_f, width = x.shape[0], x.shape[-1], tables.width
    x3 = x.reshape(rows, -1, in_f).to(compute)  # (B, T, in)
    tokens = x3.shape[1]
    # gather and scatter_add take int64 only: widened per batch, after the rows' members are picked (B x N)
    out_index = tables.out_index[row_member].long()[:, None, :].expand(rows, tokens, width)  # (B, T, N)
    in_index = tables.in_index[row_member].long()[:, None, :].expand(rows, tokens, width)
    contrib = x3.gather(2, in_index) * tables.values(compute)[row_member][:, None, :]  # (B, T, N)
    delta = x3.new_zeros(rows, tokens, out_features).scatter_add(2, out_index, contrib)  # (B, T, out)
    return delta.reshape(*x.shape[:-1], out_features)


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
        tables = IndexTables.build([_member(adapters, name) for name, _ in groups.groups], x.device,
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


# base layer -> (weak references to the slots' adapters, their tables without the adapters): weak, so that an
# adapter deleted from the model (PEFT's delete_adapter) is not kept alive by the cache of a layer that serves no
# batch after it.
_LAYER_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def layer_tables(base_layer: nn.Module, adapters: Mapping[str, MaskAdapter], slots: Sequence[str],
                 device: torch.device) -> IndexTables:
    """One layer's gathered tables over ``slots`` (the model's adapters), kept across batches while the slots hold
    the same adapter objects on ``device`` (an adapter's mask never changes; adding or removing one rebuilds)."""
    members = tuple(_member(adapters, name) for name in slots)
    cached = _LAYER_TABLES.get(base_layer)
    if cached is not None:
        refs, kept = cached
        if (kept.out_index.device == torch.device(device) and len(refs) == len(members)
                and all((ref() if ref is not None else None) is a for ref, a in zip(refs, members))):
            return replace(kept, members=members)
    tables = IndexTables.build(members, device, cached_patterns=True)
    refs = tuple(weakref.ref(a) if a is not None else None for a in members)
    _LAYER_TABLES[base_layer] = (refs, replace(tables, members=()))
    return tables


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
    members = [_member(adapters, name) for name in groups.slots]
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


def _member(adapters: Mapping[str, MaskAdapter], name: str) -> MaskAdapter | None:
    return adapters[name] if name in adapters else None  # (an nn.ModuleDict has no .get)


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


__all__ = ["BASE_ADAPTER", "GATHERED_MAX_ELEMENTS", "IndexTables", "RowGroups", "TRACED_GATHERED_MAX_ELEMENTS",
           "check_adapter_names", "gathered_delta", "group_rows", "layer_tables", "mixed_forward", "row_groups_set",
           "traced_mixed_forward"]
