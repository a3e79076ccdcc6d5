"""Small helpers shared by the methods: seeding, task heads, peft task types."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from randmask import stored_shape
from randmask_lab.methods.targets import match_modules


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's RNG seeded, leaving the caller's RNG state untouched."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def check_size_option(method: str, option: str, value: int, limit: int, why: str) -> None:
    """ValueError unless 1 <= ``value`` <= ``limit``: a size option sets how much a method allocates, and past
    the model's own dimensions it adds parameters, not capacity (r=100000000 asked for 153 GB)."""
    if not 1 <= value <= limit:
        raise ValueError(f"option {option}={value} of {method!r} must be between 1 and {limit} ({why})")


def smallest_dim(modules: list[nn.Module]) -> int:
    """The smallest dimension of the adapted weight matrices: a rank above it is never reached."""
    # stored_shape, not weight.shape: a packed 4-bit weight is an (n/2, 1) byte column
    return min(min(stored_shape(m)) for m in modules)


def check_heads(model: nn.Module, heads: list[str]) -> None:
    """Raise when a head name matches no module of `model`."""
    for head in heads:
        if not match_modules(model, [head]):
            raise ValueError(
                f"head module {head!r} not found in {type(model).__name__}; pass head_modules=[...] "
                "with (suffixes of) names from model.named_modules(), or [] for no head"
            )


def unfreeze_heads(model: nn.Module, heads: list[str]) -> None:
    """Make every parameter of the head modules trainable."""
    for head in heads:
        for _, module in match_modules(model, [head]):
            module.requires_grad_(True)


def peft_task_type(model: nn.Module) -> str | None:
    """peft task type from the model class: CAUSAL_LM, SEQ_CLS, or None (plain PeftModel)."""
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return None


def peft_saver(wrapped: nn.Module) -> Callable[[Path], None]:
    """The native adapter format of a peft method: ``save_pretrained`` into a folder."""
    return lambda folder: wrapped.save_pretrained(str(folder))


def fix_peft_heads(peft_model: nn.Module, heads: list[str]) -> None:
    """Freeze head copies peft added on its own (SEQ_CLS always adds `classifier`/`score`)."""
    for name, p in peft_model.named_parameters():
        if ".modules_to_save." in name and not any(f".{h}.modules_to_save." in "." + name for h in heads):
            p.requires_grad_(False)
