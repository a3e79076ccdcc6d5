"""One named adapter of a masked layer: trainable ``values`` (the delta from W0, fp32 master copy) at fixed flat
``indices`` of the stored weight, the W0 it holds at those entries while it is written into the weight, and the ways
its delta reaches the layer's output (written in place: ``linear``; beside the weight: ``delta``, ``add_delta``,
``linear_beside``). ``randmask.layer.MaskedLayer`` (free API) and ``randmask.peft_layer.RandMaskLayer`` (PEFT) hold
them; see ``randmask.layer`` for when each way is taken."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from randmask.compiled import compiled_masked_linear, compiled_sparse_delta
from randmask.config import MaskingError
from randmask.delta import sparse_delta, sparse_delta_reference
from randmask.ops import dense_linear, masked_linear
from randmask.paths import func_transform_active
from randmask.pattern import SparsePattern, index_dtype
from randmask.quantized import base_entries
from randmask.sharding import full_tensor, is_sharded, write_entries


def _no_weight() -> None:
    return None


@dataclass(frozen=True)
class Block:
    """A row range [start, stop) of the logical (out, in) matrix masked as one matrix."""

    name: str
    start: int
    stop: int
    nnz: int


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` (no dispatch when it already is: the hot-swap counts calls)."""
    return t if t.dtype == dtype else t.to(dtype)


