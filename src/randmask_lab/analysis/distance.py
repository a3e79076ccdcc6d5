"""How far fine-tuning moved the weights from the pretrained ones (paper Fig. 4b): L2 norms.

``masked_distance`` reads randmask's ``values`` (the delta itself); ``distance_from`` compares a
model's parameters with a pretrained state dict by name, so it works for every method whose delta
lives in the weights (full FT, BitFit, randmask). For methods that keep the delta outside the
weights (peft LoRA/AdaLoRA), ``merge_peft_delta`` merges it into the weights first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from randmask import MaskAdapter, masked_layers

_WRAPPER_PARTS = (".base_layer",)  # randmask's and peft's wrappers insert this into weight names
_PEFT_PREFIX = "base_model.model."


@dataclass
class DistanceReport:
    """Per-matrix L2 norms of the delta and the total ``sqrt(sum of squares)`` over all matrices.

    ``per_matrix`` keys are the pretrained parameter names (``...q_proj.weight``), so reports from
    ``masked_distance`` and ``distance_from`` line up. ``unmatched`` lists trainable parameters
    ``distance_from`` found no reference for (e.g. LoRA matrices: merge first).
    """

    per_matrix: dict[str, float]
    total: float
    unmatched: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {"total": self.total, "per_matrix": self.per_matrix, "unmatched": self.unmatched}


def _total(norms: Mapping[str, float]) -> float:
    return math.sqrt(sum(v * v for v in norms.values()))


def masked_distance(model: nn.Module, adapter_name: str | None = None) -> DistanceReport:
    """||values|| per masked matrix of a randmask model (the active adapter unless named).

    This is the fp32 master delta; the weight holds W0 (+) values rounded to the weight dtype.
    """
    layers = masked_layers(model)
    if not layers:
        raise ValueError("model has no randmask layers; use distance_from(model, pretrained_state_dict).")
    norms = {}
    for name, layer in layers.items():
        key = adapter_name or layer.active_adapter
        if key is None or key not in layer.adapters:
            continue
        norms[f"{name}.weight"] = float(layer.adapters[key].values.detach().double().norm())
    if not norms:
        raise ValueError(f"no masked layer has adapter {adapter_name!r} (or an active one).")
    return DistanceReport(norms, _total(norms))


def _reference_key(name: str, reference: Mapping[str, torch.Tensor]) -> str | None:
    """The reference key of a model parameter name: exact, else with wrapper parts removed."""
    if name in reference:
        return name
    plain = name.removeprefix(_PEFT_PREFIX)
    for part in _WRAPPER_PARTS:
        plain = plain.replace(part, "")
    # Last: without the first name part, the task model's backbone prefix ("bert.", "model."), for a
    # reference that is the bare backbone (e.g. a sentence-transformers checkpoint under a classifier).
    for candidate in (plain, _PEFT_PREFIX + plain, plain.partition(".")[2]):
        if candidate in reference:
            return candidate
    return None


def _added_bias_key(name: str, reference: Mapping[str, torch.Tensor]) -> str | None:
    """The reference-style name of a bias the method added to a pretrained layer that has none (BitFit on Llama):
    the layer's weight is in the reference, its bias is not. None for any other name."""
    if not name.endswith(".bias"):
        return None
    weight = _reference_key(name.removesuffix(".bias") + ".weight", reference)
    return None if weight is None else weight.removesuffix(".weight") + ".bias"


def merge_peft_delta(model: nn.Module) -> tuple[nn.Module, set[str]]:
    """A peft LoRA-style model merged into plain weights (``merge_and_unload``), and the names of the weights
    that took a delta; any other model unchanged, with no names. Merges in place: the model is consumed."""
    wrapped = [name for name, m in model.named_modules() if getattr(m, "lora_A", None)]
    if not wrapped or not hasattr(model, "merge_and_unload"):
        return model, set()
    merged = model.merge_and_unload()
    return merged, {name.removeprefix(_PEFT_PREFIX) + ".weight" for name in wrapped}


def _param_distance(name: str, param: nn.Parameter, reference: Mapping[str, torch.Tensor]) -> tuple[str | None, float]:
    """(reference name, ||param - reference||) for one parameter; (None, 0.0) when the reference lacks it."""
    key = _reference_key(name, reference)
    added = _added_bias_key(name, reference) if key is None and param.requires_grad else None
    if added is not None:
        # The pretrained layer has no bias, i.e. a zero one (the added bias starts at 0, outputs unchanged):
        # its distance from the pretrained model is its own norm.
        return added, float(param.detach().double().norm())
    if key is None:
        return None, 0.0
    ref = reference[key]
    if tuple(ref.shape) != tuple(param.shape):
        raise ValueError(f"{name} has shape {tuple(param.shape)} but the reference {key!r} has "
                         f"{tuple(ref.shape)}; pass the state dict of the same pretrained model.")
    # float64 difference: a small delta on a large weight loses digits in half precision.
    return key, float((param.detach().double() - ref.detach().to(param.device).double()).norm())


def distance_from(model: nn.Module, reference_state_dict: Mapping[str, torch.Tensor],
                  skip_unchanged: bool = True, trainable_only: bool = False,
                  also: set[str] = frozenset()) -> DistanceReport:
    """||θ - θ_ref|| per parameter and in total, matching parameters to the reference by name.

    Names are matched exactly, or after removing ``.base_layer`` (randmask/peft wrappers) and
    peft's ``base_model.model.`` prefix, so a snapshot taken before ``apply_masking`` works; or
    without the backbone prefix (``bert.``), so a bare-encoder checkpoint serves a task model. A bias the
    method added to a pretrained layer without one (BitFit on Llama) counts from zero, the pretrained value.
    randmask ``values`` are skipped (their delta is already in the weights, which are synced
    first). ``skip_unchanged`` drops parameters with zero distance from ``per_matrix``.
    ``trainable_only`` counts only what the method trains: parameters with ``requires_grad``, the
    weights of masked layers, and the parameters named in ``also`` (e.g. weights a LoRA delta was
    merged into), not e.g. a task head held fixed with ``--freeze-head``.
    """
    layers = list(masked_layers(model).values())
    for layer in layers:
        layer.sync()  # the weight may lag the values until the next forward
    skip = {id(m.values) for m in model.modules() if isinstance(m, MaskAdapter)}
    masked_weights = {id(layer.weight) for layer in layers}
    norms, unmatched = {}, []
    for name, param in model.named_parameters():
        if id(param) in skip:
            continue
        if trainable_only and not (param.requires_grad or id(param) in masked_weights or name in also):
            continue
        key, dist = _param_distance(name, param, reference_state_dict)
        if key is None:
            if param.requires_grad:
                unmatched.append(name)
        elif dist > 0 or not skip_unchanged:
            norms[key] = dist
    if not norms and unmatched:
        raise ValueError(f"none of the trained parameters is in the reference state dict (e.g. {unmatched[:3]}): "
                         "parameters a method adds beside the pretrained weights (adapter, prefix, unmerged LoRA) "
                         "have no pretrained value to measure from, so distance measures only methods whose "
                         "delta is in the weights (full, bitfit, randmask, structured, lora); for those, pass "
                         "this model's own pretrained weights as the reference")
    return DistanceReport(norms, _total(norms), unmatched)
