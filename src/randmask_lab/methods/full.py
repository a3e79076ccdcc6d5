"""Full fine-tuning: every parameter trains."""

from __future__ import annotations

from torch import nn

from randmask_lab.methods.prepared import PreparedModel, build_report


def prepare_full(model: nn.Module, *, total: int, heads: list[str]) -> PreparedModel:
    """Make every parameter of `model` trainable."""
    model.requires_grad_(True)
    return PreparedModel(model, build_report("full", model, total, heads, label=lambda _: "all"), fp32_trainable=False)
