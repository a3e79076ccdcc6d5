"""Zero-shot: nothing trains."""

from randmask_lab.methods import prepare_method

from .tiny import build


def test_nothing_trains_not_even_the_head() -> None:
    model = build("bert")
    report = prepare_method("zeroshot", model).report
    assert report.trainable == 0 and report.total == sum(p.numel() for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())
