"""prepare_method: dispatch, argument checks, reports, save/load."""

import pytest
import torch

from randmask_lab.methods import METHOD_NAMES, method_options, prepare_method

from .tiny import batch, build, logits


def test_method_names() -> None:
    assert set(METHOD_NAMES) == {
        "randmask", "structured", "full", "lora", "adalora", "prefix", "bitfit", "adapter", "zeroshot"
    }


def test_unknown_method_lists_known() -> None:
    with pytest.raises(ValueError, match="known methods: randmask, structured, full, lora"):
        prepare_method("dora", build("opt"))


def test_unknown_option_lists_accepted() -> None:
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rank'\].*accepts \['alpha', 'dropout', 'r'\]"):
        prepare_method("lora", build("opt"), rank=4)
    assert "width" in method_options("adapter")


def test_budget_and_targets_only_where_they_apply() -> None:
    with pytest.raises(ValueError, match="ratio/density apply to randmask and structured"):
        prepare_method("lora", build("opt"), ratio=1e-3)
    with pytest.raises(ValueError, match="does not take targets"):
        prepare_method("bitfit", build("opt"), targets=["q_proj"])


def test_string_targets_are_refused() -> None:
    with pytest.raises(ValueError, match=r"targets must be a list .* \['q_proj'\]"):
        prepare_method("lora", build("opt"), targets="q_proj")


def test_missing_head_module_errors() -> None:
    with pytest.raises(ValueError, match="head module 'nohead' not found"):
        prepare_method("bitfit", build("opt"), head_modules=["nohead"])


def test_total_steps_ignored_by_other_methods() -> None:
    assert prepare_method("lora", build("opt"), total_steps=100).report.trainable == 2048


@pytest.mark.parametrize("name", ["full", "lora", "adalora", "bitfit", "adapter"])
def test_only_trainable_parameters_move(name: str) -> None:
    prepared = prepare_method(name, build("opt"), total_steps=10)
    model = prepared.model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(prepared.trainable_parameters(), lr=1e-2)
    model(**batch("opt")).loss.backward()
    optimizer.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[n]), n
    moved = sum(int(not torch.equal(p, before[n])) for n, p in model.named_parameters() if p.requires_grad)
    assert moved > 0


def test_report_fields() -> None:
    report = prepare_method("lora", build("opt")).report
    assert report.ratio == pytest.approx(report.trainable / report.total)
    assert report.to_dict()["groups"] == {"lora": 2048}
    assert str(report).startswith("lora: 2,048 / ")


@pytest.mark.parametrize(("name", "arch"), [("lora", "opt"), ("adapter", "llama"), ("bitfit", "llama")])
def test_save_then_load_restores_outputs(name: str, arch: str, tmp_path) -> None:
    trained = prepare_method(name, build(arch))
    with torch.no_grad():
        for p in trained.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    expected = logits(trained.model, arch)
    trained.save(tmp_path)
    fresh = prepare_method(name, build(arch))
    assert not torch.allclose(logits(fresh.model, arch), expected)
    fresh.load(tmp_path)
    torch.testing.assert_close(logits(fresh.model, arch), expected)


def test_load_from_wrong_method_errors(tmp_path) -> None:
    prepare_method("adapter", build("opt")).save(tmp_path)
    with pytest.raises(ValueError, match="prepare the model with the same method"):
        prepare_method("lora", build("opt")).load(tmp_path)


@pytest.mark.parametrize(("name", "options", "match"), [
    ("lora", {"alpha": 0}, r"alpha=0 of 'lora' must be > 0 \(alpha/r scales the update: 0 trains nothing\)"),
    ("adalora", {"alpha": 0}, "alpha=0 of 'adalora' must be > 0"),
    ("adalora", {"delta_t": 0}, "delta_t=0 of 'adalora' must be > 0"),
    ("adalora", {"beta1": 1.0}, r"beta1=1.0 of 'adalora' must be in \(0, 1\)"),
    ("adalora", {"beta2": 0}, r"beta2=0.0 of 'adalora' must be in \(0, 1\)"),
    ("lora", {"dropout": 1.0}, "dropout=1.0 of 'lora' must be < 1"),
])
def test_options_outside_their_useful_range_are_refused(name, options, match) -> None:
    """LoRA alpha 0 trained nothing, recorded as a trained run; peft tracebacked on deltaT 0 and betas at 0 or 1."""
    from randmask_lab.methods import check_method_options

    with pytest.raises(ValueError, match=match):
        check_method_options(name, options)
    good = {"alpha": 16, "delta_t": 1, "beta1": 0.5, "beta2": 0.5, "dropout": 0.5}
    check_method_options(name, {key: good[key] for key in options})  # inside the range
