"""--precision: weight and trainable dtypes per method, autocast, the fp16 scaler and its collapse."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from randmask_lab.experiment import RunConfig, run_training
from randmask_lab.experiment import precision as precision_mod
from randmask_lab.experiment.precision import PrecisionPlan
from randmask_lab.methods import prepare_method

CPU = torch.device("cpu")


@pytest.mark.parametrize(("method", "kwargs", "trainable_dtype"), [
    ("randmask", {"ratio": 0.02}, torch.float32),
    ("lora", {}, torch.float32),
    ("adapter", {}, torch.float32),
    ("full", {}, torch.bfloat16),
    ("bitfit", {}, torch.bfloat16),
])
def test_bf16_true_keeps_the_methods_own_tensors_in_fp32(tiny_lm, method, kwargs, trainable_dtype):
    plan = PrecisionPlan("bf16-true", CPU)
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=plan.weight_dtype)
    prepared = prepare_method(method, model, seed=0, **kwargs)
    plan.cast_trainable(prepared.model, prepared.fp32_trainable)
    trainable = {p.dtype for p in prepared.model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in prepared.model.parameters() if not p.requires_grad}
    assert trainable == {trainable_dtype} and frozen <= {torch.bfloat16}
    with plan.forward_context():
        out = prepared.model(input_ids=torch.tensor([[1, 5, 7, 9]])).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_plans():
    assert PrecisionPlan("32", CPU).autocast_dtype is None and PrecisionPlan("32", CPU).make_scaler() is None
    assert PrecisionPlan("bf16-mixed", CPU).weight_dtype == torch.float32
    assert PrecisionPlan("bf16-mixed", CPU).math_attention  # the fastest SDPA backend for bf16 on a CPU
    assert not PrecisionPlan("bf16-mixed", torch.device("cuda")).math_attention
    assert PrecisionPlan("16-mixed", CPU).make_scaler() is not None


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "16-mixed"])
def test_every_precision_trains(tiny_lm, run_kwargs, precision):
    record = run_training(RunConfig(**{**run_kwargs, "model": tiny_lm, "epochs": 1, "precision": precision,
                                       "lr": 1e-2}))
    assert record.status == "done" and record.test_metric is not None
    assert record.attention == ("folded" if precision.startswith("bf16") else "default")


def test_a_collapsed_loss_scale_is_reported_as_such(tiny_lm, run_kwargs, monkeypatch):
    monkeypatch.setattr(precision_mod, "COLLAPSED_SCALE", 1e30)  # any scale counts as collapsed
    record = run_training(RunConfig(**{**run_kwargs, "model": tiny_lm, "epochs": 1, "precision": "16-mixed"}))
    assert record.status == "scale_collapsed" and record.test_metric is None
    assert "loss scale fell" in record.epochs[-1]["note"]
