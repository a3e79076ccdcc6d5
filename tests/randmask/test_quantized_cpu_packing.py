"""bitsandbytes' in-place CPU repacking of 4-bit weights is kept off wherever randmask takes a 4-bit base.

On an AVX512-bf16 CPU, bitsandbytes 0.50 repacks a ``Linear4bit`` weight at its first eval-mode forward
without gradients; after that its dequantization reads wrong values and a training forward passes no gradient
to the layer's input. Each test forces the flag bitsandbytes sets on such a CPU, so it fails without the fix on
any CPU; the last one also runs the real repacking path where the CPU has it.
"""

from __future__ import annotations

import pytest
import torch
from tests.conftest import tiny_inputs
from tests.randmask.quantized_models import load_quantized, save_tiny_llama

from randmask import MaskingConfig, MaskingError, apply_masking, disable_bnb_cpu_repacking
from randmask.quantized import dequantized

CFG = MaskingConfig(targets=["q_proj", "v_proj"], density=0.2, seed=0)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _four_bit_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if type(getattr(m, "weight", None)).__name__ == "Params4bit"}


def _as_on_an_avx512_bf16_cpu(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    layers = _four_bit_layers(model)
    for layer in layers.values():
        layer.support_avx512bf16_for_cpu = True  # what Linear4bit.__init__ sets on such a CPU
    return layers


def _repacked(layers: dict[str, torch.nn.Module]) -> list[str]:
    return [n for n, m in layers.items() if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]


def test_masking_keeps_every_4bit_layer_in_its_standard_packing(llama_dir):
    model = load_quantized(llama_dir, "nf4")
    layers = _as_on_an_avx512_bf16_cpu(model)
    assert len(layers) > 4  # targets and the frozen layers the gradient passes through (k, o, MLP)
    apply_masking(model, CFG)
    assert not any(layer.support_avx512bf16_for_cpu for layer in layers.values())
    with torch.no_grad():
        model.eval()(**tiny_inputs("llama"))
    assert _repacked(layers) == []
    assert disable_bnb_cpu_repacking(model) == 0  # nothing left to turn off


def test_peft_injection_keeps_the_standard_packing_too(llama_dir):
    peft = pytest.importorskip("peft")
    from randmask.peft import RandMaskConfig

    model = load_quantized(llama_dir, "nf4")
    layers = _as_on_an_avx512_bf16_cpu(model)
    peft.get_peft_model(model, RandMaskConfig(target_modules=["q_proj", "v_proj"], density=0.2, seed=0))
    assert not any(layer.support_avx512bf16_for_cpu for layer in layers.values())


def test_a_weight_repacked_before_masking_is_refused_by_name(llama_dir):
    model = load_quantized(llama_dir, "nf4")
    layers = _four_bit_layers(model)
    name = "model.layers.0.mlp.up_proj"  # not a target: the gradient still passes through it
    layers[name].weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(MaskingError, match=f"{name}: its 4-bit weight was repacked in place .* Reload the model"):
        apply_masking(model, CFG)
    with pytest.raises(MaskingError, match="repacked in place"):
        dequantized(layers[name])


def test_training_after_an_eval_forward_gets_the_gradients_it_had_before(llama_dir):
    """On an AVX512-bf16 CPU this runs bitsandbytes' real repacking path (it crashed on the tiny model's
    32-wide layers, and at real sizes dropped the gradient through every frozen 4-bit layer)."""
    grads = []
    for evaluate_first in (False, True):
        model = load_quantized(llama_dir, "nf4")
        if evaluate_first:
            _as_on_an_avx512_bf16_cpu(model)
        apply_masking(model, CFG)
        if evaluate_first:
            with torch.no_grad():
                model.eval()(**tiny_inputs("llama"))
        model.train()(**tiny_inputs("llama")).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=0)
