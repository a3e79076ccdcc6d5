"""``--precision`` with Lightning's names: how weights are stored, where autocast runs, loss scaling.

- ``auto`` (the default): ``bf16-mixed`` where the device runs bf16 natively, else ``32`` (below).

- ``32``: fp32 weights and math.
- ``bf16-mixed``: fp32 weights (the optimizer's master copy, fp32 AdamW state, every method);
  forward and backward under bf16 autocast.
- ``bf16-true``: bf16 base weights; the trainable tensors stay fp32 where the method keeps its own
  (randmask values, PEFT adapters, Houlsby adapters, prefixes) and are bf16 where it trains base
  weights (full, bitfit); bf16 autocast (so fp32 adapters meet bf16 activations in bf16 matmuls).
- ``16-mixed``: fp32 weights, fp16 autocast, ``torch.amp.GradScaler``; a loss scale that
  collapses ends the run as ``scale_collapsed``, not ``diverged``.

Attention: on a CPU in bf16, PyTorch's default SDPA kernel (flash) has a backward 3.5x slower than
fp32's, its math backend is faster, and ``attention.folded_attention`` (grouped query heads folded
into the query axis, scale and mask inside one GEMM) is about twice as fast again (see that module).
So bf16 on CPU runs ``folded`` where the model takes a transformers attention function, with SDPA's
math backend for whatever it hands back to SDPA; every other case keeps PyTorch's choice.

Which precision to ask for depends on the hardware: ``auto`` (the runner's default) resolves to
``bf16-mixed`` where bf16 is native (a CPU with AMX or avx512_bf16, by oneDNN's own check; a GPU
that supports bf16) and to ``32`` everywhere else. On an AVX2-only CPU torch 2.13 runs a bf16
matmul ~46x and an fp16 one ~64x slower than fp32 (1024x768x3072 at 2 threads, AMD EPYC:
``python benchmarks/matmul_dtypes.py``), so an explicit half precision there still runs, with a
one-line warning. The resolved precision is what a run records and hashes into its id, so ``auto``
on two kinds of machine never gives one run id to two computations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from randmask_lab.machine import bf16_native, cpu_capability

Precision = Literal["auto", "32", "bf16-mixed", "bf16-true", "16-mixed"]
PRECISIONS: tuple[str, ...] = ("32", "bf16-mixed", "bf16-true", "16-mixed")  # what a run can run in
AUTO = "auto"
# Measured on an AVX2-only AMD EPYC, torch 2.13, 2 threads (`python benchmarks/matmul_dtypes.py`: 45.7x and
# 64.2x, median of 3 paired rounds): the slowdown the warning names.
SLOW_HALF_ON_CPU = "a bf16 matmul runs ~46x and an fp16 one ~64x slower than fp32 on such a CPU"
# A scale this small means the fp16 gradients overflow even unscaled: training cannot go on in fp16.
COLLAPSED_SCALE = 1.0


def resolve_precision(requested: str, device: torch.device | str) -> str:
    """The precision a run on ``device`` uses: ``auto`` -> bf16-mixed where bf16 is native, else 32;
    any other name is kept as asked."""
    if requested != AUTO:
        return requested
    return "bf16-mixed" if bf16_native(device) else "32"


def slow_precision_warning(precision: str, device: torch.device | str) -> str | None:
    """One line for an explicit half precision on a CPU without native bf16 (None when it is fine)."""
    if precision == "32" or torch.device(device).type != "cpu" or bf16_native("cpu"):
        return None
    return (f"--precision {precision} on a CPU without native bf16 ({cpu_capability()}; no AMX/avx512_bf16): "
            f"{SLOW_HALF_ON_CPU}; use --precision 32 (or auto)")


class ScaleCollapsed(RuntimeError):
    """16-mixed: the loss scale fell below COLLAPSED_SCALE (every step overflowed in fp16)."""


@dataclass(frozen=True)
class PrecisionPlan:
    """What a precision means on one device: load dtype, autocast dtype, attention backend, scaler."""

    name: str
    device: torch.device
    attention: Literal["auto", "folded", "math", "default"] = "auto"
    """Attention kernel: auto (folded for bf16 on a CPU, else PyTorch's choice), or forced (benchmarks)."""

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the base model is loaded in."""
        return torch.bfloat16 if self.name == "bf16-true" else torch.float32

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of forward passes (None: no autocast)."""
        return {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16}.get(self.name)

    @property
    def attention_kernel(self) -> str:
        """``folded``, ``math`` or ``default`` (see the module doc)."""
        if self.attention != "auto":
            return self.attention
        return "folded" if self.autocast_dtype == torch.bfloat16 and self.device.type == "cpu" else "default"

    @property
    def math_attention(self) -> bool:
        """True when SDPA calls should use the math backend (the folded kernel's fallbacks included)."""
        return self.attention_kernel in ("folded", "math")

    def setup_attention(self, model: nn.Module) -> str:
        """Give ``model`` this plan's attention kernel; return the one it runs (``folded`` needs a
        transformers model on sdpa attention, else SDPA's ``math`` backend stands in)."""
        kernel = self.attention_kernel
        if kernel == "folded":
            from randmask_lab.experiment.compute.attention import use_folded_attention

            return "folded" if use_folded_attention(model) else "math"
        return kernel

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        """Autocast and the attention backend for one forward pass (the backward follows its choices)."""
        with contextlib.ExitStack() as stack:
            if self.autocast_dtype is not None:
                stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
            if self.math_attention:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            yield

    def make_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler for 16-mixed, else None."""
        return torch.amp.GradScaler(self.device.type) if self.name == "16-mixed" else None

    def cast_trainable(self, model: nn.Module, fp32_trainable: bool) -> int:
        """bf16-true: make the trainable parameters fp32 when the method keeps them so; returns how many."""
        if self.name != "bf16-true" or not fp32_trainable:
            return 0
        n = 0
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32 and p.is_floating_point():
                p.data = p.data.float()
                n += 1
        return n


def check_scale(scaler: torch.amp.GradScaler | None) -> None:
    """Raise ScaleCollapsed when a 16-mixed run's loss scale has collapsed."""
    if scaler is not None and scaler.get_scale() < COLLAPSED_SCALE:
        raise ScaleCollapsed(f"the fp16 loss scale fell to {scaler.get_scale():g} (< {COLLAPSED_SCALE:g}): "
                             "gradients overflow fp16 even unscaled; use --precision bf16-mixed or 32")
