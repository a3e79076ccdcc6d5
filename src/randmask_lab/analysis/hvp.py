"""Exact Hessian-vector products of a model's training loss w.r.t. its trainable parameters.

H v is computed by double backward (Pearlmutter's trick): g = dL/dθ with ``create_graph=True``,
then H v = d(g · v)/dθ. Nothing Hessian-sized is ever formed, so the cost of one product is
about two backward passes per batch. Vectors are flat (one entry per trainable scalar) so that
the eigen-solvers in ``randmask_lab.analysis.eigen`` can treat H as an ordinary symmetric operator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""``loss_fn(model, batch) -> scalar loss``; the default calls ``model(**batch).loss``."""


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(**batch).loss`` (transformers models compute it when the batch has ``labels``)."""
    if not isinstance(batch, dict):
        raise TypeError(f"the default loss needs dict batches (model(**batch).loss), got "
                        f"{type(batch).__name__}; pass loss_fn=lambda model, batch: ... instead.")
    loss = getattr(model(**batch), "loss", None)
    if loss is None:
        raise ValueError("model(**batch).loss is None: put `labels` in every batch, or pass "
                         "loss_fn=lambda model, batch: <scalar loss>.")
    return loss


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with ``requires_grad`` (shared ones once); clear error if there are none."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (none has requires_grad=True), so its "
            "loss Hessian w.r.t. them is empty. Apply a fine-tuning method first (randmask.apply_masking, "
            "randmask_lab.methods.prepare_method, peft.get_peft_model), or model.requires_grad_(True) for "
            "full fine-tuning."
        )
    return params


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block with every module in eval mode (no dropout); restore each module's flag after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def double_backward_kernels() -> Iterator[None]:
    """Grad enabled, and attention on the math SDPA kernel: fused kernels have no double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kernels = sdpa_kernel([SDPBackend.MATH])
    except ImportError:  # older torch: nothing to select
        kernels = contextlib.nullcontext()
    with torch.enable_grad(), kernels:
        yield


def flat_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 if any parameter is float64, else float32 (half-precision params accumulate in fp32)."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def flatten(tensors: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor],
            dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Concatenate per-parameter tensors (``None`` = zeros) into one flat vector."""
    return torch.cat([
        (t if t is not None else torch.zeros_like(p)).reshape(-1).to(device=device, dtype=dtype)
        for t, p in zip(tensors, params)
    ])


class HessianVectorProduct:
    """The operator v -> H v, H the Hessian of the mean loss over ``batches`` w.r.t. ``params``.

    Call it inside ``eval_mode(model)`` for a deterministic operator (dropout makes H random).
    Each call recomputes the forward pass per batch, so memory is one batch's double-backward graph.
    """

    def __init__(self, model: nn.Module, batches: Sequence[Any], loss_fn: LossFn | None = None,
                 params: Sequence[nn.Parameter] | None = None) -> None:
        self.model = model
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("no batches: pass a non-empty list of batches to evaluate the loss on.")
        self.loss_fn = loss_fn or default_loss
        self.params = list(params) if params is not None else trainable_parameters(model)
        self.dim = sum(p.numel() for p in self.params)
        self.dtype = flat_dtype(self.params)
        self.device = self.params[0].device

    def loss(self, batch: Any) -> torch.Tensor:
        """The scalar loss on one batch; clear error if it is not a finite scalar."""
        loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor (e.g. the batch-mean loss).")
        if not torch.isfinite(loss).item():
            raise FloatingPointError(f"the loss is {loss.item()}: check the batch and the model's dtype "
                                     "(run the analysis in float32 if the model is in half precision).")
        return loss.reshape(())

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector ``v`` of length ``self.dim``."""
        chunks = torch.split(v, [p.numel() for p in self.params])
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        with double_backward_kernels():
            for batch in self.batches:
                grads = torch.autograd.grad(self.loss(batch), self.params, create_graph=True,
                                            allow_unused=True)
                # g · v: only gradients that still depend on θ contribute to H v.
                terms = [(g * c.to(g).view_as(g)).sum() for g, c in zip(grads, chunks)
                         if g is not None and g.requires_grad]
                if not terms:
                    continue  # the loss is linear in θ on this batch: H = 0 here
                hv = torch.autograd.grad(torch.stack(terms).sum(), self.params, allow_unused=True)
                total += flatten(hv, self.params, self.dtype, self.device)
        # The loss is the mean over batches, so H is the mean of the per-batch Hessians.
        return total / len(self.batches)

    def gradient_sq_norms(self) -> list[float]:
        """||dL_b/dθ||² for each batch b (first-order only; used for the gradient scale)."""
        norms = []
        with double_backward_kernels():
            for batch in self.batches:
                grads = torch.autograd.grad(self.loss(batch), self.params, allow_unused=True)
                norms.append(sum(float(g.detach().double().pow(2).sum()) for g in grads if g is not None))
        return norms
