"""randmask as a registered PEFT method, against the installed peft: PEFT's invariant matrix."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from tests.conftest import REPO_ROOT, model_output, tiny_inputs, tiny_model, trained

from randmask import MaskingError

peft = pytest.importorskip("peft")
from peft import PeftModel, get_peft_model  # noqa: E402

from randmask.peft import PEFT_TYPE, RandMaskConfig, RandMaskLayer  # noqa: E402

ARCHS = ["opt", "llama", "gpt2"]


def _peft_model(arch, dtype=torch.float32, **cfg):
    return get_peft_model(tiny_model(arch).to(dtype), RandMaskConfig(**(cfg or {"density": 0.2})))


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, RandMaskLayer)}


def test_one_config_serves_several_models():
    config = RandMaskConfig(density=0.2)
    get_peft_model(tiny_model("opt"), config)
    get_peft_model(tiny_model("llama"), config)  # what injection records goes into PEFT's own copy
    assert config.checksums is None and config.total_params is None


def test_config_is_validated():
    with pytest.raises(MaskingError, match="exactly one budget"):
        RandMaskConfig()
    with pytest.raises(MaskingError, match="regenerates masks"):
        RandMaskConfig(density=0.1, mask_kind="custom")


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init_and_only_kept_entries_move(arch):
    inputs = tiny_inputs(arch)
    base = tiny_model(arch)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    expected = model_output(base, inputs)
    model = get_peft_model(base, RandMaskConfig(trainable_ratio=2e-2))
    assert torch.equal(model_output(model, inputs), expected)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".randmask_adapters.default.values") for n in trainable)
    trained(model, arch)
    layers = {n.removeprefix("base_model.model.") + ".base_layer.weight": m for n, m in _layers(model).items()}
    for name, param in model.base_model.model.named_parameters():
        if ".randmask_adapters." in name:
            continue
        original = before[name.replace(".base_layer.", ".")]
        layer = layers.get(name)
        if layer is None:
            assert torch.equal(param, original), name
            continue
        idx = layer.randmask_adapters["default"].indices
        changed = (param.detach().reshape(-1) != original.reshape(-1)).nonzero().reshape(-1)
        assert changed.numel() > 0 and torch.isin(changed, idx).all(), name


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_equals_unmerged_and_unload_restores(arch):
    inputs = tiny_inputs(arch)
    base_out = model_output(tiny_model(arch), inputs)
    model = trained(_peft_model(arch), arch)
    out = model_output(model, inputs)
    with model.disable_adapter():
        assert torch.equal(model_output(model, inputs), base_out)
    assert torch.equal(model_output(model, inputs), out)
    model.merge_adapter()
    assert torch.equal(model_output(model, inputs), out)
    model.unmerge_adapter()
    assert torch.equal(model_output(model, inputs), out)
    assert torch.equal(model_output(model.merge_and_unload(), inputs), out)
    unloaded = trained(_peft_model(arch), arch).unload()
    assert torch.equal(model_output(unloaded, inputs), base_out)



def test_merging_unknown_adapter_names_is_refused_before_anything_is_merged_or_unloaded():
    """PEFT skips names a layer lacks, so a typo merged nothing and merge_and_unload dropped the adapter."""
    model = trained(_peft_model("llama"), "llama")
    out = model_output(model, tiny_inputs("llama"))
    for call in (lambda: model.merge_and_unload(adapter_names=["defualt"]),
                 lambda: model.merge_adapter(adapter_names=["defualt"]),
                 lambda: model.base_model.merge_adapter(["defualt"])):
        with pytest.raises(MaskingError, match=r"\['defualt'\] are not adapters of this model; it has \['default'\]"):
            call()
    with pytest.raises(MaskingError, match="pass a list of adapter names"):
        model.merge_and_unload(adapter_names="default")  # a str would be iterated letter by letter
    assert not any(layer.merged for layer in _layers(model).values())
    assert torch.equal(model_output(model, tiny_inputs("llama")), out)  # still the adapted model, unmerged
    merged = model.merge_and_unload(adapter_names=["default"], safe_merge=True)
    assert torch.equal(model_output(merged, tiny_inputs("llama")), out)



def test_low_cpu_mem_usage_is_refused_in_one_line(tmp_path):
    """PEFT's option makes adapter parameters on the meta device; randmask's forward writes W0 + values (it raised
    "Tensor on device meta is not on the expected device cpu!")."""
    _peft_model("llama").save_pretrained(tmp_path)
    for call in (lambda: get_peft_model(tiny_model("llama"), RandMaskConfig(density=0.2), low_cpu_mem_usage=True),
                 lambda: PeftModel.from_pretrained(tiny_model("llama"), tmp_path, low_cpu_mem_usage=True),
                 lambda: _peft_model("llama").load_adapter(tmp_path, adapter_name="b", low_cpu_mem_usage=True)):
        with pytest.raises(MaskingError, match="low_cpu_mem_usage=True is not supported by randmask"):
            call()

def test_peft_hotswap_is_refused_by_peft_in_one_line(tmp_path):
    """PEFT's hotswap_adapter swaps LoRA tensors in place; for randmask its refusal names the type (it raised
    AttributeError: PEFT reads ``peft_type.value``). randmask's hot swap is set_adapter (docs/serving.md)."""
    hotswap = pytest.importorskip("peft.utils.hotswap")
    model = _peft_model("llama")
    model.save_pretrained(tmp_path)
    assert PEFT_TYPE == "RANDMASK" and PEFT_TYPE.value == "RANDMASK"
    with pytest.raises(ValueError, match="RANDMASK was passed"):
        hotswap.hotswap_adapter(model, str(tmp_path), adapter_name="default")


