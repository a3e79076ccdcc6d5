"""Merging sparse adapters into one: task arithmetic, TIES and DARE on the kept entries only.

Each adapter's delta is a sparse vector over one matrix: (flat indices, values). A merge works on
the union U of the adapters' indices (n adapters x |U| values, never the dense matrix) and each
method resolves the entries that several masks share by its own rule (PEFT's ``merge_utils``):

    linear        sum_i w_i d_i                                  (overlaps add)
    ties          trim each d_i to its top ``density`` share by |d_i|; elect a sign per entry
                  (sign of sum_i d_i, or of the count, ``majority_sign_method``); average the
                  w_i d_i that agree with it                     (overlaps: mean of agreeing)
    dare_linear   drop each d_i entry with probability 1 - density, rescale by 1/density; then linear
    dare_ties     the same drop and rescale; then TIES' sign election and agreeing mean
    magnitude_prune  the TIES trim, then linear

``density`` is a share of each adapter's own kept entries (a sparse adapter has nothing else to
trim). Where no two masks overlap, linear keeps every adapter's delta exactly.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from randmask.adapter import Block, MaskAdapter
from randmask.config import MaskingConfig, MaskingError
from randmask.pattern import SparsePattern
from randmask.registry import adapter_meta, adapter_names, masked_layers, record_adapter, refuse_in_mixed_batch

COMBINATION_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_NEEDS_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}


def _as_weight(weight: object) -> float | None:
    """A merge weight as a float: a finite Python, NumPy or one-element torch real number; None for anything else."""
    if isinstance(weight, torch.Tensor):
        if weight.numel() != 1 or weight.dtype == torch.bool or weight.is_complex():
            return None
        weight = weight.item()
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        return None
    weight = float(weight)
    return weight if math.isfinite(weight) else None


def check_merge_args(n_adapters: int, weights: Sequence[float], combination_type: str, density: float | None,
                     majority_sign_method: str) -> list[float]:
    """MaskingError for arguments a merge does not honour, before any work; the weights as floats (NumPy and
    one-element torch numbers are taken, as PEFT takes them)."""
    if combination_type not in COMBINATION_TYPES:
        raise MaskingError(f"combination_type={combination_type!r} is not one randmask merges; use one of "
                           f"{list(COMBINATION_TYPES)} (svd/cat exist for LoRA's low-rank factors only).")
    if n_adapters == 0 or len(weights) != n_adapters:
        raise MaskingError(f"add_weighted_adapter needs one weight per adapter: got {n_adapters} adapters and "
                           f"{len(weights)} weights.")
    floats = [_as_weight(w) for w in weights]
    if None in floats:
        raise MaskingError(f"weights={list(weights)!r} must be finite real numbers (Python, NumPy or one-element "
                           "torch scalars), one per adapter.")
    if combination_type in _NEEDS_DENSITY:
        if density is None or not 0.0 < density <= 1.0:
            raise MaskingError(f"combination_type={combination_type!r} needs density in (0, 1] (the share of each "
                               f"adapter's entries it keeps), got density={density!r}.")
    elif density is not None:
        raise MaskingError(f"density={density} has no effect with combination_type={combination_type!r}; drop it "
                           "or use ties / dare_linear / dare_ties / magnitude_prune.")
    if majority_sign_method not in ("total", "frequency"):
        raise MaskingError(f"majority_sign_method={majority_sign_method!r} must be 'total' or 'frequency'.")
    if majority_sign_method != "total" and combination_type not in ("ties", "dare_ties"):
        raise MaskingError(f"majority_sign_method applies to ties and dare_ties, not {combination_type!r}.")
    return floats  # type: ignore[return-value]  # (no None left)


def merge_sparse(deltas: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float],
                 combination_type: str = "linear", density: float | None = None,
                 majority_sign_method: str = "total", generator: torch.Generator | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge sparse deltas of one matrix, each (sorted flat int64 indices, values): -> (union indices, values).

    The result covers the union of the masks (entries every adapter dropped stay, at zero), in the
    values' common float dtype (fp32 at least). ``generator`` draws DARE's drops.
    """
    weights = check_merge_args(len(deltas), weights, combination_type, density, majority_sign_method)
    dtype = torch.promote_types(torch.float32, deltas[0][1].dtype)
    union = torch.unique(torch.cat([idx for idx, _ in deltas]))  # (U,), sorted
    stacked = union.new_zeros((len(deltas), union.numel()), dtype=dtype)  # (n, U): d_i over the union
    for row, (idx, values) in enumerate(deltas):
        kept = _prune(values.detach().to(dtype), combination_type, density, generator)
        stacked[row, torch.searchsorted(union, idx)] = kept
    w = torch.tensor([float(x) for x in weights], dtype=dtype, device=stacked.device)[:, None]  # (n, 1)
    if combination_type in ("ties", "dare_ties"):
        # Sign election on the unweighted (trimmed) deltas, then the mean of the weighted ones that agree.
        score = stacked.sum(0) if majority_sign_method == "total" else stacked.sign().sum(0)  # (U,)
        elected = torch.where(score >= 0, 1.0, -1.0).to(dtype)
        agree = stacked.sign() == elected  # (n, U); a zero (absent or trimmed) agrees with nothing
        merged = (stacked * w * agree).sum(0) / agree.sum(0).clamp(min=1)
    else:
        merged = (stacked * w).sum(0)
    return union, merged


