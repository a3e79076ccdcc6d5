"""Zero-shot: nothing trains; the runner evaluates the pretrained model as it is (a reference row: the paper's tables
have none, MeZO's have one)."""

from __future__ import annotations

from torch import nn

from randmask_lab.methods.prepared import PreparedModel, build_report


def prepare_zeroshot(model: nn.Module, *, total: int, heads: list[str]) -> PreparedModel:
    """Freeze every parameter of `model` (task heads too: a zero-shot score uses no trained weights)."""
    model.requires_grad_(False)
    return PreparedModel(model, build_report("zeroshot", model, total, [], label=lambda _: "none"), trains=False,
                         needs_prompts=True)
