"""The PEFT path: adapter_names=[...] in forward/generate, and add_weighted_adapter for randmask adapters."""

import pytest
import torch
from tests.conftest import tiny_model

from randmask import MaskingError

peft = pytest.importorskip("peft")
from randmask.peft import RandMaskConfig, RandMaskLayer  # noqa: E402

NAMES = ["x", "y", "z"]  # (PEFT warns about names contained in the prefix "randmask_", e.g. "a")


def _peft(arch, density=0.1):
    model = peft.get_peft_model(tiny_model(arch), RandMaskConfig(density=density, seed=0), adapter_name="x")
    model.add_adapter("y", RandMaskConfig(density=density, seed=1))
    model.add_adapter("z", RandMaskConfig(density=density, seed=2,
                                          target_modules=["v_proj"] if arch == "llama" else None))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, RandMaskLayer):
                for adapter in layer.randmask_adapters.values():
                    adapter.values.copy_(torch.randn(adapter.nnz, generator=gen) * 0.3)
    return model.eval()


def _alone(model, ids, names, **kw):
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(_call(model, ids[i:i + 1], **kw))
        else:
            model.set_adapter(name)
            rows.append(_call(model, ids[i:i + 1], **kw))
    return torch.cat(rows)


def _call(model, ids, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, **kw) if kw else model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_with_adapter_names_equals_each_sample_alone(arch):
    model = _peft(arch)
    names = ["y", "__base__", "x", "z", "y"]
    ids = torch.randint(1, 128, (5, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(mixed, _alone(model, ids, names), atol=1e-5, rtol=0)


def test_generate_with_adapter_names_greedy_and_beams_equals_each_prompt_alone():
    model = _peft("llama")
    names = ["z", "x", "__base__"]
    ids = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(2))
    for kw in ({"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0},
               {"max_new_tokens": 4, "num_beams": 2, "do_sample": False, "pad_token_id": 0}):
        with torch.no_grad():
            mixed = model.generate(input_ids=ids, adapter_names=names, **kw)
        assert torch.equal(mixed, _alone(model, ids, names, **kw))


def test_generate_with_adapter_names_reads_beams_from_the_models_generation_config():
    """``model.generation_config.num_beams = 2`` expands each prompt to 2 rows, as the keyword does: the names
    were read as 1 row per prompt and generate failed, saying the names were mis-sized."""
    model = _peft("llama")
    model.base_model.model.generation_config.num_beams = 2
    names, kw = ["z", "x", "__base__"], {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    ids = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=names, **kw)
    assert torch.equal(mixed, _alone(model, ids, names, **kw))


def test_what_adapter_names_cannot_honour_is_refused():
    model = _peft("llama")
    ids = torch.randint(1, 128, (2, 5))
    with pytest.raises(MaskingError, match="does not have"):
        model(input_ids=ids, adapter_names=["x", "nope"])
    with pytest.raises(MaskingError, match="one adapter name per sample"):
        model(input_ids=ids, adapter_names=["x", "y", "z"])
    with pytest.raises(MaskingError, match="aLoRA"):
        model(input_ids=ids, alora_offsets=[1, 1])
    model.merge_adapter(["x"])
    with pytest.raises(MaskingError, match="unmerge"):
        model(input_ids=ids, adapter_names=["x", "y"])
    model.unmerge_adapter()
    model.train()
    with pytest.raises(MaskingError, match="eval"):
        model(input_ids=ids, adapter_names=["x", "y"])


def test_add_weighted_adapter_matches_the_free_function_merge_and_refuses_saving(tmp_path):
    model = _peft("llama")
    model.add_weighted_adapter(["x", "y"], [1.0, 0.5], "xy")
    ids = torch.randint(1, 128, (2, 7))
    model.set_adapter("xy")
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    reference = tiny_model("llama")
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, RandMaskLayer):
                delta = torch.zeros(layer.get_base_layer().weight.numel())
                for adapter, w in (("x", 1.0), ("y", 0.5)):
                    delta[layer.randmask_adapters[adapter].indices] += w * layer.randmask_adapters[adapter].values
                reference.get_submodule(name.removeprefix("base_model.model.")).weight.view(-1).add_(delta)
        torch.testing.assert_close(merged, reference(input_ids=ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(MaskingError, match="selected_adapters"):
        model.save_pretrained(tmp_path / "all")
    model.save_pretrained(tmp_path / "sources", selected_adapters=["x"])  # the sources still save
    with pytest.raises(MaskingError, match="SVD"):
        model.add_weighted_adapter(["x", "y"], [1.0, 1.0], "m", svd_rank=4)
    with pytest.raises(MaskingError, match="already exists"):
        model.add_weighted_adapter(["x", "y"], [1.0, 1.0], "xy")
    model.add_weighted_adapter(["x", "y", "z"], [1.0, 1.0, 1.0], "t", combination_type="ties", density=0.5)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, adapter_names=["t", "xy"]).logits[1], merged[1],
                                   atol=1e-5, rtol=0)


def test_adapter_names_in_bf16_within_the_stated_tolerance():
    """bf16, as in the free API's test: the delta (fp32, rounded once) on the bf16 base output vs W0 + v rounded to
    bf16 in the weight. Stated tolerance 1e-2 absolute on logits of magnitude ~0.5 (about two bf16 ulps)."""
    model = _peft("llama").to(torch.bfloat16)
    names = ["x", "__base__", "z", "y"]
    ids = torch.randint(1, 128, (4, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), _alone(model, ids, names).float(), atol=1e-2, rtol=0)


def test_a_partition_is_sealed_in_the_saved_config(tmp_path):
    import json

    from randmask.peft_files import CONFIG_NAME, config_checksum

    model = peft.get_peft_model(tiny_model("llama"), RandMaskConfig(density=0.05, seed=3, partition=[1, 4]))
    ids = torch.randint(1, 128, (2, 6))
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, RandMaskLayer):
                layer.randmask_adapters["default"].values.normal_()
        out = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, out)
    path = tmp_path / CONFIG_NAME
    data = json.loads(path.read_text())
    data["partition"] = [2, 4]  # another part of the same draw: caught by the config checksum
    path.write_text(json.dumps(data))
    with pytest.raises(MaskingError):
        peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    data["partition"] = [4, 4]
    data["config_sha256"] = config_checksum(data)  # resealed: the field's own check refuses it
    path.write_text(json.dumps(data))
    with pytest.raises(MaskingError, match="partition"):
        peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)


