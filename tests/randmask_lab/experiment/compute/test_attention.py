"""The folded CPU attention kernel: exact against SDPA (fp64), wired into transformers models, falls back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import model_output, tiny_inputs, tiny_model

from randmask_lab.experiment.compute import attention as attention_mod
from randmask_lab.experiment.compute.attention import ATTENTION_NAME, folded, folded_attention, use_folded_attention
from randmask_lab.experiment.compute.precision import PrecisionPlan

B, HQ, HKV, T, D = 3, 6, 2, 7, 8


def _qkv(q_len: int = T, kv_len: int = T) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, HQ, q_len, D, generator=g, dtype=torch.float64),
            torch.randn(B, HKV, kv_len, D, generator=g, dtype=torch.float64),
            torch.randn(B, HKV, kv_len, D, generator=g, dtype=torch.float64))


def _reference(q, k, v, mask=None, causal=False):
    rep = HQ // HKV
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=mask, is_causal=causal)


def _padding_mask() -> torch.Tensor:
    keep = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4]).bool()  # right padding
    return (torch.ones(T, T).tril().bool()[None] & keep[:, None, :])[:, None]  # (B, 1, T, T)


def test_folded_is_exact_for_causal_and_padded_grouped_query_attention():
    q, k, v = _qkv()
    assert torch.allclose(folded(q, k, v, None, causal=True), _reference(q, k, v, causal=True), atol=1e-12)
    assert torch.allclose(folded(q, k, v, None, causal=False), _reference(q, k, v), atol=1e-12)
    mask = _padding_mask()
    assert torch.allclose(folded(q, k, v, mask, causal=True), _reference(q, k, v, mask), atol=1e-12)
    additive = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    assert torch.allclose(folded(q, k, v, additive, causal=True), _reference(q, k, v, mask), atol=1e-12)
    per_head = mask.expand(B, HQ, T, T).clone()
    per_head[:, 1, -1, 0] = False  # one head differs
    assert torch.allclose(folded(q, k, v, per_head, causal=True), _reference(q, k, v, per_head), atol=1e-12)


def test_folded_decodes_one_query_over_a_longer_cache():
    q, k, v = _qkv(q_len=1, kv_len=T)
    assert torch.allclose(folded(q, k, v, None, causal=True), _reference(q, k, v), atol=1e-12)


def test_folded_gradients_match():
    q, k, v = (t.requires_grad_() for t in _qkv())
    mask = _padding_mask()
    grads = torch.autograd.grad(folded(q, k, v, mask, True).square().sum(), (q, k, v))
    expected = torch.autograd.grad(_reference(q, k, v, mask).square().sum(), (q, k, v))
    for got, want in zip(grads, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-10)


def test_a_fully_masked_row_gives_no_nan():
    q, k, v = _qkv()
    mask = torch.ones(B, 1, T, T, dtype=torch.bool)
    mask[0, :, 0, :] = False  # left padding: a query that sees nothing
    assert torch.isfinite(folded(q, k, v, mask, True)).all()


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "bert"])
def test_a_bf16_model_on_folded_attention_matches_sdpa(arch):
    reference = tiny_model(arch).to(torch.bfloat16)
    model = tiny_model(arch).to(torch.bfloat16)
    assert use_folded_attention(model) and model.config._attn_implementation == ATTENTION_NAME
    inputs = tiny_inputs(arch)
    if "attention_mask" in inputs:
        inputs["attention_mask"][1, -4:] = 0  # right padding on one row
    calls = []
    original = attention_mod.folded
    try:
        attention_mod.folded = lambda *a, **k: calls.append(1) or original(*a, **k)
        out = model_output(model, inputs).float()
    finally:
        attention_mod.folded = original
    want = model_output(reference, inputs).float()
    assert calls, "the folded kernel was not called"
    keep = inputs.get("attention_mask", torch.ones(out.shape[:2])).bool() if out.dim() == 3 else slice(None)
    assert torch.allclose(out[keep], want[keep], atol=0.05, rtol=0.05)


def test_unsupported_cases_fall_back_to_sdpa(monkeypatch):
    seen = []
    import transformers.integrations.sdpa_attention as sdpa

    monkeypatch.setattr(sdpa, "sdpa_attention_forward", lambda *a, **k: seen.append(k) or ("sdpa", None))
    module = torch.nn.Module()
    q, k, v = (t.to(torch.bfloat16) for t in _qkv())
    assert folded_attention(module, q, k, v, None, softcap=30.0)[0] == "sdpa"  # Gemma 2's logit soft-capping
    assert folded_attention(module, q.float(), k.float(), v.float(), None)[0] == "sdpa"  # fp32, no autocast
    assert len(seen) == 2
    out, _ = folded_attention(module, q, k, v, None)
    assert out.shape == (B, T, HQ, D) and len(seen) == 2


def test_models_on_other_attention_keep_it():
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    assert not use_folded_attention(model) and model.config._attn_implementation == "eager"


def test_the_plan_picks_folded_for_bf16_on_cpu_only():
    cpu = torch.device("cpu")
    assert PrecisionPlan("bf16-mixed", cpu).attention_kernel == "folded"
    assert PrecisionPlan("bf16-true", cpu).attention_kernel == "folded"
    assert PrecisionPlan("32", cpu).attention_kernel == "default"
    assert PrecisionPlan("bf16-mixed", torch.device("cuda")).attention_kernel == "default"
    assert PrecisionPlan("bf16-true", cpu, "math").setup_attention(tiny_model("llama")) == "math"
    model = tiny_model("gpt2")
    model.set_attn_implementation("eager")
    assert PrecisionPlan("bf16-true", cpu).setup_attention(model) == "math"  # eager model: math SDPA stands in
