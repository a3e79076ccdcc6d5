"""``--quantize``: load the frozen base stored quantized (QLoRA-style), through transformers' own
``quantization_config`` (bitsandbytes or torchao), as a QLoRA user would.

What runs where (bitsandbytes 0.50.2, torchao 0.18.0, torch 2.13 CPU; see docs-proposed/24.md):
nf4, fp4, int8 and ao-int8 run on CPU (AVX2) and CUDA; ao-int4 (torchao's ``Int4WeightOnlyConfig``)
needs CUDA (its CPU layouts are missing or need the mslk kernels in torchao 0.18), so it is refused
on a CPU with this message instead of a deep traceback.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from randmask_lab.errors import RunError

Quantize = Literal["none", "nf4", "fp4", "int8", "ao-int8", "ao-int4"]
QUANTIZE_SCHEMES: tuple[str, ...] = ("none", "nf4", "fp4", "int8", "ao-int8", "ao-int4")
# Methods whose trainable tensors are their own (so the quantized base stays frozen); the others train
# or wrap base weights. zeroshot evaluates the quantized model as it is.
QUANTIZE_METHODS: tuple[str, ...] = ("randmask", "structured", "lora", "zeroshot")
_EXTRA = "pip install 'randmask[quantized]' (bitsandbytes, torchao)"


def quantization_config(scheme: str, compute_dtype: torch.dtype, device: torch.device) -> Any:
    """transformers' quantization config for ``scheme`` (None for "none"); a RunError when it cannot run."""
    if scheme == "none":
        return None
    import transformers

    if scheme in ("nf4", "fp4", "int8"):
        _require("bitsandbytes", scheme)
        if scheme == "int8":
            return transformers.BitsAndBytesConfig(load_in_8bit=True)
        # Compute in the run's weight dtype (fp32 for --precision 32): QLoRA's bnb_4bit_compute_dtype.
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme,
                                               bnb_4bit_compute_dtype=compute_dtype)
    _require("torchao", scheme)
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if scheme == "ao-int4":
        if device.type != "cuda":
            raise RunError("--quantize ao-int4 (torchao Int4WeightOnlyConfig) runs on CUDA only in torchao 0.18; on "
                           f"{device.type} use ao-int8, nf4 or fp4")
        return transformers.TorchAoConfig(Int4WeightOnlyConfig(group_size=128))
    return transformers.TorchAoConfig(Int8WeightOnlyConfig())


def _require(package: str, scheme: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise RunError(f"--quantize {scheme} needs {package}: {_EXTRA}")
