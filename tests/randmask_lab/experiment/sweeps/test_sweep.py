"""Sweeps: the grid, default LR grids, resumability, and going on after a diverged run."""

from __future__ import annotations

import pytest

from randmask_lab.experiment import ResultStore, RunConfig, RunError, SweepConfig, run_sweep, sweep_configs
from randmask_lab.experiment.sweeps.sweep import default_lrs, masking_lrs


def test_grid_size_and_budgets():
    sweep = SweepConfig(models=["m"], tasks=["rte", "sst2"], methods=["randmask", "lora"], ratios=[1e-3, 1e-4],
                        lrs=[1e-3, 1e-2], seeds=[0, 1, 2])
    configs = sweep_configs(sweep, RunConfig())
    assert len(configs) == 2 * (2 + 1) * 2 * 3  # tasks x (2 ratios + lora once) x lrs x seeds
    assert len({c.run_id for c in configs}) == len(configs)
    assert {c.ratio for c in configs if c.method == "lora"} == {None}


def test_sparser_masks_get_larger_default_lrs():
    assert masking_lrs(1e-3) == pytest.approx((1e-3, 3e-3, 1e-2))
    assert max(masking_lrs(1e-5)) > max(masking_lrs(1e-4)) > max(masking_lrs(1e-3))
    assert default_lrs("full", None) == (1e-5, 3e-5, 1e-4)


def test_unknown_names_fail_before_any_run(tmp_path):
    with pytest.raises(RunError, match="known tasks"):
        run_sweep(SweepConfig(tasks=["rte", "nope"]), RunConfig(out_dir=str(tmp_path)))


def test_a_ratio_the_model_cannot_take_fails_before_any_run(tiny_lm, run_kwargs):
    """The tiny Llama's smallest q/v target caps the even spread; a grid asking for more stops with one error."""
    base = RunConfig(**{**run_kwargs, "model": tiny_lm, "epochs": 1})
    sweep = SweepConfig(models=[tiny_lm], tasks=["rte"], methods=["randmask"], ratios=[1e-2, 0.5], lrs=[1e-2],
                        seeds=[0])
    with pytest.raises(RunError, match=r"^1 cell cannot run: rte randmask ratio 0.5: .*smallest target"):
        run_sweep(sweep, base)
    assert not ResultStore(f"{run_kwargs['out_dir']}/results.sqlite").records()  # nothing ran


def test_sweep_goes_on_after_divergence_and_skips_finished_runs(tiny_lm, run_kwargs, monkeypatch):
    from randmask_lab.experiment.training import loop

    step = loop.Trainer.step  # the run at lr 10 diverges: its loss made non-finite (LRs above 10 are refused)
    monkeypatch.setattr(loop.Trainer, "step",
                        lambda self, ix: float("nan") if self.config.lr == 10.0 else step(self, ix))
    base = RunConfig(**{**run_kwargs, "model": tiny_lm, "epochs": 1})
    sweep = SweepConfig(models=[tiny_lm], tasks=["rte"], methods=["bitfit"], lrs=[10.0, 1e-3], seeds=[0])
    said: list[str] = []
    records = run_sweep(sweep, base, say=said.append)
    assert [r.status for r in records] == ["diverged", "done"]
    store = ResultStore(f"{run_kwargs['out_dir']}/results.sqlite")
    assert len(store) == 2
    again: list[str] = []
    assert [r.status for r in run_sweep(sweep, base, say=again.append)] == ["diverged", "done"]
    assert sum("skip (finished)" in line for line in again) == 2


def test_zero_shot_runs_once_whatever_the_lr_grid():
    sweep = SweepConfig(models=["m"], tasks=["rte"], methods=["zeroshot", "lora"], lrs=[1e-4, 1e-3], seeds=[0])
    configs = sweep_configs(sweep, RunConfig())
    assert [c.method for c in configs] == ["zeroshot", "lora", "lora"]