def _with_saved_heads():
    """Two adapters whose trained ``modules_to_save`` copies of lm_head differ (as after training each)."""
    model = peft.get_peft_model(tiny_model("llama"), RandMaskConfig(density=0.1, seed=0, modules_to_save=["lm_head"]),
                                adapter_name="x")
    model.add_adapter("y", RandMaskConfig(density=0.1, seed=1, modules_to_save=["lm_head"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for copy in model.base_model.model.lm_head.modules_to_save.values():
            copy.weight.add_(torch.randn(copy.weight.shape, generator=gen))
    return model.eval()


def test_adapter_names_run_each_row_through_its_own_modules_to_save_copy():
    """Every row went through the active adapter's lm_head copy (max error 38.6 on a row of the other adapter)."""
    model = _with_saved_heads()
    names = ["y", "__base__", "x", "y"]
    ids = torch.randint(1, 128, (4, 6), generator=torch.Generator().manual_seed(4))
    model.set_adapter("x")
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(mixed, _alone(model, ids, names), atol=1e-5, rtol=0)
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    model.set_adapter("x")
    assert torch.equal(_call(model, ids[:2], adapter_names=names[:2], **kw), _alone(model, ids[:2], names[:2], **kw))


def test_add_weighted_adapter_refuses_adapters_with_modules_to_save():
    """The merge dropped both trained heads silently (the merged adapter ran the original lm_head)."""
    with pytest.raises(MaskingError, match=r"adapters \['x', 'y'\] train modules_to_save copies"):
        _with_saved_heads().add_weighted_adapter(["x", "y"], [0.5, 0.5], "xy")
