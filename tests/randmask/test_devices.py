"""The library's invariants on every device this machine has: the CPU always, CUDA when present (skipped, never
failed, without it). Masks are drawn on a CPU generator whatever the weight's device, so they are the same bytes."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import tiny_inputs, tiny_model, train_steps

import randmask
from randmask import MaskingConfig, MaskingError, apply_masking, load_adapter, merge_and_unload, save_adapter
from randmask.drawing import block_densities, draw_mask
from randmask.masks import bernoulli_mask, make_generator
from randmask.ops import SparsePattern, sddmm, weight_gradient_path
from randmask.summary import count_base_parameters
from randmask.targets import resolve_targets

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
CONFIG = dict(density=0.05, seed=3)


def _logits(model, inputs, device):
    with torch.no_grad():
        return model(**{k: v.to(device) for k, v in inputs.items() if k != "labels"}).logits


def _trained(arch: str, device: str):
    """A masked tiny model on ``device`` after two AdamW steps (so its values are not zero)."""
    model = apply_masking(tiny_model(arch).to(device), MaskingConfig(**CONFIG))
    inputs = {k: v.to(device) for k, v in tiny_inputs(arch).items()}
    train_steps(model, inputs, steps=2, lr=1e-2)
    return model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D (transposed) weights
def test_identity_merge_and_save_load(device, arch, tmp_path):
    inputs = tiny_inputs(arch)
    base = tiny_model(arch).to(device)
    expected = _logits(base, inputs, device)
    masked = apply_masking(tiny_model(arch).to(device), MaskingConfig(**CONFIG))
    assert torch.equal(_logits(masked, inputs, device), expected)  # identity at init, bit for bit

    model = _trained(arch, device)
    layer = next(iter(randmask.masked_layers(model).values()))
    assert layer.adapters["default"].values.device.type == device and layer.adapters["default"].indices.device.type \
        == device
    out = _logits(model, inputs, device)
    assert not torch.equal(out, expected)
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(tiny_model(arch).to(device), tmp_path / "a")
    assert torch.equal(_logits(loaded, inputs, device), out)  # save/load bit-exact
    for name, layer in randmask.masked_layers(loaded).items():
        assert torch.equal(layer.adapters["default"].values, randmask.masked_layers(model)[name].adapters["default"]
                           .values)
    assert torch.equal(_logits(merge_and_unload(model), inputs, device), out)  # merged equals unmerged


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_sddmm_matches_the_fp64_reference(device, dtype, transposed):
    """The path this device takes for this dtype (native on the CPU, triton on CUDA where installed)."""
    shape = (40, 24) if transposed else (24, 40)
    pattern = SparsePattern(bernoulli_mask(shape, 0.05, make_generator(0, "w")).to(device), shape, transposed)
    gen = torch.Generator().manual_seed(0)
    g, x = torch.randn(130, 24, generator=gen).to(device, dtype), torch.randn(130, 40, generator=gen).to(device, dtype)
    dense = g.cpu().double().t() @ x.cpu().double()  # (out, in)
    expected = (dense.t() if transposed else dense).reshape(-1)[pattern.indices.cpu()]
    got = sddmm(g, x, pattern)
    assert got.device.type == device and got.dtype == torch.float32, weight_gradient_path(g, x, pattern)
    torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["meta", *DEVICES[1:]])
def test_masks_are_the_same_bytes_for_a_weight_on_any_device(device, monkeypatch):
    """Drawn for a weight on the meta device (or CUDA): the CPU model's indices, from CPU generators only."""
    cpu = apply_masking(tiny_model("llama"), MaskingConfig(**CONFIG))
    expected = {n: layer.adapters["default"].indices for n, layer in randmask.masked_layers(cpu).items()}
    with torch.device(device):
        other = tiny_model("llama")
    made, real = [], torch.Generator

    def recording_generator(device="cpu"):
        made.append(torch.device(device).type)
        return real(device)

    monkeypatch.setattr(torch, "Generator", recording_generator)  # every generator the draw makes
    config = MaskingConfig(**CONFIG)
    targets = resolve_targets(other, config.targets)
    densities = block_densities(config, count_base_parameters(other), targets)
    for target, target_densities in zip(targets, densities):
        indices, _ = draw_mask(target, target_densities, config)
        assert indices.device.type == "cpu"
        assert torch.equal(indices, expected[target.name]), target.name
    assert made and set(made) == {"cpu"}


def test_a_model_on_the_meta_device_is_refused_clearly():
    with torch.device("meta"):
        model = tiny_model("llama")
    with pytest.raises(MaskingError, match="meta device"):
        apply_masking(model, MaskingConfig(**CONFIG))
