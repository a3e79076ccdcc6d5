"""Hessian eigenvalues and HVPs of models against explicit Hessians."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import tiny_inputs, tiny_model  # tests/conftest.py (tests/ is on sys.path under pytest)
from torch import nn
from torch.func import functional_call

from randmask import MaskingConfig, apply_masking, masked_layers
from randmask.ops import dense_reference_linear
from randmask_lab.analysis import HessianVectorProduct, hessian_top_eigenvalue, hessian_top_eigenvalues


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def _net_and_batches(seed: int = 0):
    torch.manual_seed(seed)
    net = Net().double()
    batches = [(torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))) for _ in range(2)]
    return net, batches


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _explicit_hessian(net: nn.Module, batches) -> tuple[torch.Tensor, list[str]]:
    """Hessian of the mean loss over ALL parameters (flat, in named_parameters order)."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss(flat):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[i:i + s.numel()].view(s)
            i += s.numel()
        return torch.stack([_ce(lambda x: functional_call(net, params, (x,)), b) for b in batches]).mean()

    net.eval()
    return torch.autograd.functional.hessian(loss, flat0), names


def test_matches_explicit_hessian_on_tiny_network():
    net, batches = _net_and_batches()
    h, _ = _explicit_hessian(net, batches)
    res = hessian_top_eigenvalue(net, batches, _ce, tol=1e-10, max_iter=5000)
    assert res.converged
    assert res.eigenvalue == pytest.approx(float(torch.linalg.eigvalsh(h).max()), rel=1e-5)
    top3 = hessian_top_eigenvalues(net, batches, 3, _ce, steps=h.shape[0])
    assert top3 == pytest.approx(torch.linalg.eigvalsh(h).flip(0)[:3].tolist(), rel=1e-6, abs=1e-9)


def test_only_trainable_parameters_count():
    net, batches = _net_and_batches()
    h, _ = _explicit_hessian(net, batches)
    net.fc1.requires_grad_(False)  # H w.r.t. fc2 only = the trailing principal block
    n_fc1 = sum(p.numel() for p in net.fc1.parameters())
    sub = h[n_fc1:, n_fc1:]
    hvp = HessianVectorProduct(net.eval(), batches, _ce)
    v = torch.randn(hvp.dim, dtype=torch.float64)
    torch.testing.assert_close(hvp(v), sub @ v)


@pytest.mark.filterwarnings("ignore:power iteration did not reach:RuntimeWarning")
def test_eval_mode_during_and_restored_after():
    net, batches = _net_and_batches()
    net.train()
    net.fc2.eval()  # a mixed state must come back exactly
    seen = []

    def loss_fn(model, batch):
        seen.append(model.training or model.drop.training)
        return _ce(model, batch)

    a = hessian_top_eigenvalue(net, batches, loss_fn, max_iter=5).eigenvalue
    b = hessian_top_eigenvalue(net, batches, loss_fn, max_iter=5).eigenvalue
    assert a == b and not any(seen)  # deterministic: dropout off
    assert net.training and net.drop.training and not net.fc2.training


def test_nothing_trainable_is_a_clear_error():
    net, batches = _net_and_batches()
    net.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        hessian_top_eigenvalue(net, batches, _ce)


def test_empty_batches_is_a_clear_error():
    net, _ = _net_and_batches()
    with pytest.raises(ValueError, match="no batches"):
        hessian_top_eigenvalue(net, [], _ce)


def test_randmask_hvp_equals_dense_reference_on_the_mask():
    net, batches = _net_and_batches(seed=1)
    w0 = {n: m.weight.detach().clone() for n, m in net.named_children() if isinstance(m, nn.Linear)}
    apply_masking(net, MaskingConfig(targets=["fc1", "fc2"], density=0.5, seed=0))
    layers = masked_layers(net)
    adapters = [layers[n].adapters["default"] for n in ("fc1", "fc2")]
    with torch.no_grad():  # a non-zero delta, so the point is not the pretrained one
        for a in adapters:
            a.values.copy_(0.3 * torch.randn_like(a.values))
    sizes = [a.nnz for a in adapters]

    def dense_loss(flat):  # the same loss with W = W0 + scatter(values) built densely
        v1, v2 = flat.split(sizes)
        out = []
        for x, y in batches:
            h = dense_reference_linear(x, w0["fc1"], v1, net.fc1.bias, adapters[0].pattern())
            logits = dense_reference_linear(torch.tanh(h), w0["fc2"], v2, net.fc2.bias, adapters[1].pattern())
            out.append(F.cross_entropy(logits, y))
        return torch.stack(out).mean()

    flat = torch.cat([a.values.detach() for a in adapters])
    h = torch.autograd.functional.hessian(dense_loss, flat)
    hvp = HessianVectorProduct(net.eval(), batches, _ce)
    assert hvp.dim == sum(sizes)
    v = torch.randn(hvp.dim, dtype=torch.float64)
    torch.testing.assert_close(hvp(v), h @ v)
    top = hessian_top_eigenvalues(net, batches, 1, _ce, steps=hvp.dim)
    assert top[0] == pytest.approx(float(torch.linalg.eigvalsh(h).max()), rel=1e-8)


@pytest.mark.filterwarnings("ignore:power iteration did not reach:RuntimeWarning")
def test_tiny_transformer_with_randmask():
    # Llama: attention goes through SDPA, whose fused kernels have no double backward.
    model = apply_masking(tiny_model("llama"), MaskingConfig(density=0.2, seed=0))
    model.train()
    res = hessian_top_eigenvalue(model, [tiny_inputs("llama", batch=1, seq=8)], max_iter=4)
    assert res.eigenvalue > 0 and res.iterations == len(res.trace) <= 4
    assert model.training


@pytest.mark.filterwarnings("ignore:power iteration did not reach:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")
def test_tiny_transformer_with_lora():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("opt"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # LoRA starts at B = 0; move off it so both A and B have curvature
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    res = hessian_top_eigenvalue(model, [tiny_inputs("opt", batch=1, seq=8)], max_iter=3)
    assert torch.isfinite(torch.tensor(res.eigenvalue)) and len(res.trace) >= 2
