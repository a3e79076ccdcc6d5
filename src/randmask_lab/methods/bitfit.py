"""BitFit (Zaken et al., 2021): train bias vectors only.

Trains the biases of every attention and MLP projection and of every normalisation layer.
Projections without a bias (Llama, Gemma3) get a zero-initialised one, as the paper's code
added a tunable bias to each projection; outputs are unchanged at init. Where a bias exists
(OPT, GPT-2, BERT) it is trained in place: the paper's extra zero bias next to a frozen one is
the same function, gradient and count. RMSNorm has no bias, so Llama/Gemma3 train none there.
"""

from __future__ import annotations

import torch
from torch import nn

from randmask_lab.methods.common import unfreeze_heads
from randmask_lab.methods.prepared import PreparedModel, build_report
from randmask_lab.methods.targets import resolve


def prepare_bitfit(model: nn.Module, *, total: int, heads: list[str]) -> PreparedModel:
    """Freeze `model` except projection and norm biases (adding zero biases where missing)."""
    sites = resolve(model, None, "all_linear")
    model.requires_grad_(False)
    kinds: dict[str, str] = {}
    for name, module in ((t.name, t.module) for t in sites):
        kinds[f"{name}.bias"] = "bias" if _has_bias(module) else "added_bias"
        if not _has_bias(module):
            _add_zero_bias(name, module)
        module.bias.requires_grad_(True)
    norms, bias_free = 0, []
    for name, module in model.named_modules():
        if "norm" not in type(module).__name__.lower():
            continue
        norms += 1
        if _has_bias(module):
            module.bias.requires_grad_(True)
            kinds[f"{name}.bias"] = "norm_bias"
        else:
            bias_free.append(type(module).__name__)
    unfreeze_heads(model, heads)
    notes = []
    if bias_free:
        kinds_free = ", ".join(sorted(set(bias_free)))
        notes.append(f"{len(bias_free)}/{norms} norm layers have no bias ({kinds_free})")
    added = sum(1 for k in kinds.values() if k == "added_bias")
    if added:
        notes.append(f"added {added} zero-initialised projection biases")
    report = build_report("bitfit", model, total, heads, label=lambda n: kinds.get(n, "other"), notes=notes)
    return PreparedModel(model, report, adapted=[t.label for t in sites], fp32_trainable=False)


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), nn.Parameter)


def _add_zero_bias(name: str, module: nn.Module) -> None:
    if not isinstance(module, nn.Linear):
        raise TypeError(f"cannot add a bias to {name} ({type(module).__name__}): only nn.Linear is supported")
    w = module.weight
    module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=w.dtype, device=w.device))
