"""Epoch curves: one task, model and protocol per plot; runs never share a label."""

from __future__ import annotations

import pytest

from randmask_lab.analysis.curves import epoch_curves
from randmask_lab.errors import RunError
from randmask_lab.experiment.results.record import RunRecord
from randmask_lab.experiment.run.config import RunConfig


def _run(task: str = "sst2", model: str = "m", loss: float = 0.6, **config) -> RunRecord:
    run = RunConfig(model=model, task=task, method="lora", lr=1e-3, seed=0, **config)
    return RunRecord(run.run_id, run.to_dict(), "done", "accuracy", val_loss=loss, test_metric=0.7,
                     epochs=[{"epoch": 1, "val_metric": 0.7, "val_loss": loss}])


def test_runs_of_two_tasks_or_models_are_refused_not_drawn_as_one():
    """SST-2 and RTE runs of one method, LR and seed shared a label: one curve, RTE's, under SST-2's title."""
    one_task = r"2 tasks: rte \(run [^)]+\), sst2 \(run [^)]+\); curves shows one task: pass --task"
    with pytest.raises(RunError, match=one_task):
        epoch_curves([_run("sst2"), _run("rte", loss=0.61)])
    with pytest.raises(RunError, match="2 models: .* pass --model"):
        epoch_curves([_run(model="a"), _run(model="b")])
    with pytest.raises(RunError, match="2 protocols: .*pass --method"):
        epoch_curves([_run(), _run(epochs=3)])


def test_runs_of_other_settings_get_their_own_curves():
    curves = epoch_curves([_run(method_options={"r": 1}), _run(method_options={"r": 16}, loss=0.5)])
    assert sorted(curves) == ['lora [method_options={"r":16}] lr 0.001 s0', 'lora [method_options={"r":1}] lr 0.001 s0']
    assert epoch_curves([_run()]) == {"lora lr 0.001 s0": [(1, 0.7, 0.6)]}
