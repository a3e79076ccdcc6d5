"""``torch.func`` transforms (grad, vmap) over a masked model, through ``functional_call``.

They refuse an in-place write into a captured tensor, so ``torch.func.grad`` of a masked model failed with
"attempted to call in-place operation (aten::scatter_.src) that would mutate a captured Tensor". Under a transform
the layer now adds the delta beside the weight as it is (``MaskAdapter.linear_beside``, with plain differentiable
ops): the same gradients as autograd, per-sample gradients under vmap, and the model unchanged afterwards.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tests.conftest import model_output, tiny_inputs, tiny_model, train_steps
from torch import nn
from torch.func import functional_call, grad, vmap

from randmask import MaskingConfig, apply_masking


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _autograd(model: nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def _func_grad(model: nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    return grad(lambda params: functional_call(model, params, args=(), kwargs=inputs).loss)(_trainable(model))


@pytest.mark.parametrize("tied_head", [False, True])
def test_func_grad_equals_autograd_and_leaves_the_model_as_it_was(tied_head):
    inputs = tiny_inputs("llama")
    model = tiny_model("llama")
    targets = ["q_proj", "v_proj"]
    if tied_head:  # lm_head on the delta path
        model.lm_head.weight = model.model.embed_tokens.weight
        targets.append("lm_head")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        apply_masking(model, MaskingConfig(targets=targets, density=0.2))
    train_steps(model, inputs)  # nonzero values, written into the weights
    out = model_output(model, inputs)
    func, auto = _func_grad(model, inputs), _autograd(model, inputs)
    assert func.keys() == auto.keys()
    for name in auto:
        torch.testing.assert_close(func[name], auto[name], rtol=1e-4, atol=1e-6)
    assert torch.equal(model_output(model, inputs), out)


def test_vmap_gives_per_sample_gradients():
    torch.manual_seed(0)
    net = apply_masking(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)),
                        MaskingConfig(targets=["0", "2"], density=0.5))
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    x, y = torch.randn(5, 6), torch.randn(5, 1)

    def loss(params, xi, yi):
        return (functional_call(net, params, (xi[None],)) - yi).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(_trainable(net), x, y)
    for i in range(5):
        net.zero_grad(set_to_none=True)
        (net(x[i:i + 1]) - y[i]).square().sum().backward()
        for name, p in net.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-5, atol=1e-7)


def test_func_grad_through_the_peft_path():
    pytest.importorskip("peft")
    from peft import get_peft_model

    from randmask.peft import RandMaskConfig

    inputs = tiny_inputs("llama")
    model = get_peft_model(tiny_model("llama"), RandMaskConfig(density=0.2))
    train_steps(model, inputs)
    model.base_model.set_adapter("default")
    func, auto = _func_grad(model, inputs), _autograd(model, inputs)
    for name in auto:
        torch.testing.assert_close(func[name], auto[name], rtol=1e-4, atol=1e-6)
