"""One save/load path for trainable weights (atomic, shape-checked); the method protocol the loop calls."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch
import transformers as tf

from randmask_lab.experiment.training import loop, train
from randmask_lab.methods import METHOD_NAMES, prepare_method
from randmask_lab.methods.trainable import TrainableMismatchError, load_trainable, read_tensors, write_tensors


def test_a_wrong_shape_never_broadcasts(tiny_lm_model):
    prepared = prepare_method("randmask", tiny_lm_model, ratio=0.02, seed=0)
    (name, param), *_ = [(n, p) for n, p in prepared.model.named_parameters() if p.requires_grad]
    before = param.detach().clone()
    with pytest.raises(TrainableMismatchError, match=f"shape mismatch for '{name}'.*saved \\(1,\\)"):
        load_trainable(prepared.model, {name: torch.ones(1)}, source="x.safetensors")
    assert torch.equal(param, before)  # nothing was copied
    with pytest.raises(TrainableMismatchError, match="no parameter in this model"):
        load_trainable(prepared.model, {"nope": torch.ones(1)})


def test_prepared_save_load_round_trip_is_atomic(tiny_lm_model, tmp_path):
    prepared = prepare_method("lora", tiny_lm_model, seed=0)
    with torch.no_grad():
        for p in prepared.trainable_parameters():
            p.add_(0.5)
    prepared.save(tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["method.json", "trainable.safetensors"]  # no temps
    saved = prepared.trainable_state_dict()
    with torch.no_grad():
        for p in prepared.trainable_parameters():
            p.zero_()
    prepared.load(tmp_path / "t")
    assert all(torch.equal(saved[n], t) for n, t in prepared.trainable_state_dict().items())
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="bad.safetensors is not a readable safetensors file"):
        read_tensors(tmp_path / "bad.safetensors", 1 << 20)
    write_tensors(tmp_path / "x.safetensors", {"a": torch.ones(2)})
    assert torch.equal(read_tensors(tmp_path / "x.safetensors", 1 << 20)["a"], torch.ones(2))


def test_adalora_brings_its_loss_term_hook_and_state(tiny_lm_model):
    prepared = prepare_method("adalora", tiny_lm_model, seed=0, total_steps=10)
    assert prepared.loss_terms() is not None and prepared.on_step is not None
    tensors, meta = prepared.method_state()
    assert "rank_pattern" in meta
    prepared.restore_method_state(tensors, meta)
    plain = prepare_method("lora", tf.AutoModelForCausalLM.from_config(tiny_lm_model.config), seed=0)
    assert plain.loss_terms() is None and plain.method_state() == ({}, {})


def test_the_loop_never_branches_on_a_method_name():
    """No comparison or membership test in the loop or the run against a method name ("adalora", ...)."""
    for module in (loop, train):
        tested = set()
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.Compare):
                for part in ast.walk(node):
                    if isinstance(part, ast.Constant) and isinstance(part.value, str):
                        tested.add(part.value)
        assert not tested & set(METHOD_NAMES), (module.__name__, tested & set(METHOD_NAMES))


@pytest.fixture
def tiny_lm_model():
    from tests.conftest import tiny_model

    return tiny_model("llama")


def test_a_file_missing_some_trainable_tensors_is_refused(tiny_lm_model):
    """Issue 28: a resumed run (or `randmask distance`) must not keep some parameters at their initial values."""
    prepared = prepare_method("randmask", tiny_lm_model, ratio=0.02, seed=0)
    saved = prepared.trainable_state_dict()
    first = next(iter(saved))
    with pytest.raises(TrainableMismatchError, match=f"lacks 1 of the model's trainable parameters .*{first}"):
        load_trainable(prepared.model, {k: v for k, v in saved.items() if k != first}, source="t.safetensors")
