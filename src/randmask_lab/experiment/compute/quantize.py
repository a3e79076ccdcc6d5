"""``--quantize``: load the frozen base stored quantized (QLoRA-style), through transformers' own
``quantization_config`` (bitsandbytes or torchao), as a QLoRA user would.

What runs where (bitsandbytes 0.50.2, torchao 0.18.0, torch 2.13 CPU; see docs-proposed/24.md):
nf4, fp4, int8 and ao-int8 run on CPU (AVX2) and CUDA; ao-int4 (torchao's ``Int4WeightOnlyConfig``)
needs CUDA (its CPU layouts are missing or need the mslk kernels in torchao 0.18), so it is refused
on a CPU with this message instead of a deep traceback. ao-nf4 is torchao's ``NF4Tensor`` (torchtune's QLoRA base),
the one scheme ``--fsdp`` can shard.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from randmask_lab.errors import RunError

Quantize = Literal["none", "nf4", "fp4", "int8", "ao-int8", "ao-int4", "ao-nf4"]
QUANTIZE_SCHEMES: tuple[str, ...] = ("none", "nf4", "fp4", "int8", "ao-int8", "ao-int4", "ao-nf4")
# The schemes whose weights FSDP2 shards (--fsdp): torchao's NF4Tensor has its own all-gather hooks; bitsandbytes'
# weights become plain integer shards, and torchao 0.18's Int8Tensor cannot be split.
FSDP_SCHEMES: tuple[str, ...] = ("none", "ao-nf4")
# ao-nf4's blocks: QLoRA's and torchtune's 64 values per scale. The scales are quantized to int8 in groups of 4
# (torchtune: 256, which does not divide SmolLM2's 5184 blocks of a 576x576 matrix); FSDP2 splits each inner tensor
# evenly across ranks, and groups of 8 left the test model's k_proj one group, which 2 ranks cannot split. Each group
# costs one fp32 factor: 4 bytes per 256 weights, 3% over the 4-bit data.
NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE = 64, 4
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

    if scheme == "ao-nf4":
        from torchao.prototype._nf4tensor_api import NF4WeightOnlyConfig  # torchao 0.18's home of the NF4 config

        config = NF4WeightOnlyConfig()  # class attributes, no keyword constructor
        config.block_size, config.scaler_block_size = NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE
        return transformers.TorchAoConfig(config)

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
