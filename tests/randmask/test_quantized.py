"""randmask on quantized bases (bitsandbytes 4/8-bit, torchao weight-only): the delta path.

The issue's "done means": a tiny Llama quantized with each backend trains under apply_masking (the loss
falls, only the values get gradients, the targeted layers stay quantized and their stored bytes never
change), its adapter saves and loads with identical outputs; plus the bytes each adapted layer holds,
the math against a dequantized dense reference, the base fingerprint, merge refusal, multi-adapter use.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import hessian_vector_product, model_output, tiny_inputs, tiny_model, train_steps
from tests.randmask.quantized_models import SCHEME_NAMES, SCHEMES, dequantized_copy, load_quantized, save_tiny_llama

from randmask import (
    MaskedLayer,
    MaskingConfig,
    MaskingError,
    apply_masking,
    count_base_parameters,
    disable_adapter,
    layer_bytes,
    load_adapter,
    masked_layers,
    merge_and_unload,
    quant_scheme,
    save_adapter,
    set_adapter,
    unload,
)
from randmask.adapter_files import FORMAT_VERSION, read_adapter_files
from randmask.quantized import dequantized

CFG = MaskingConfig(targets=["q_proj", "v_proj"], density=0.2, seed=0)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(params=SCHEMES)
def scheme(request):
    return request.param


def _stored(layer: MaskedLayer) -> list[torch.Tensor]:
    """Copies of every tensor the quantized base layer stores (to prove they never change)."""
    weight = layer.base_layer.weight
    inner = getattr(weight, "__tensor_flatten__", None)
    if inner is not None and type(weight).__module__.startswith("torchao"):
        return [getattr(weight, n).clone() for n in inner()[0]]
    out = [weight.data.clone()]
    state = getattr(weight, "quant_state", None)
    if state is not None:
        out.append(state.absmax.clone())
    if getattr(weight, "SCB", None) is not None:
        out.append(weight.SCB.clone())
    return out


def test_tiny_llama_trains_on_each_quantized_base(llama_dir, scheme):
    model = load_quantized(llama_dir, scheme)
    apply_masking(model, CFG)
    layers = masked_layers(model)
    assert len(layers) == 4 and all(layer.delta_path for layer in layers.values())
    assert {quant_scheme(layer.base_layer) for layer in layers.values()} == {SCHEME_NAMES[scheme]}
    stored = {name: _stored(layer) for name, layer in layers.items()}
    inputs = tiny_inputs("llama")
    model(**inputs).loss.backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert len(with_grad) == 4 and all(n.endswith(".adapters.default.values") for n in with_grad)  # only values
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)
    model.zero_grad(set_to_none=True)
    losses = train_steps(model, tiny_inputs("llama"), steps=12)
    assert losses[-1] < losses[0] - 0.05, losses  # the loss falls
    for name, layer in layers.items():  # still quantized, stored bytes untouched
        assert quant_scheme(layer.base_layer) == SCHEME_NAMES[scheme]
        assert all(torch.equal(a, b) for a, b in zip(stored[name], _stored(layer))), name


def test_adapter_saves_and_loads_with_identical_outputs(llama_dir, scheme, tmp_path):
    model = load_quantized(llama_dir, scheme)
    apply_masking(model, CFG)
    train_steps(model, tiny_inputs("llama"), steps=5)
    inputs = tiny_inputs("llama")
    out = model_output(model, inputs)
    save_adapter(model, tmp_path)
    header, tensors = read_adapter_files(tmp_path)
    assert header["format_version"] == FORMAT_VERSION  # the format is unchanged
    assert all(t.dtype == torch.float32 for t in tensors.values())  # the delta path computes with fp32 values
    torch.manual_seed(123)  # another global seed: the masks come from the config's
    reloaded = load_adapter(load_quantized(llama_dir, scheme), tmp_path)
    assert torch.equal(model_output(reloaded, inputs), out)


def test_no_dense_float_copy_is_kept(llama_dir, scheme):
    model = load_quantized(llama_dir, scheme)
    before = {n: layer_bytes(model.get_submodule(n)) for n in ("model.layers.0.self_attn.q_proj",
                                                              "model.layers.1.self_attn.v_proj")}
    apply_masking(model, CFG)
    for name, base_bytes in before.items():
        layer = model.get_submodule(name)
        adapter = layer.adapters["default"]
        out_f, in_f = 32, 32
        # values (fp32) + indices (int32): 8 bytes per kept entry. The delta path never writes the weight, so it
        # holds no W0 at the entries (a save reads them from the dequantized weight).
        assert adapter.base_values is None and adapter.indices.dtype == torch.int32
        assert layer_bytes(layer) == base_bytes + 8 * adapter.nnz, name
        assert base_bytes < 4 * out_f * in_f  # the quantized storage is below one dense fp32 copy
        dense_like = [t for t in [*layer.parameters(), *layer.buffers()]
                      if t.is_floating_point() and t.numel() >= out_f * in_f and t is not layer.base_layer.weight]
        assert dense_like == []


def test_forward_and_gradient_match_the_dequantized_dense_reference(llama_dir, scheme):
    model = load_quantized(llama_dir, scheme)
    apply_masking(model, CFG)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    adapter = layer.adapters["default"]
    with torch.no_grad():
        adapter.values.copy_(torch.randn(adapter.nnz, generator=torch.Generator().manual_seed(0)) * 0.1)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = layer(x)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    with torch.no_grad():
        base_only = layer.base_layer(x)
    # The delta's own contribution is exactly the sparse product over the kept entries.
    w0 = dequantized(layer.base_layer).float().detach()
    delta = torch.zeros(w0.numel()).index_add(0, adapter.indices, adapter.values.detach()).view_as(w0)
    torch.testing.assert_close(y.detach() - base_only, F.linear(x.detach(), delta), rtol=1e-4, atol=1e-5)
    # dvalues: the weight gradient at the kept entries; dx: the quantized layer's own dx plus delta^T.
    g2d, x2d = gy.reshape(-1, 32), x.detach().reshape(-1, 32)
    torch.testing.assert_close(adapter.values.grad, (g2d.t() @ x2d).reshape(-1)[adapter.indices], rtol=1e-4,
                               atol=1e-5)
    tol = dict(rtol=2e-2, atol=2e-2) if scheme == "bnb-int8" else dict(rtol=1e-4, atol=1e-4)  # int8 matmul in fp16
    torch.testing.assert_close(x.grad, gy @ (w0 + delta), **tol)


def test_hessian_vector_products_match_the_dequantized_float_model(llama_dir, scheme):
    """Double backward through the delta path (``randmask hessian`` on a quantized base; it raised before): H v w.r.t.
    the values equals that of a float model holding the dequantized weights on the in-place path, same masks."""
    model = load_quantized(llama_dir, scheme)
    reference = dequantized_copy(model)
    inputs = tiny_inputs("llama")
    for masked in (apply_masking(model, CFG), apply_masking(reference, CFG)):
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():  # the same nonzero values in both (trained ones would differ by the base's rounding)
            for values in (p for p in masked.parameters() if p.requires_grad):
                values.copy_(torch.randn(values.shape, generator=generator) * 0.05)
    tol = dict(rtol=2e-2, atol=1e-2) if scheme == "bnb-int8" else dict(rtol=1e-4, atol=1e-5)  # int8 matmul in fp16
    torch.testing.assert_close(hessian_vector_product(model, inputs), hessian_vector_product(reference, inputs), **tol)


def test_same_budget_and_masks_as_the_float_base(llama_dir, scheme, tmp_path):
    float_model = tiny_model("llama")
    quant = load_quantized(llama_dir, scheme)
    assert count_base_parameters(quant) == count_base_parameters(float_model)
    apply_masking(float_model, CFG)
    apply_masking(quant, CFG)
    for (name, a), (_, b) in zip(masked_layers(float_model).items(), masked_layers(quant).items()):
        assert torch.equal(a.adapters["default"].indices, b.adapters["default"].indices), name


def test_float_base_adapter_loads_on_its_quantized_base_only_with_verify_base_false(llama_dir, tmp_path):
    float_model = apply_masking(tiny_model("llama"), CFG)
    train_steps(float_model, tiny_inputs("llama"), steps=5)
    save_adapter(float_model, tmp_path)
    with pytest.raises(MaskingError, match="quantized \\(bnb-nf4\\).*verify_base=False"):
        load_adapter(load_quantized(llama_dir, "nf4"), tmp_path)
    quant = load_adapter(load_quantized(llama_dir, "nf4"), tmp_path, verify_base=False)
    inputs = tiny_inputs("llama")
    float_out, quant_out = model_output(float_model, inputs), model_output(quant, inputs)
    base_gap = (model_output(unload(float_model), inputs) - model_output(unload(quant), inputs)).abs().max()
    assert (float_out - quant_out).abs().max() <= 2 * base_gap  # the same delta, on a base nf4 rounded


def test_quantized_base_adapter_verifies_on_the_same_quantized_base_only(llama_dir, tmp_path):
    model = apply_masking(load_quantized(llama_dir, "ao-int8"), CFG)
    save_adapter(model, tmp_path)
    load_adapter(load_quantized(llama_dir, "ao-int8"), tmp_path)  # same checkpoint, same quantization: verifies
    other = save_tiny_llama(tmp_path / "other", seed=1)
    with pytest.raises(MaskingError, match="differ from the base it was trained on"):
        load_adapter(load_quantized(other, "ao-int8"), tmp_path)
    # onto the float checkpoint it was quantized from: refused too, naming the way out (it named none)
    import transformers

    with pytest.raises(MaskingError, match="trained on a quantized copy of this checkpoint.*verify_base=False"):
        load_adapter(transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32), tmp_path)


def test_merge_into_a_quantized_weight_is_refused_and_changes_nothing(llama_dir):
    model = apply_masking(load_quantized(llama_dir, "nf4"), CFG)
    train_steps(model, tiny_inputs("llama"), steps=3)
    inputs = tiny_inputs("llama")
    out = model_output(model, inputs)
    with pytest.raises(MaskingError, match="quantized \\(bnb-nf4\\): merging would requantize"):
        merge_and_unload(model)
    assert torch.equal(model_output(model, inputs), out) and len(masked_layers(model)) == 4
    with disable_adapter(model):
        base = model_output(model, inputs)
    plain = unload(model)  # unload is fine: the stored weight was never written
    assert masked_layers(plain) == {} and torch.equal(model_output(plain, inputs), base)


def test_several_adapters_switch_and_disable(llama_dir):
    model = load_quantized(llama_dir, "ao-int8")
    inputs = tiny_inputs("llama")
    base = model_output(model, inputs)
    apply_masking(model, CFG, adapter_name="a")
    train_steps(model, tiny_inputs("llama"), steps=3)
    out_a = model_output(model, inputs)
    apply_masking(model, MaskingConfig(targets=["q_proj"], density=0.1, seed=1), adapter_name="b")
    train_steps(model, tiny_inputs("llama"), steps=3)
    set_adapter(model, "b")  # v_proj has no "b": it runs its base alone
    out_b = model_output(model, inputs)
    assert not torch.equal(out_a, out_b) and not torch.equal(out_b, base)
    set_adapter(model, "a")
    assert torch.equal(model_output(model, inputs), out_a)
    with disable_adapter(model):
        assert torch.equal(model_output(model, inputs), base)
    set_adapter(model, "b")
    assert torch.equal(model_output(model, inputs), out_b)


def test_an_unknown_integer_weight_is_refused():
    model = tiny_model("llama")
    q = model.model.layers[0].self_attn.q_proj
    q.weight = torch.nn.Parameter(torch.zeros(32, 32, dtype=torch.int8), requires_grad=False)
    with pytest.raises(MaskingError, match="q_proj: its weight is torch.int8"):
        apply_masking(model, CFG)


def test_float_models_keep_the_in_place_path():
    model = apply_masking(tiny_model("llama"), CFG)
    assert not any(layer.delta_path for layer in masked_layers(model).values())