class MaskAdapter(nn.Module):
    """One named adapter of a masked layer: trainable ``values`` at fixed ``indices``."""

    def __init__(self, indices: torch.Tensor, base_values: torch.Tensor, stored_shape: tuple[int, int],
                 transposed: bool, blocks: list[Block], kind: str, explicit_indices: bool,
                 weight: torch.Tensor | None = None) -> None:
        super().__init__()
        device = base_values.device
        master_dtype = torch.float64 if base_values.dtype == torch.float64 else torch.float32
        # Values are the delta from W0, zero-initialised; fp32 master copy even for half weights,
        # so that updates smaller than a bf16 ulp still accumulate.
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=master_dtype, device=device))
        # int32 where the matrix's flat positions fit (half of int64's 8 B per entry, kept per adapter); widened per
        # write, since scatter_ takes int64 only.
        self.register_buffer("indices", indices.to(device, index_dtype(stored_shape[0] * stored_shape[1] - 1)),
                             persistent=False)
        # Pristine W0 at the kept entries: what restore_base writes back on the in-place path. Held only while
        # this adapter is the live one (``release_base``): 4 B per entry of every other adapter is the weight's own.
        self.register_buffer("base_values", base_values.detach().clone(), persistent=False)
        self.stored_shape = tuple(stored_shape)
        self.transposed = transposed
        self.blocks = blocks
        self.kind = kind
        self.explicit_indices = explicit_indices  # custom masks: indices are saved in the file
        self._pattern: SparsePattern | None = None
        # values._version when MaskedLayer.sync last made the weight hold W0 (+) values (-1: never).
        self.synced_version = -1
        # The weight parameter this adapter writes into. Another object in its place at a forward (FSDP's
        # all-gathered copy, freed after the forward) means the delta must be written again for the backward.
        self._weight = weakref.ref(weight) if weight is not None else _no_weight

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    def __getstate__(self) -> dict:
        # A weak reference does not pickle; a copy then refreshes at every backward (correct, O(nnz) more).
        return {**super().__getstate__(), "_weight": _no_weight}

    def pattern(self) -> SparsePattern:
        """The sparse pattern on the indices' current device (cached)."""
        if self._pattern is None or self._pattern.indices.device != self.indices.device:
            self._pattern = SparsePattern(self.indices, self.stored_shape, self.transposed)
        return self._pattern

    def release_base(self) -> None:
        """Drop the held W0 at the kept entries: the weight holds them itself while this adapter is not written
        into it (not active, or a delta-path layer, which never writes). ``capture_base`` reads them back."""
        self._buffers["base_values"] = None  # (the dict itself: nn.Module.__setattr__ costs a hot-swap µs)

    def capture_base(self, module: nn.Module) -> None:
        """Hold W0 at the kept entries again, read from ``module``'s weight, which must hold W0 there: no adapter
        written into it. O(nnz); a sharded (DTensor) weight is gathered (every rank must call this)."""
        if self.base_values is None:
            self.hold_base(base_entries(module, self.indices))

    def hold_base(self, entries: torch.Tensor) -> None:
        """Hold ``entries`` (nnz,), read from a weight that holds W0 at the kept entries, as this adapter's W0."""
        self._buffers["base_values"] = entries

    def held_base(self) -> torch.Tensor:
        """The held W0 at the kept entries (the active adapter of an in-place layer holds them)."""
        if self.base_values is None:
            raise MaskingError("internal: W0 at an adapter's entries was released; the layer must capture_base "
                               "before it writes this adapter into its weight.")
        return self.base_values

    def target_entries(self, weight_dtype: torch.dtype) -> torch.Tensor:
        """W0 (+) values in the weight dtype: what the weight holds at the kept entries. Outside a forward of an
        FSDP2 model ``values`` is a DTensor: its whole is gathered (every rank must call this)."""
        values = full_tensor(self.values.detach())
        return torch.add(as_dtype(self.held_base(), weight_dtype), as_dtype(values, weight_dtype))

    def writes_into(self, weight: torch.Tensor) -> bool:
        """Whether ``weight`` is the parameter this adapter writes into (so it keeps the delta until the backward)."""
        return self._weight() is weight

    def weight_replaced(self) -> bool:
        """Whether the parameter this adapter writes into is gone: FSDP2's ``fully_shard`` replaced it with a sharded
        one (and its forward with a gathered copy), or this adapter is a copy (``copy.deepcopy``). Read without
        touching a tensor, so that ``torch.compile`` guards on it alike for every layer. Always True on the delta
        path, which writes no weight."""
        return self._weight() is None

    def refresh_for_backward(self, weight: torch.Tensor) -> torch.Tensor | None:
        """None when this adapter writes into ``weight``; else the entries the op must write again before its
        backward reads ``weight`` (see the module doc)."""
        return None if self.writes_into(weight) else self.target_entries(weight.dtype)

    def write(self, weight: torch.Tensor, entries: torch.Tensor) -> None:
        """Write ``entries`` (nnz,) at this adapter's kept entries of ``weight``, in place and outside autograd (the
        weight is frozen); a sharded (DTensor) weight: this rank's shard."""
        if is_sharded(weight):
            write_entries(weight, self.indices, entries)
            return
        # scatter_ on a detached flat view: the weight's own storage, and its version counter still bumps (Dynamo
        # traces detach(), not .data). scatter_ runs 2-4x faster than index_put_ (``w[idx] = v``) at a few
        # thousand entries on CPU.
        weight.detach().view(-1).scatter_(0, as_dtype(self.indices, torch.int64), entries)

    def delta(self, x: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """The delta path's ``x @ D^T``, (..., in) -> (..., out): the weight is never written (a quantized base).
        ``values``: these instead of the adapter's (``linear_beside``'s correction)."""
        values = self.values if values is None else values
        if torch.compiler.is_compiling():  # traced without a graph break (randmask.compiled)
            return compiled_sparse_delta(x, values, self.indices, self.stored_shape, self.transposed)
        if func_transform_active():  # plain differentiable ops: grad, vmap, jvp and double backward go through
            return sparse_delta_reference(x, values, self.pattern())
        return sparse_delta(x, values, self.pattern())

    def add_delta(self, base_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The delta path's output, ``base(x) + x @ D^T``, given ``base_out`` = base(x); MaskingError when the base's
        output is not the adapter's width: its weight changed shape after masking (``resize_token_embeddings`` swaps a
        tied embedding's data in place, which no hook sees)."""
        out_f = self.stored_shape[1] if self.transposed else self.stored_shape[0]
        if base_out.shape[-1] != out_f:
            raise MaskingError(f"the masked layer's base now gives {base_out.shape[-1]} outputs, its adapter was made "
                               f"for {out_f}: its weight changed shape after masking (resize_token_embeddings?), and "
                               "the adapter's entries index the old one. Resize before masking, or unload the adapter "
                               "first.")
        return base_out + self.delta(x)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's output through ``weight``, which holds W0 (+) values at the kept entries; dL/dvalues by SDDMM,
        never the dense dL/dW."""
        # Traced without a graph break (randmask.compiled), unless the weight is not the one this adapter writes
        # (FSDP2's gathered copy, gathered again for the backward, takes linear_beside before this): then the eager
        # op below, which writes the delta again (a break, run eagerly).
        if torch.compiler.is_compiling() and self.writes_into(weight):
            return compiled_masked_linear(x, self.values, weight, bias, self.indices, self.stored_shape,
                                          self.transposed)
        return masked_linear(x, self.values, weight, bias, self.pattern(), refresh=self.refresh_for_backward(weight))

    def linear_beside(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's output over a weight this adapter does not write (FSDP2's gathered copy, under
        ``torch.compile``; any weight under a ``torch.func`` transform, which refuses the write): the dense layer
        through ``weight`` as it is, plus the sparse delta from what it holds at the kept entries to W0 + values.
        Nothing is written, so the copy FSDP2 gathers again for the backward needs no refresh, and it traces without
        a graph break. (..., in) -> (..., out)."""
        # fp32 at least: FSDP2's MixedPrecisionPolicy hands the values over in bf16. W0 - held first (0 where the
        # shards hold W0), then + values: W0 + values first would round the small values to W0's ulp.
        compute = torch.promote_types(self.values.dtype, torch.float32)
        held = weight.detach().reshape(-1).index_select(0, self.indices).to(compute)  # the shards' entries
        correction = (self.held_base().to(compute) - held) + self.values.to(compute)  # (nnz,), grad flows to values
        return dense_linear(x, weight, bias, self.transposed) + self.delta(x, correction)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> MaskAdapter:
        # model.half() / model.to(torch.bfloat16) must not turn the fp32 master values into half:
        # AdamW's update then underflows (NaN at LR 1e-3 in fp16). Follow device moves and fp64,
        # keep everything else fp32; base_values and the weight do take the new dtype.
        master = self.values.data
        out = super()._apply(fn, recurse)
        if self.values.dtype in (torch.float16, torch.bfloat16):
            self.values.data = master.to(device=self.values.device, dtype=torch.float32)
            if self.values.grad is not None:
                self.values.grad = self.values.grad.float()
        return out

    def extra_repr(self) -> str:
        return f"kind={self.kind}, nnz={self.nnz}, shape={self.stored_shape}"


__all__ = ["Block", "MaskAdapter", "as_dtype"]
