"""Tiny Llamas stored quantized the way users get them: transformers' ``quantization_config`` at load
(bitsandbytes 4-bit NF4/FP4 and LLM.int8; torchao int8 weight-only), or torchao's ``quantize_`` (int4
weight-only on CPU: ``IntxWeightOnlyConfig(int4, group 32)``; NF4 as torchtune's ``NF4Tensor``). Each scheme
is skipped where its package is missing. With bitsandbytes 0.50.2 and torchao 0.18.0 the first five run on an AVX2
CPU (AMD EPYC) and an AVX512-bf16 one (Intel Xeon); NF4Tensor was added later, run on an AVX512 AMD EPYC."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from tests.conftest import tiny_model

SCHEMES = ["nf4", "fp4", "bnb-int8", "ao-int8", "ao-int4", "ao-nf4"]
SCHEME_NAMES = {"nf4": "bnb-nf4", "fp4": "bnb-fp4", "bnb-int8": "bnb-int8", "ao-int8": "torchao-Int8Tensor",
                "ao-int4": "torchao-IntxUnpackedToInt8Tensor", "ao-nf4": "torchao-NF4Tensor"}


def need(scheme: str) -> None:
    """Skip (never fail) where the scheme's package is not installed."""
    package = "torchao" if scheme.startswith("ao-") else "bitsandbytes"
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install 'randmask[quantized]')")


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    tiny_model("llama", seed).save_pretrained(folder)
    return folder


def load_quantized(folder: Path, scheme: str) -> torch.nn.Module:
    """The tiny Llama in ``folder`` loaded with ``scheme`` (fp32 compute), in eval mode."""
    import transformers as tf

    need(scheme)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    kwargs: dict = {"dtype": torch.float32}
    if scheme in ("nf4", "fp4"):
        kwargs["quantization_config"] = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme,
                                                               bnb_4bit_compute_dtype=torch.float32)
    elif scheme == "bnb-int8":
        kwargs["quantization_config"] = tf.BitsAndBytesConfig(load_in_8bit=True)
    elif scheme == "ao-int8":
        from torchao.quantization import Int8WeightOnlyConfig

        kwargs["quantization_config"] = tf.TorchAoConfig(Int8WeightOnlyConfig())
    if "quantization_config" in kwargs:
        kwargs["device_map"] = {"": "cpu"}
    model = tf.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    if scheme == "ao-int4":
        from torchao.quantization import IntxWeightOnlyConfig, PerGroup, quantize_

        quantize_(model.model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    if scheme == "ao-nf4":
        quantize_nf4(model)
    return model


def quantize_nf4(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (a tiny Llama) with every decoder Linear a torchao ``NF4Tensor``, in place: torchtune's QLoRA base
    (its FrozenNF4Linear holds one), by torchao's ``quantize_``."""
    need("ao-nf4")
    from torchao.prototype._nf4tensor_api import NF4WeightOnlyConfig
    from torchao.quantization import quantize_

    config = NF4WeightOnlyConfig()
    config.block_size, config.scaler_block_size = 32, 8  # the tiny layers hold 16-64 blocks of 32
    quantize_(model.model, config)
    return model


def dequantized_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float tiny Llama holding ``model``'s weights, its quantized ones dequantized: the reference that a quantized
    base's results must match."""
    from randmask.quantized import dequantized, is_quantized

    reference = tiny_model("llama")
    with torch.no_grad():
        for name, module in model.named_modules():
            if is_quantized(module):
                reference.get_submodule(name).weight.copy_(dequantized(module).float())
    return reference