def test_peft_status_and_saved_config_name_the_type(tmp_path):
    """PEFT's get_model_status keeps what follows the dot of str(peft_type) (it reported ''), and the saved
    adapter_config.json holds the plain name that from_pretrained looks up."""
    model = _peft_model("llama")
    assert model.get_model_status().peft_types == {"default": "RANDMASK"}
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "RANDMASK"
    assert isinstance(PeftModel.from_pretrained(tiny_model("llama"), tmp_path), PeftModel)


def test_save_load_in_a_fresh_process_is_bit_exact(tmp_path):
    outs = {}
    for arch in ARCHS:
        model = trained(_peft_model(arch, trainable_ratio=2e-2, seed=3), arch)
        model.save_pretrained(tmp_path / arch)
        outs[arch] = model_output(model, tiny_inputs(arch))
    torch.save(outs, tmp_path / "expected.pt")  # test artefact only
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path[:0] = [{str(REPO_ROOT / "src")!r}, {str(REPO_ROOT)!r}]
        torch.manual_seed(999)  # another global seed must not matter
        import randmask.peft  # registers the method
        from peft import PeftModel
        from tests.conftest import tiny_model, tiny_inputs, model_output
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        for arch in {ARCHS!r}:
            model = PeftModel.from_pretrained(tiny_model(arch), {str(tmp_path)!r} + "/" + arch)
            print(arch, "EQUAL" if torch.equal(model_output(model, tiny_inputs(arch)), expected[arch]) else "DIFF")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.stdout.split() == [w for arch in ARCHS for w in (arch, "EQUAL")], result.stderr[-3000:]


def test_bf16_file_is_two_bytes_per_entry_and_reloads_bit_exact(tmp_path):
    from safetensors.torch import load_file

    model = trained(_peft_model("llama", torch.bfloat16, density=0.5), "llama")
    out = model_output(model, tiny_inputs("llama"))
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    nnz = sum(t.numel() for t in tensors.values())
    assert all(t.dtype == torch.bfloat16 for t in tensors.values()) and set(tensors) == {
        k for k in tensors if k.endswith(".randmask_adapters.values")}
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert size - 8 - 150 * len(tensors) <= 2 * nnz, (size, nnz)
    fresh = PeftModel.from_pretrained(tiny_model("llama").to(torch.bfloat16), tmp_path)
    assert torch.equal(model_output(fresh, tiny_inputs("llama")), out)
    values = [p for n, p in fresh.named_parameters() if n.endswith(".values")]
    assert values and all(v.dtype == torch.float32 and not v.requires_grad for v in values)


