"""A mixed batch's gathered layout: each row gathers its adapter's kept entries, padded to the layer's largest adapter
(N entries), scales them by its values and scatter-adds them into its outputs, in one call for the whole batch
whatever the number of adapters. ``randmask.mixed`` decides when it runs; this module builds one layer's index tables
(``IndexTables``, kept across batches by ``layer_tables``) and computes the delta (``gathered_delta``)."""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from randmask.pattern import SparsePattern, index_dtype
from randmask.sddmm import compute_dtype

if TYPE_CHECKING:
    from randmask.adapter import MaskAdapter


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
        if any(t.is_inference() for t in tensors):  # made under inference_mode: no version counter to key a cache on
            return self._stacked(dtype)
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


# base layer -> (weak references to the slots' adapters, their tables without the adapters): weak, so that an
# adapter deleted from the model (PEFT's delete_adapter) is not kept alive by the cache of a layer that serves no
# batch after it.
_LAYER_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def layer_tables(base_layer: nn.Module, adapters: Mapping[str, MaskAdapter], slots: Sequence[str],
                 device: torch.device) -> IndexTables:
    """One layer's gathered tables over ``slots`` (the model's adapters), kept across batches while the slots hold
    the same adapter objects on ``device`` (an adapter's mask never changes; adding or removing one rebuilds)."""
    members = tuple(slot_member(adapters, name) for name in slots)
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


def slot_member(adapters: Mapping[str, MaskAdapter], name: str) -> MaskAdapter | None:
    """The adapter named ``name`` of a layer, or None where it has none of that name (it does not target the layer)."""
    return adapters[name] if name in adapters else None  # (an nn.ModuleDict has no .get)


__all__ = ["IndexTables", "gathered_delta", "layer_tables", "slot_member"]
