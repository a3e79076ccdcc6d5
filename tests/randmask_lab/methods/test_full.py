"""Full fine-tuning."""

import pytest

from randmask_lab.methods import prepare_method

from .tiny import build


@pytest.mark.parametrize("arch", ["opt", "bert"])
def test_everything_trains(arch: str) -> None:
    model = build(arch)
    total = sum(p.numel() for p in model.parameters())
    report = prepare_method("full", model).report
    assert report.trainable == report.total == total
    assert report.ratio == 1.0