def test_another_base_or_a_merged_base_is_refused(tmp_path):
    model = trained(_peft_model("opt"), "opt")
    model.save_pretrained(tmp_path)
    with pytest.raises(MaskingError, match="differ from the base"):
        PeftModel.from_pretrained(tiny_model("opt", seed=1), tmp_path)
    merged = model.merge_and_unload()
    with pytest.raises(MaskingError, match="already has this adapter merged"):
        PeftModel.from_pretrained(merged, tmp_path)


def test_damaged_peft_files_are_refused(tmp_path):
    import json

    from safetensors.torch import load_file, save_file
    from tests.randmask.test_peft_files import reseal

    trained(_peft_model("opt"), "opt").save_pretrained(tmp_path)
    weights, config = tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"
    tensors = load_file(str(weights))
    first = next(iter(tensors))
    header = json.loads(config.read_text())
    save_file({k: v for k, v in tensors.items() if k != first}, str(weights))
    with pytest.raises(MaskingError, match="does not match the weights_sha256"):
        PeftModel.from_pretrained(tiny_model("opt"), tmp_path)
    reseal(tmp_path)  # a careful edit: the checksums recomputed, so the structural checks must hold
    with pytest.raises(MaskingError, match="lacks"):
        PeftModel.from_pretrained(tiny_model("opt"), tmp_path)
    save_file({**tensors, first: tensors[first][:-1]}, str(weights))
    reseal(tmp_path)
    with pytest.raises(MaskingError, match="corrupt"):
        PeftModel.from_pretrained(tiny_model("opt"), tmp_path)
    save_file(tensors, str(weights))
    for edit, match in [({"total_params": "many"}, "positive int"), ({"density": 7}, "outside"),
                        ({"seed": 5}, "does not match the saved checksum"), ({"checksums": {}}, "no checksum")]:
        config.write_text(json.dumps({**header, **edit}))
        if "density" not in edit and "total_params" not in edit:
            with pytest.raises(MaskingError, match="does not match its own config_sha256"):
                PeftModel.from_pretrained(tiny_model("opt"), tmp_path)
        reseal(tmp_path)
        with pytest.raises(MaskingError, match=match):
            PeftModel.from_pretrained(tiny_model("opt"), tmp_path)


def test_multiple_named_adapters(tmp_path):
    inputs = tiny_inputs("llama")
    model = trained(_peft_model("llama"), "llama")
    first = model_output(model, inputs)
    model.add_adapter("second", RandMaskConfig(density=0.1, seed=7))
    assert torch.equal(model_output(model, inputs), first)  # the new adapter is not active yet
    model.set_adapter("second")
    assert all(p.requires_grad == (".second." in n) for n, p in model.named_parameters() if ".values" in n)
    trained(model, "llama")
    second = model_output(model, inputs)
    assert not torch.equal(second, first)
    model.set_adapter("default")
    assert torch.equal(model_output(model, inputs), first)
    model.save_pretrained(tmp_path)  # writes default/ at the root and second/ in a subfolder
    fresh = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    fresh.load_adapter(tmp_path / "second", adapter_name="second")
    assert torch.equal(model_output(fresh, inputs), first)
    fresh.set_adapter("second")
    assert torch.equal(model_output(fresh, inputs), second)
    fresh.delete_adapter("default")
    assert torch.equal(model_output(fresh, inputs), second)


