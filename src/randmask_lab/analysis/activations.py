"""Per-feature scale of what a linear layer reads: the RMS of each input feature over real tokens.

Why it matters for masking: for y = W x the loss Hessian's diagonal entry of W[o, i] is a sum over
tokens of x_i² times the curvature of the loss in y_o, so a masked entry on an input feature with
outsized activations sits on a steep direction. ``eigenvector_localization`` names the entries that
carry the top Hessian direction; this module says whether their input features are such outliers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from randmask_lab.analysis.hvp import LossFn, default_loss
from randmask_lab.methods.targets import match_modules


def _is_linear(module: nn.Module) -> bool:
    """An nn.Linear or a GPT-2-style Conv1D, bare or inside randmask's / peft's wrapper (which passes its input
    on unchanged): the layers whose last input dimension is the input features this module measures."""
    base = getattr(module, "base_layer", module)
    return isinstance(base, nn.Linear) or type(base).__name__ == "Conv1D"


def matching_modules(model: nn.Module, suffixes: Sequence[str]) -> list[str]:
    """Names of the linear layers whose name is, or ends in ``.``, one of ``suffixes`` (``v_proj`` matches
    ``model.layers.3.self_attn.v_proj``), in model order; a ValueError when none matches or one that matches is
    not a linear layer (an embedding's input is token ids, an attention block's comes as keywords)."""
    found = match_modules(model, list(suffixes))
    # Layer names to suggest; a wrapper's inner base_layer is the same layer under its wrapper's name.
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and _is_linear(m)} - {"base_layer"})
    if not found:
        raise ValueError(f"no module of {type(model).__name__} is named {list(suffixes)} or ends in one; "
                         f"pass --modules with names of its linear layers ({', '.join(linear[:8]) or 'none'})")
    other = next(((n, m) for n, m in found if not _is_linear(m)), None)
    if other is not None:
        raise ValueError(f"--modules: {other[0]} ({type(other[1]).__name__}) is not a linear layer (nn.Linear or "
                         f"Conv1D), so it has no input features to measure; pass names of linear layers "
                         f"({', '.join(linear[:8]) or 'none'})")
    return [n for n, _ in found]


@torch.no_grad()
def input_feature_rms(model: nn.Module, batches: Sequence[Any], module_names: Sequence[str],
                      loss_fn: LossFn | None = None) -> dict[str, torch.Tensor]:
    """{module name: (in_features,) RMS of each feature of its input} over the non-padding tokens of
    ``batches``, each run through ``loss_fn(model, batch)`` (the run's objective; default
    ``model(**batch).loss``). Padding is read from the ``attention_mask`` the model is called with."""
    loss_fn = loss_fn or default_loss
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def remember_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
        state["mask"] = kwargs.get("attention_mask")

    def accumulate(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()  # (B, T, H) or (N, H)
            mask = state["mask"]
            if mask is not None and mask.dim() == 2 and tuple(mask.shape) == tuple(x.shape[:2]):
                keep = mask.to(x.device).bool()  # (B, T): real tokens only
                x = x[keep]  # (N, H)
            x = x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0, dtype=torch.float64)
            counts[name] = counts.get(name, 0.0) + x.shape[0]
        return hook

    handles = [model.register_forward_pre_hook(remember_mask, with_kwargs=True)]
    handles += [model.get_submodule(n).register_forward_pre_hook(accumulate(n)) for n in module_names]
    try:
        for batch in batches:
            loss_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in module_names if n not in sums]
    if missing:
        raise ValueError(f"modules {missing} were not called by the model's forward: nothing to measure")
    return {n: (sums[n] / counts[n]).sqrt().float() for n in module_names}


def feature_outliers(rms: dict[str, torch.Tensor], top: int = 3, features: Sequence[int] = ()) -> dict[str, Any]:
    """Per module: its ``top`` features by RMS and, for each of ``features``, its rank (0 = largest) and
    RMS; every RMS also as a multiple of the module's median feature RMS (the scale of an ordinary one)."""
    out: dict[str, Any] = {}
    for name, r in rms.items():
        median = float(r.median())
        # A median of 0 (most features never active, e.g. after a ReLU): no ordinary scale, so no multiple (null).
        times = (lambda v, m=median: v / m) if median > 0 else (lambda v: None)
        values, where = torch.topk(r, min(top, r.numel()))
        row = {"median_rms": median,
               "top": [{"feature": int(i), "rms": float(v), "x_median": times(float(v))}
                       for v, i in zip(values, where)],
               "features": {}}
        for f in features:
            if not 0 <= f < r.numel():
                raise ValueError(f"feature {f} is outside {name}'s {r.numel()} input features")
            row["features"][str(f)] = {"rank": int((r > r[f]).sum()), "rms": float(r[f]),
                                       "x_median": times(float(r[f]))}
        out[name] = row
    return out
