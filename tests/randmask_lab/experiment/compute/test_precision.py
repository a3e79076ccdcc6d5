"""--precision: weight and trainable dtypes per method, autocast, the fp16 scaler and its collapse."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from randmask_lab.experiment import RunConfig, run_training
from randmask_lab.experiment.compute import precision as precision_mod
from randmask_lab.experiment.compute.precision import PrecisionPlan
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


@pytest.mark.parametrize("native, resolved", [(True, "bf16-mixed"), (False, "32")])
def test_auto_resolves_by_the_hardware_and_the_id_hashes_the_resolved_name(monkeypatch, native, resolved):
    monkeypatch.setattr(precision_mod, "bf16_native", lambda device: native)
    config = RunConfig(model="m", task="sst2", device="cpu")
    assert config.precision == "auto" and precision_mod.resolve_precision("auto", "cpu") == resolved
    ran = config.resolved()
    assert (ran.precision, ran.precision_requested) == (resolved, "auto")
    # auto never reaches an id: it is the id of the explicit run of the same precision
    assert config.run_id == ran.run_id == RunConfig(model="m", task="sst2", device="cpu", precision=resolved).run_id
    explicit = RunConfig(model="m", task="sst2", device="cpu", precision="16-mixed").resolved()
    assert (explicit.precision, explicit.precision_requested) == ("16-mixed", "16-mixed")


def test_half_precision_on_a_cpu_without_native_bf16_warns_in_one_line(monkeypatch):
    monkeypatch.setattr(precision_mod, "bf16_native", lambda device: False)
    line = precision_mod.slow_precision_warning("bf16-mixed", "cpu")
    assert "\n" not in line and "--precision 32" in line and "46x" in line
    assert precision_mod.slow_precision_warning("32", "cpu") is None
    monkeypatch.setattr(precision_mod, "bf16_native", lambda device: True)
    assert precision_mod.slow_precision_warning("bf16-true", "cpu") is None


def test_a_record_keeps_the_precision_asked_for_and_the_machine(tiny_lm, run_kwargs, monkeypatch, capsys):
    monkeypatch.setattr(precision_mod, "bf16_native", lambda device: False)
    record = run_training(RunConfig(**{**run_kwargs, "model": tiny_lm, "epochs": 1, "lr": 1e-2}))
    assert record.config["precision"] == "32" and record.config["precision_requested"] == "auto"
    assert record.machine["cpu_capability"] and "cpu_bf16_native" in record.machine
    assert record.machine["device"] == "cpu"
    assert "warning" not in capsys.readouterr().err
    run_training(RunConfig(**{**run_kwargs, "model": tiny_lm, "epochs": 1, "lr": 1e-2, "precision": "bf16-true",
                              "max_steps": 1}))
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert "--precision bf16-true on a CPU without native bf16" in line


def test_the_requested_precision_is_the_runners_to_record_not_an_option():
    """--precision-requested was an option: `--precision 32 --precision-requested auto` made a record claim a
    request that was never made."""
    from randmask_lab.cli import build_parser

    for verb in ("train", "sweep"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([verb, "--precision-requested", "auto"])
    assert build_parser().parse_args(["train", "--precision", "32"]).precision == "32"
