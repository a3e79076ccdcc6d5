"""A masked transformers model, ``save_pretrained`` and the HF Trainer: the two routes that work, the one that does not.

- ``merge_and_unload(model).save_pretrained(dir)``: a plain checkpoint, ``from_pretrained`` gives the fine-tuned model.
- ``model.save_pretrained(dir)`` on the masked model (what the HF Trainer's checkpoints do): randmask's layout
  (``base_layer`` and ``adapters`` keys); it resumes into the same base masked the same way, strictly.
- that same checkpoint read by plain ``from_pretrained`` misses every target's ``weight`` (transformers initialises them
  afresh and says so in its load report): the pitfall docs/library.md names.
- the HF Trainer's ``resume_from_checkpoint`` on a masked model: bit for bit where the uninterrupted run ends.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import model_output, tiny_inputs, tiny_model, trained

from randmask import MaskingConfig, MaskingError, apply_masking, merge_and_unload

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


def _trainer(model, out, steps: int):
    import transformers

    rows = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in tiny_inputs("llama", batch=8)["input_ids"]]
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=steps, learning_rate=5e-2, save_steps=2,
                                          per_device_train_batch_size=2, report_to=[], logging_strategy="no",
                                          use_cpu=True, seed=0)
    return transformers.Trainer(model=model, args=args, train_dataset=rows)


def test_hf_trainer_resumes_a_masked_model_where_it_left_off(tmp_path):
    """The free API under the HF Trainer: checkpoints every 2 steps; a fresh base masked the same way and resumed
    from step 2 ends where the uninterrupted 4-step run ends, bit for bit. Another seed's masking refuses the
    checkpoint (randmask.layer_state)."""
    masked = lambda seed=0: apply_masking(tiny_model("llama"), MaskingConfig(**{**CONFIG, "seed": seed}))  # noqa: E731
    whole = masked()
    _trainer(whole, tmp_path / "whole", 4).train()
    expected = model_output(whole, tiny_inputs("llama"))

    resumed = masked()
    _trainer(resumed, tmp_path / "whole", 4).train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    torch.testing.assert_close(model_output(resumed, tiny_inputs("llama")), expected, rtol=0, atol=0)

    other = apply_masking(tiny_model("llama"), MaskingConfig(density=0.2, seed=1, mask_kind="random_exact"))
    exact = apply_masking(tiny_model("llama"), MaskingConfig(density=0.2, seed=0, mask_kind="random_exact"))
    _trainer(exact, tmp_path / "exact", 2).train()
    with pytest.raises(MaskingError, match="was drawn with another mask"):
        _trainer(other, tmp_path / "exact", 4).train(resume_from_checkpoint=str(tmp_path / "exact" / "checkpoint-2"))
