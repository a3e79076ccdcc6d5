"""A masked transformers model and ``save_pretrained``: the two routes that work, and the one that does not.

- ``merge_and_unload(model).save_pretrained(dir)``: a plain checkpoint, ``from_pretrained`` gives the fine-tuned model.
- ``model.save_pretrained(dir)`` on the masked model (what the HF Trainer's checkpoints do): randmask's layout
  (``base_layer`` and ``adapters`` keys); it resumes into the same base masked the same way, strictly.
- that same checkpoint read by plain ``from_pretrained`` misses every target's ``weight`` (transformers initialises them
  afresh and says so in its load report): the pitfall docs/library.md names.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import model_output, tiny_inputs, tiny_model, trained

from randmask import MaskingConfig, apply_masking, merge_and_unload

pytest.importorskip("transformers")
CONFIG = dict(density=0.2, seed=0)


def _masked_and_trained(arch: str) -> torch.nn.Module:
    return trained(apply_masking(tiny_model(arch), MaskingConfig(**CONFIG)), arch)


def test_merged_model_saves_a_plain_checkpoint(arch, tmp_path):
    model = _masked_and_trained(arch)
    expected = model_output(model, tiny_inputs(arch))
    merge_and_unload(model).save_pretrained(tmp_path)

    reloaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(model_output(reloaded.eval(), tiny_inputs(arch)), expected, rtol=0, atol=0)


def test_masked_checkpoint_resumes_into_the_same_masking(tmp_path):
    model = _masked_and_trained("llama")  # last optimizer step after the last forward: its weights are stale
    model.save_pretrained(tmp_path)
    expected = model_output(model, tiny_inputs("llama"))

    resumed = apply_masking(tiny_model("llama"), MaskingConfig(**CONFIG))
    resumed.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    torch.testing.assert_close(model_output(resumed, tiny_inputs("llama")), expected, rtol=0, atol=0)


def test_masked_checkpoint_is_not_a_plain_one(tmp_path):
    model = _masked_and_trained("llama")
    model.save_pretrained(tmp_path)
    _, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    missing = {key for key in info["missing_keys"] if key.endswith("_proj.weight")}
    assert missing == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qv"}
