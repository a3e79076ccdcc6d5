"""The budget is ``trainable_ratio`` (the library's name); ``ratio`` stays its stored name and a CLI alias, and the
library's MaskingConfig is the one place its rule lives."""

from __future__ import annotations

import dataclasses

import pytest

from randmask_lab.cli import build_parser
from randmask_lab.experiment import RunConfig, RunError
from randmask_lab.experiment.run.options import dataclass_from_args


def test_the_former_name_builds_the_same_run():
    new, old = RunConfig(task="rte", trainable_ratio=1e-4), RunConfig(task="rte", ratio=1e-4)
    assert new == old and new.run_id == old.run_id and old.ratio == old.trainable_ratio == 1e-4
    assert dataclasses.replace(new, ratio=1e-3).trainable_ratio == 1e-3  # the old name given wins
    assert "-r0.0001-" in new.run_id and "ratio" in new.identity() and "trainable_ratio" not in new.identity()


def test_the_dict_form_keeps_the_stored_name():
    config = RunConfig(task="rte", trainable_ratio=1e-4)
    data = config.to_dict()
    assert data["ratio"] == 1e-4 and "trainable_ratio" not in data
    assert list(data)[:4] == ["model", "task", "method", "ratio"]  # where the field always was
    assert RunConfig.from_dict(data) == config
    renamed = {("trainable_ratio" if k == "ratio" else k): v for k, v in data.items()}
    assert RunConfig.from_dict(renamed) == config
    with pytest.raises(RunError, match="give trainable_ratio or its former name ratio, not both"):
        RunConfig.from_dict({**data, "trainable_ratio": 1e-3})


@pytest.mark.parametrize("flag", ["--trainable-ratio", "--ratio"])
def test_both_flags_set_the_budget(flag):
    args = build_parser().parse_args(["train", "--task", "rte", flag, "1e-4"])
    assert dataclass_from_args(RunConfig, args).trainable_ratio == 1e-4


@pytest.mark.parametrize(("budget", "message"), [
    ({"trainable_ratio": 2.0}, "trainable_ratio=2.0 is outside \\(0, 1\\]"),
    ({"density": 0.0}, "density=0.0 is outside \\(0, 1\\]"),
    ({"trainable_ratio": 1e-3, "density": 0.1}, "needs exactly one budget"),
])
def test_the_rule_is_the_library_s(budget, message):
    # The lab checks the budget before loading anything, with randmask.MaskingConfig's own rule and words.
    with pytest.raises(RunError, match=f"--trainable-ratio \\(--ratio\\) / --density: .*{message}"):
        RunConfig(task="rte", method="randmask", **budget).validate()
    RunConfig(task="rte", method="randmask", trainable_ratio=1.0).validate()