def _prune(values: torch.Tensor, combination_type: str, density: float | None,
           generator: torch.Generator | None) -> torch.Tensor:
    """One adapter's values after its method's trim (TIES: top-|v|) or drop (DARE: Bernoulli, rescaled)."""
    if combination_type == "linear" or density is None or density >= 1.0:
        return values
    if combination_type in ("ties", "magnitude_prune"):
        k = int(density * values.numel())
        out = torch.zeros_like(values)
        top = torch.topk(values.abs(), k).indices
        out[top] = values[top]
        return out
    # dare_*: drawn on the (CPU) generator's device, so a merge drops the same entries on any device
    keep = (torch.rand(values.shape, generator=generator, dtype=torch.float64) < density).to(values.device)
    return torch.where(keep, values / density, torch.zeros_like(values))


def merge_layer_adapters(layer_adapters: Mapping[str, Any], adapters: Sequence[str], weights: Sequence[float],
                         combination_type: str, density: float | None, majority_sign_method: str,
                         generator: torch.Generator) -> tuple[list[Any], torch.Tensor, torch.Tensor] | None:
    """One layer's share of a weighted merge, for both APIs: the merged adapters this layer holds (``sources``),
    and ``merge_sparse`` of their (indices, values); None when the layer holds none of them."""
    present = [(a, w) for a, w in zip(adapters, weights) if a in layer_adapters]
    if not present:
        return None
    sources = [layer_adapters[a] for a, _ in present]
    union, values = merge_sparse([(s.indices, s.values) for s in sources], [w for _, w in present],
                                 combination_type, density, majority_sign_method, generator)
    return sources, union, values


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "linear", density: float | None = None,
                         majority_sign_method: str = "total", seed: int = 0) -> nn.Module:
    """Add adapter ``adapter_name``, the merge of ``adapters`` (PEFT's ``add_weighted_adapter``, on sparse deltas).

    Per masked matrix the new adapter's mask is the union of the merged adapters' masks and its
    values follow ``combination_type`` (see the module docstring); ``seed`` seeds DARE's drops. The
    active adapter stays active (``set_adapter(model, adapter_name)`` to use the merge). The merge
    is a custom-mask adapter: ``save_adapter`` stores its indices. Returns ``model``.
    """
    known = adapter_names(model)
    missing = [a for a in adapters if a not in known]
    if missing:
        raise MaskingError(f"add_weighted_adapter: the model has no adapters {missing}; it has {known}.")
    if adapter_name in known:
        raise MaskingError(f"adapter {adapter_name!r} already exists; pick another name or delete it first.")
    weights = check_merge_args(len(adapters), weights, combination_type, density, majority_sign_method)
    refuse_in_mixed_batch(model, f"add_weighted_adapter(..., {adapter_name!r})")
    totals = {adapter_meta(model, a)["total_params"] for a in adapters}
    if len(totals) != 1:
        raise MaskingError(f"the adapters were made for base models of different sizes {sorted(totals)}; "
                           "merge adapters of one base model.")
    generator = torch.Generator().manual_seed(seed)
    merged_layers = []
    for name, layer in masked_layers(model).items():
        merged = merge_layer_adapters(layer.adapters, adapters, weights, combination_type, density,
                                      majority_sign_method, generator)
        if merged is None:
            continue
        sources, union, values = merged
        active = layer.active_adapter
        new = layer.add_adapter(adapter_name, union, union_blocks(sources, union), "custom", explicit_indices=True)
        with torch.no_grad():
            new.values.copy_(values.to(new.values.dtype))
        new.values.requires_grad_(False)
        layer.set_active(active)
        merged_layers.append(name)
    record_adapter(model, adapter_name, MaskingConfig(targets=merged_layers, mask_kind="custom"), totals.pop())
    return model


def union_blocks(sources: Sequence[MaskAdapter], union: torch.Tensor) -> list[Block]:
    """The sources' row blocks, each with its count of ``union`` entries (for summaries and files).

    Blocks that overlap (one adapter masked the whole ``c_attn``, another its ``[q]`` block) become one: counted
    once each, they summed to more entries than the merge holds, and the saved file was refused as edited."""
    # (start, longest first, name): the name breaks ties, so a merged block's name never follows the hash seed
    spans = sorted({(b.name, b.start, b.stop) for s in sources for b in s.blocks}, key=lambda s: (s[1], -s[2], s[0]))
    groups: list[tuple[list[str], int, int]] = []  # (names, start, stop) of disjoint row ranges
    for name, start, stop in spans:
        if groups and start < groups[-1][2]:
            names, first_start, last_stop = groups[-1]
            groups[-1] = (names + [name], first_start, max(last_stop, stop))
        else:
            groups.append(([name], start, stop))
    first = sources[0]
    out_rows = SparsePattern(union, first.stored_shape, first.transposed).out_index  # (U,) logical output row
    # A group's first span starts it and is the longest there: its name, where it covers the group, else all names.
    return [Block(names[0] if (names[0], start, stop) in spans else ",".join(names), start, stop,
                  int(((out_rows >= start) & (out_rows < stop)).sum())) for names, start, stop in groups]


__all__ = ["COMBINATION_TYPES", "add_weighted_adapter", "check_merge_args", "merge_layer_adapters", "merge_sparse",
           "union_blocks"]
