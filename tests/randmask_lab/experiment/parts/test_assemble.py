"""assemble(config) -> RunParts: the one build path of a run, the analysis commands and the benchmarks."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch

from randmask_lab.experiment import RunConfig, RunError, build_model_and_batches
from randmask_lab.experiment.compute.precision import PrecisionPlan
from randmask_lab.experiment.parts.assemble import assemble, steps_per_epoch
from randmask_lab.methods.trainable import trainable_tensors


def test_assemble_builds_what_the_loop_needs(tiny_lm, run_kwargs):
    config = RunConfig(**{**run_kwargs, "model": tiny_lm, "method": "randmask", "ratio": 0.02, "precision": "32"})
    parts = assemble(config)
    assert parts.total_steps == config.epochs * math.ceil(config.n_train / config.batch_size) == 6
    assert parts.run_id == config.run_id and parts.run_dir == Path(config.out_dir) / config.run_id
    assert parts.model is parts.prepared.model and parts.data.mode == "lm" and parts.attention == "default"
    assert len(parts.data.train) == 12 and len(parts.data.val) == 6 and len(parts.data.test) == 6
    trainable = sum(p.numel() for p in parts.model.parameters() if p.requires_grad)
    assert trainable == parts.prepared.report.trainable > 0
    loss = parts.loss()(parts.model, parts.data.train[:2])
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert parts.data_record()["train"]["rows"] == 12


def test_a_given_plan_and_step_count_are_used(tiny_lm, run_kwargs):
    config = RunConfig(**{**run_kwargs, "model": tiny_lm, "method": "randmask", "ratio": 0.02})
    parts = assemble(config, plan=PrecisionPlan("bf16-true", torch.device("cpu")), total_steps=7)
    assert parts.total_steps == 7 and parts.plan.name == "bf16-true"
    frozen = [p for p in parts.model.parameters() if not p.requires_grad and p.is_floating_point()]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)  # the base in the plan's dtype
    assert all(p.dtype == torch.float32 for p in parts.model.parameters() if p.requires_grad)  # values kept fp32


def test_steps_per_epoch_drops_the_ragged_batch_only_across_ranks():
    config = RunConfig(batch_size=4)
    assert steps_per_epoch(config, 10) == 3 and steps_per_epoch(config, 10, world=2) == 1
    config.max_steps = 2
    assert steps_per_epoch(config, 10) == 2


def test_zero_shot_in_head_mode_is_refused_by_the_build(tiny_bert, run_kwargs):
    with pytest.raises(RunError, match="needs prompt scoring"):
        assemble(RunConfig(**{**run_kwargs, "model": tiny_bert, "method": "zeroshot"}))


def test_the_analysis_builds_the_run_s_model(tiny_lm, run_kwargs):
    args = argparse.Namespace(model=tiny_lm, task="rte", trainable_ratio=0.02, seed=0, num_batches=1, batch_size=4)
    model, _, _ = build_model_and_batches(args)
    config = RunConfig(model=tiny_lm, task="rte", ratio=0.02, seed=0, n_train=4, n_val=1, n_test=0, precision="32")
    parts = assemble(config, total_steps=1)
    ours, theirs = trainable_tensors(parts.model), trainable_tensors(model)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
