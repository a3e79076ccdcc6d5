"""Houlsby adapters (Houlsby et al., 2019): bottlenecks after attention and after the MLP.

Each adapter is ``y + up(relu(down(y)))`` applied to the output `y` of the attention output
projection and of the MLP output projection, i.e. before dropout and the residual add, as in
the paper's code (ReLU, width 8, `up` zero-initialised so the model is unchanged at init).
The adapter lives as a child `adapter` of the projection and runs in a forward hook, so the
base weights keep their names. Only adapters train by default, like the paper's code;
``train_norms=True`` also trains the layer norms, as Houlsby et al. did.
"""

from __future__ import annotations

import torch
from torch import nn

from randmask_lab.methods.common import check_size_option, seeded, smallest_dim, unfreeze_heads
from randmask_lab.methods.prepared import PreparedModel, build_report
from randmask_lab.methods.targets import resolve

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class Bottleneck(nn.Module):
    """Residual bottleneck ``x + up(act(down(x)))``: the identity at init."""

    def __init__(self, dim: int, width: int, activation: str = "relu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown adapter activation {activation!r}; choose from {list(ACTIVATIONS)}")
        self.down = nn.Linear(dim, width)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(width, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))  # (..., dim)


def _run_adapter(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return module.adapter(output)


def prepare_adapter(
    model: nn.Module,
    *,
    total: int,
    heads: list[str],
    seed: int = 0,
    width: int = 8,
    activation: str = "relu",
    train_norms: bool = False,
) -> PreparedModel:
    """Insert a bottleneck after every attention and MLP output projection; freeze the rest."""
    resolved = resolve(model, None, "attention_out") + resolve(model, None, "mlp_out")
    sites = [(t.name, t.module) for t in resolved]
    check_size_option("adapter", "width", width, smallest_dim([m for _, m in sites]),
                      "a bottleneck is narrower than the layer it adapts")
    model.requires_grad_(False)
    with seeded(seed):  # `down` is randomly initialised
        for name, proj in sites:
            if hasattr(proj, "adapter"):
                raise ValueError(f"{name} already has an adapter: prepare a fresh model")
            w = proj.weight
            dim = proj.out_features if isinstance(proj, nn.Linear) else proj.nf  # Conv1D: nf
            proj.adapter = Bottleneck(dim, width, activation).to(device=w.device, dtype=w.dtype)
            proj.register_forward_hook(_run_adapter)
    if train_norms:
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                module.requires_grad_(True)
    unfreeze_heads(model, heads)
    notes = [f"{len(sites)} adapters, width {width}, {activation}, train_norms={train_norms}"]
    label = lambda n: "adapter" if ".adapter." in n else "norm"
    report = build_report("adapter", model, total, heads, label=label, notes=notes)
    return PreparedModel(model, report, adapted=[t.label for t in resolved])
