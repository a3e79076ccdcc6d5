"""build_model_and_batches: what the analysis commands (hessian, distance, suggest-lr) train on."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from randmask_lab.experiment import RunConfig, RunError, build_model_and_batches, run_training


def _args(**kw) -> argparse.Namespace:
    base = dict(model=None, task=None, method="randmask", trainable_ratio=None, num_batches=2, batch_size=3,
                seed=0, adapter=None)
    return argparse.Namespace(**{**base, **kw})


def test_lm_batches_carry_the_loss_on_the_gold_continuation(tiny_lm):
    model, batches = build_model_and_batches(_args(model=tiny_lm, task="rte", trainable_ratio=0.02))
    assert len(batches) == 2 and batches[0]["input_ids"].shape[0] == 3
    labels = batches[0]["labels"]
    assert ((labels != -100).sum(1) >= 1).all()  # the answer tokens only
    loss = model(**batches[0]).loss
    assert torch.isfinite(loss) and loss.requires_grad


def test_head_batches(tiny_bert):
    model, batches = build_model_and_batches(_args(model=tiny_bert, task="sst2", method="lora"))
    assert torch.isfinite(model(**batches[1]).loss)


def test_freeze_head_leaves_only_the_methods_own_parameters(tiny_bert, tiny_lm):
    model, _ = build_model_and_batches(_args(model=tiny_bert, task="sst2", trainable_ratio=0.02))
    frozen, _ = build_model_and_batches(_args(model=tiny_bert, task="sst2", trainable_ratio=0.02, freeze_head=True))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    kept = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert kept and kept < names and all(n.endswith(".values") for n in kept)
    assert any("classifier" in n for n in names - kept)
    with pytest.raises(RunError, match="no trainable task head"):
        build_model_and_batches(_args(model=tiny_lm, task="rte", trainable_ratio=0.02, freeze_head=True))


def test_a_run_folder_brings_its_config_and_weights(tiny_lm, run_kwargs, tmp_path):
    record = run_training(RunConfig(**{**run_kwargs, "model": tiny_lm, "method": "randmask", "ratio": 0.02,
                                       "lr": 1e-2, "epochs": 1}))
    model, _ = build_model_and_batches(_args(adapter=record.run_dir))
    saved = load_file(str(Path(record.run_dir) / "trainable" / "trainable.safetensors"))
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in saved.items())
    model2, _ = build_model_and_batches(_args(model=tiny_lm, task="rte", trainable_ratio=0.02,
                                              adapter=str(Path(record.run_dir) / "adapter")))
    params2 = dict(model2.named_parameters())
    assert all(torch.equal(params2[n], t) for n, t in saved.items())  # the run folder's adapter/ subfolder
    shutil.copytree(Path(record.run_dir) / "adapter", tmp_path / "alone")  # a bare save_adapter folder
    model3, _ = build_model_and_batches(_args(model=tiny_lm, task="rte", trainable_ratio=0.02,
                                              adapter=str(tmp_path / "alone")))
    values = {n: p for n, p in model3.named_parameters() if p.requires_grad}
    assert values.keys() == saved.keys() and all(torch.equal(values[n], saved[n]) for n in saved)


def test_missing_model_or_task():
    with pytest.raises(RunError, match="--model and --task"):
        build_model_and_batches(_args())
