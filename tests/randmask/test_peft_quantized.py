"""The PEFT path on quantized bases: get_peft_model on a bitsandbytes / torchao model, save_pretrained /
from_pretrained, merge refused, HF Trainer and TRL SFTTrainer."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from peft import PeftModel, get_peft_model  # noqa: E402
from tests.conftest import model_output, tiny_inputs, tiny_model, train_steps  # noqa: E402
from tests.randmask.quantized_models import load_quantized, save_tiny_llama  # noqa: E402
from tests.randmask.test_peft import _lm_rows, _tokenizer  # noqa: E402

from randmask import MaskingError, quant_scheme  # noqa: E402
from randmask.peft import RandMaskConfig, RandMaskLayer  # noqa: E402


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _layers(model) -> dict[str, RandMaskLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, RandMaskLayer)}


@pytest.mark.parametrize("scheme", ["nf4", "bnb-int8", "ao-int8", "ao-nf4"])
def test_get_peft_model_trains_saves_and_reloads(llama_dir, scheme, tmp_path):
    model = get_peft_model(load_quantized(llama_dir, scheme), RandMaskConfig(target_modules=["q_proj", "v_proj"],
                                                                             density=0.2))
    layers = _layers(model)
    assert len(layers) == 4
    train_steps(model, tiny_inputs("llama"), steps=8)
    assert all(quant_scheme(layer.get_base_layer()) is not None for layer in layers.values())  # still quantized
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".randmask_adapters.default.values" in n for n in trainable)
    inputs = tiny_inputs("llama")
    out = model_output(model, inputs)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(load_quantized(llama_dir, scheme), tmp_path)
    assert torch.equal(model_output(reloaded, inputs), out)
    with pytest.raises(MaskingError, match="merging would requantize"):
        reloaded.merge_and_unload()
    assert torch.equal(model_output(reloaded, inputs), out)  # nothing was merged
    with reloaded.disable_adapter():
        base = model_output(reloaded, inputs)
    assert torch.equal(model_output(reloaded.unload(), inputs), base)


def test_a_float_base_peft_adapter_on_its_quantized_base_names_the_way_out(llama_dir, tmp_path):
    model = get_peft_model(tiny_model("llama"), RandMaskConfig(target_modules=["q_proj", "v_proj"], density=0.2))
    train_steps(model, tiny_inputs("llama"), steps=3)
    model.save_pretrained(tmp_path)
    way_out = "randmask_verify_base=False to PeftModel.from_pretrained: it skips this check alone"
    with pytest.raises(MaskingError, match=f"quantized .*{way_out}"):
        PeftModel.from_pretrained(load_quantized(llama_dir, "nf4"), tmp_path)
    # the way out the error names: every other check (config and weights checksums, indices) still runs
    PeftModel.from_pretrained(load_quantized(llama_dir, "nf4"), tmp_path, randmask_verify_base=False)


def test_hf_trainer_on_a_4bit_base(llama_dir, tmp_path):
    import transformers

    model = get_peft_model(load_quantized(llama_dir, "nf4"), RandMaskConfig(density=0.2))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, learning_rate=5e-2,
                                          per_device_train_batch_size=4, report_to=[], save_strategy="no",
                                          logging_strategy="no", use_cpu=True)
    transformers.Trainer(model=model, args=args, train_dataset=_lm_rows("llama")).train()
    assert any(layer.randmask_adapters["default"].values.detach().abs().sum() > 0 for layer in _layers(model).values())


def test_trl_sft_trainer_on_an_int8_torchao_base(llama_dir, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    rows = [{"input_ids": r["input_ids"], "completion_mask": [1] * len(r["input_ids"])} for r in _lm_rows("llama")]
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, learning_rate=5e-2, per_device_train_batch_size=4,
                         report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True)
    trainer = trl.SFTTrainer(model=load_quantized(llama_dir, "ao-int8"), args=args,
                             train_dataset=Dataset.from_list(rows), peft_config=RandMaskConfig(density=0.2),
                             processing_class=_tokenizer())
    trainer.train()
    layers = _layers(trainer.model)
    assert layers and any(m.randmask_adapters["default"].values.detach().abs().sum() > 0 for m in layers.values())
    assert all(quant_scheme(m.get_base_layer()) == "torchao-Int8Tensor" for m in layers.values())