def _lm_rows(arch, n=8):
    ids = tiny_inputs(arch, batch=n)["input_ids"]
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def test_hf_trainer_trains_it_unchanged(tmp_path):
    import transformers

    model = _peft_model("opt")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, learning_rate=5e-2,
                                          per_device_train_batch_size=4, report_to=[], save_strategy="no",
                                          logging_strategy="no", use_cpu=True)
    transformers.Trainer(model=model, args=args, train_dataset=_lm_rows("opt")).train()
    layer = next(iter(_layers(model).values()))
    adapter = layer.randmask_adapters["default"]
    assert adapter.values.detach().abs().sum() > 0
    model_output(model, tiny_inputs("opt"))
    assert torch.equal(layer.get_base_layer().weight.detach().reshape(-1)[adapter.indices],
                       adapter.target_entries(torch.float32))


def test_trl_sft_trainer_trains_it_unchanged(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model = tiny_model("llama")
    config = RandMaskConfig(density=0.2)
    rows = [{"input_ids": r["input_ids"], "completion_mask": [1] * len(r["input_ids"])} for r in _lm_rows("llama")]
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, learning_rate=5e-2, per_device_train_batch_size=4,
                         report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), peft_config=config,
                             processing_class=_tokenizer())
    trainer.train()
    layers = _layers(trainer.model)
    assert layers and any(m.randmask_adapters["default"].values.detach().abs().sum() > 0 for m in layers.values())


def _tokenizer():
    """A tiny word-level tokenizer (vocab 128) so that SFTTrainer has a processing class; no Hub."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t0")


def test_structured_mask_with_empty_matrices_trains_merges_and_reloads(tmp_path):
    inputs = tiny_inputs("llama")
    model = trained(_peft_model("llama", trainable_ratio=2e-3, mask_kind="structured"), "llama")
    nnz = [layer.randmask_adapters["default"].nnz for layer in _layers(model).values()]
    assert 0 in nnz and sum(nnz) > 0  # under one column per matrix: some matrices hold none
    out = model_output(model, inputs)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert torch.equal(model_output(reloaded, inputs), out)
    assert torch.equal(model_output(model.merge_and_unload(), inputs), out)


def test_no_adapter_is_added_over_a_merged_one():
    model = trained(_peft_model("llama"), "llama")
    model.merge_adapter()
    with pytest.raises(MaskingError, match=r"q_proj: this layer has merged adapters; call unmerge_adapter\(\)"):
        model.add_adapter("second", RandMaskConfig(density=0.1, seed=7))


def test_exclude_modules_leaves_modules_out_and_travels_sealed(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*exclude_modules.*")  # PEFT's "no modules were excluded"
        model = _peft_model("llama", density=0.2, exclude_modules=["layers.0.self_attn.q_proj"])
    assert sorted(n for n, m in model.named_modules() if isinstance(m, RandMaskLayer)) == [
        f"base_model.model.model.layers.{i}.self_attn.{p}_proj" for i, p in ((0, "v"), (1, "q"), (1, "v"))]
    trained(model, "llama")
    expected = model_output(model, tiny_inputs("llama"))
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert torch.equal(model_output(reloaded, tiny_inputs("llama")), expected)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["exclude_modules"] = None  # an edit that would mask one module more than the weights hold
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MaskingError, match="config_sha256|edited"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path)


def test_all_linear_adapts_every_linear_but_the_head_and_reloads(tmp_path):
    """PEFT makes ``target_modules="all-linear"`` the set of module names at injection; saved, that set was written in
    its own order, not the one the seal was computed over, so the adapter could not be loaded again."""
    model = _peft_model("llama", density=0.2, target_modules="all-linear")
    assert sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, RandMaskLayer)}) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]  # not lm_head
    trained(model, "llama")
    expected = model_output(model, tiny_inputs("llama"))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert saved == sorted(saved) and len(saved) == 14
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert torch.equal(model_output(reloaded, tiny_inputs("llama")), expected)
