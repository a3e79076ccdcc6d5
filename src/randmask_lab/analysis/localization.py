"""Where an eigenvector of the trainable-parameter Hessian lives: which tensors and which entries carry it.

A dominant curvature direction spread over thousands of masked entries and one carried by three of them
are different explanations of the same λ. For a masked matrix an entry is named by its output and input
feature, so an eigenvector concentrated on one input feature (a hidden dimension with outsized
activations, say) shows up as several top entries sharing ``in_feature``.
"""

from __future__ import annotations

import bisect
import itertools
import math
from typing import Any

import torch
from torch import nn

from randmask import MaskAdapter


def eigenvector_localization(model: nn.Module, vector: torch.Tensor, top: int = 8) -> dict[str, Any]:
    """How ``vector`` (flat over the trainable parameters, in ``model.parameters()`` order) is spread.

    Returns ``participation`` (1 / Σ v_i⁴ for unit v: the effective number of entries, from 1 for a single
    entry to the dimension for a flat vector), the ``top`` tensors by their share of ‖v‖² and the ``top``
    entries by v_i² (a masked entry with its ``out_feature`` / ``in_feature`` in the weight; an entry of
    any other 2-D parameter with its ``row`` / ``col``).
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for _, p in named]
    if vector.dim() != 1 or vector.numel() != sum(sizes):
        raise ValueError(f"the vector has shape {tuple(vector.shape)}; the model's trainable parameters hold "
                         f"{sum(sizes)} entries")
    weight = vector.detach().float().cpu() ** 2  # fp32, not fp64: full fine-tuning's vector has every weight
    total = float(weight.sum(dtype=torch.float64))
    if not (math.isfinite(total) and total > 0.0):
        raise ValueError(f"the vector's squared norm is {total}: it has no direction to localize")
    weight /= total
    starts = [0, *itertools.accumulate(sizes)]  # where each tensor begins in the flat vector
    spans = zip((name for name, _ in named), starts, starts[1:])
    shares = sorted(((float(weight[a:b].sum(dtype=torch.float64)), name, b - a) for name, a, b in spans), reverse=True)
    entries = []
    values, where = torch.topk(weight, min(top, weight.numel()))
    for share, flat in zip(values.tolist(), where.tolist()):
        k = bisect.bisect_right(starts, flat) - 1
        name, param = named[k]
        entries.append({"param": name, "index": flat - starts[k], "share": share,
                        **_entry_position(model, name, param, flat - starts[k])})
    return {"participation": 1.0 / float((weight ** 2).sum(dtype=torch.float64)), "dim": int(weight.numel()),
            "top_tensors": [{"param": name, "share": share, "numel": n} for share, name, n in shares[:top]],
            "top_entries": entries}


def _entry_position(model: nn.Module, name: str, param: torch.Tensor, index: int) -> dict[str, int]:
    owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    if isinstance(owner, MaskAdapter) and param is owner.values:
        pattern = owner.pattern()
        return {"out_feature": int(pattern.out_index[index]), "in_feature": int(pattern.in_index[index])}
    if param.dim() == 2:
        row, col = divmod(index, param.shape[1])
        return {"row": row, "col": col}
    return {}
