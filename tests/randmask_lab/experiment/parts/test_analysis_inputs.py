"""build_model_and_batches: what the analysis commands (hessian, distance, suggest-lr) train on."""

from __future__ import annotations

import argparse
import csv
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


def test_lm_loss_is_the_training_objective(tiny_lm, run_kwargs):
    """The analysis loss on a batch equals the loss the training loop logged for that batch (step 1)."""
    model, batches, loss_fn = build_model_and_batches(_args(model=tiny_lm, task="rte", trainable_ratio=0.02))
    assert len(batches) == 2 and len(batches[0]) == 3
    loss = loss_fn(model, batches[0])
    assert torch.isfinite(loss) and loss.requires_grad
    # The same run: 6 training examples (2 batches of 3), its first step is batches[0] at the initial weights.
    # In fp32, as the analysis computes: "auto" is bf16-mixed on a CPU with native bf16, 1e-4 off in the loss.
    kw = {**run_kwargs, "max_length": 1024, "model": tiny_lm, "method": "randmask", "ratio": 0.02, "n_train": 6,
          "batch_size": 3, "epochs": 1, "max_steps": 1, "precision": "32"}
    record = run_training(RunConfig(**kw))
    with open(Path(record.run_dir) / "steps.csv") as f:
        first = next(csv.DictReader(f))
    assert float(first["loss"]) == pytest.approx(loss.item(), rel=1e-5)
    # RTE trains on cross-entropy over the candidates, not on the gold answer's token NLL.
    from randmask_lab.experiment.parts.lm import target_scores

    nll = -target_scores(model, batches[0], 0).mean()
    assert abs(nll.item() - loss.item()) > 1e-3


def test_head_loss_is_the_training_objective(tiny_bert):
    from randmask_lab.experiment.parts.assemble import TrainingLoss
    from randmask_lab.experiment.parts.data import collate_head
    from randmask_lab.experiment.parts.head import HeadObjective

    model, batches, loss_fn = build_model_and_batches(_args(model=tiny_bert, task="sst2", method="lora"))
    assert isinstance(loss_fn, TrainingLoss) and isinstance(loss_fn.objective, HeadObjective)
    batch = collate_head(batches[1], pad_id=0)
    labels = batch.pop("labels")
    expected = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
    assert loss_fn(model, batches[1]).item() == pytest.approx(expected.item(), rel=1e-5)


def test_freeze_head_leaves_only_the_methods_own_parameters(tiny_bert, tiny_lm):
    model, _, _ = build_model_and_batches(_args(model=tiny_bert, task="sst2", trainable_ratio=0.02))
    frozen, _, _ = build_model_and_batches(_args(model=tiny_bert, task="sst2", trainable_ratio=0.02,
                                                 freeze_head=True))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    kept = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert kept and kept < names and all(n.endswith(".values") for n in kept)
    assert any("classifier" in n for n in names - kept)
    with pytest.raises(RunError, match="no trainable task head"):
        build_model_and_batches(_args(model=tiny_lm, task="rte", trainable_ratio=0.02, freeze_head=True))


def test_a_run_folder_brings_its_config_and_weights(tiny_lm, run_kwargs, tmp_path):
    record = run_training(RunConfig(**{**run_kwargs, "model": tiny_lm, "method": "randmask", "ratio": 0.02,
                                       "lr": 1e-2, "epochs": 1}))
    model, _, _ = build_model_and_batches(_args(adapter=record.run_dir))
    saved = load_file(str(Path(record.run_dir) / "trainable" / "trainable.safetensors"))
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in saved.items())
    model2, _, _ = build_model_and_batches(_args(model=tiny_lm, task="rte", trainable_ratio=0.02,
                                              adapter=str(Path(record.run_dir) / "adapter")))
    params2 = dict(model2.named_parameters())
    assert all(torch.equal(params2[n], t) for n, t in saved.items())  # the run folder's adapter/ subfolder
    shutil.copytree(Path(record.run_dir) / "adapter", tmp_path / "alone")  # a bare save_adapter folder
    model3, _, _ = build_model_and_batches(_args(model=tiny_lm, task="rte", trainable_ratio=0.02,
                                              adapter=str(tmp_path / "alone")))
    values = {n: p for n, p in model3.named_parameters() if p.requires_grad}
    assert values.keys() == saved.keys() and all(torch.equal(values[n], saved[n]) for n in saved)


def test_missing_model_or_task():
    with pytest.raises(RunError, match="--model and --task"):
        build_model_and_batches(_args())


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", '{"lr": 1e999'])
def test_a_damaged_run_config_is_a_run_error(tmp_path, text):
    """Issue 28: --adapter with a run folder whose config.json is not a config object is one RunError."""
    from randmask_lab.errors import RunError

    run = tmp_path / "run"
    (run / "trainable").mkdir(parents=True)
    (run / "config.json").write_text(text)
    with pytest.raises(RunError, match="is not a run config"):
        build_model_and_batches(_args(adapter=str(run)))
