"""Issue 28, the PEFT path: PeftModel.from_pretrained runs every check randmask.load_adapter runs.

Each hostile edit is tried twice where it matters: as is (the checksums catch it) and resealed (a careful
editor recomputed them), where the structural checks must still refuse it.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from tests.conftest import model_output, tiny_inputs, tiny_model, trained
from tests.hostile import fresh_copy

from randmask import MaskingError

peft = pytest.importorskip("peft")
from peft import PeftModel, get_peft_model, set_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from randmask.peft import RandMaskConfig  # noqa: E402
from randmask.peft_files import CONFIG_NAME, OPT_OUT, WEIGHTS_NAME, config_checksum  # noqa: E402

K_PROJ = "base_model.model.model.decoder.layers.0.self_attn.k_proj.weight"


def reseal(folder) -> None:
    """Recompute the weights and config checksums after an edit (what a careful attacker does)."""
    path = folder / CONFIG_NAME
    data = json.loads(path.read_text())
    data["weights_sha256"] = hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()
    data["config_sha256"] = config_checksum(data)
    path.write_text(json.dumps(data))


def _edit(folder, fn, sealed: bool = True) -> None:
    path = folder / CONFIG_NAME
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))
    if sealed:
        reseal(folder)


def _trained(arch="opt", **cfg):
    return trained(get_peft_model(tiny_model(arch), RandMaskConfig(**(cfg or {"density": 0.2}))), arch, steps=2)


@pytest.fixture(scope="module")
def _saved_once(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft_adapter")
    model = _trained()
    model.save_pretrained(folder)
    torch.save(model_output(model, tiny_inputs("opt")), folder / "expected.pt")
    return folder


@pytest.fixture
def saved(tmp_path, _saved_once):
    """A fresh copy of one trained adapter (trained once per module) for each test to edit."""
    return fresh_copy(_saved_once, tmp_path, (CONFIG_NAME, WEIGHTS_NAME))


def _expected(_saved_once):
    return torch.load(_saved_once / "expected.pt", weights_only=True)


def test_a_saved_adapter_is_sealed_and_loads_bit_exact(saved, _saved_once):
    data = json.loads((saved / CONFIG_NAME).read_text())
    assert data["weights_sha256"] == hashlib.sha256((saved / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert data["config_sha256"] == config_checksum(data) and data["mask_kind_version"] == 1
    model = PeftModel.from_pretrained(tiny_model("opt"), saved)
    assert torch.equal(model_output(model, tiny_inputs("opt")), _expected(_saved_once))


def test_a_config_without_checksums_is_refused_naming_the_opt_out(saved, _saved_once):
    _edit(saved, lambda d: d.pop("checksums"), sealed=False)
    for base in (tiny_model("opt"), tiny_model("opt", seed=1)):
        with pytest.raises(MaskingError, match=f"has no checksums.*{OPT_OUT}=True"):
            PeftModel.from_pretrained(base, saved)
    model = PeftModel.from_pretrained(tiny_model("opt"), saved, **{OPT_OUT: True})  # the user's explicit choice
    assert torch.equal(model_output(model, tiny_inputs("opt")), _expected(_saved_once))


@pytest.mark.parametrize("sealed", [False, True])
def test_another_base_a_merged_base_and_a_swapped_seed_are_refused(saved, _saved_once, sealed):
    with pytest.raises(MaskingError, match="differ from the base"):
        PeftModel.from_pretrained(tiny_model("opt", seed=1), saved)
    merged = PeftModel.from_pretrained(tiny_model("opt"), saved).merge_and_unload()
    with pytest.raises(MaskingError, match="differ from the base"):  # the delta would be applied twice
        PeftModel.from_pretrained(merged, saved)
    _edit(saved, lambda d: d.update(seed=d["seed"] + 1), sealed=sealed)
    match = "does not match the saved checksum" if sealed else "does not match its own config_sha256"
    with pytest.raises(MaskingError, match=match):
        PeftModel.from_pretrained(tiny_model("opt"), saved)


@pytest.mark.parametrize("sealed", [False, True])
def test_a_tensor_named_like_a_base_weight_never_overwrites_it(saved, sealed):
    tensors = load_file(str(saved / WEIGHTS_NAME))
    save_file({**tensors, K_PROJ: torch.zeros(32, 32)}, str(saved / WEIGHTS_NAME), metadata={"format": "pt"})
    if sealed:
        reseal(saved)
    base = tiny_model("opt")
    before = base.model.decoder.layers[0].self_attn.k_proj.weight.detach().clone()
    with pytest.raises(MaskingError, match="weights_sha256" if not sealed else "k_proj.weight"):
        PeftModel.from_pretrained(base, saved)
    assert torch.equal(base.model.decoder.layers[0].self_attn.k_proj.weight, before)


def test_the_opt_out_still_refuses_foreign_tensors_and_damage(saved):
    _edit(saved, lambda d: d.pop("checksums"), sealed=False)
    tensors = load_file(str(saved / WEIGHTS_NAME))
    save_file({**tensors, K_PROJ: torch.zeros(32, 32)}, str(saved / WEIGHTS_NAME), metadata={"format": "pt"})
    with pytest.raises(MaskingError, match="k_proj.weight"):
        PeftModel.from_pretrained(tiny_model("opt"), saved, **{OPT_OUT: True})


def test_in_memory_state_dicts_are_checked_too():
    model = _trained()
    state = {k.replace(".default", ""): v for k, v in model.state_dict().items() if ".randmask_adapters." in k}
    with pytest.raises(MaskingError, match="neither randmask values nor modules_to_save"):
        set_peft_model_state_dict(model, {**state, K_PROJ: torch.zeros(32, 32)})


@pytest.mark.parametrize("sealed", [False, True])
def test_a_truncated_weights_file_is_a_masking_error(saved, sealed):
    blob = (saved / WEIGHTS_NAME).read_bytes()
    (saved / WEIGHTS_NAME).write_bytes(blob[: len(blob) // 2])
    if sealed:
        reseal(saved)
    with pytest.raises(MaskingError, match="not a readable safetensors file" if sealed else "weights_sha256"):
        PeftModel.from_pretrained(tiny_model("opt"), saved)


@pytest.mark.parametrize("name", [WEIGHTS_NAME, CONFIG_NAME])
def test_a_file_linked_to_dev_zero_is_refused_unread(saved, name):
    from tests.hostile import replace_with_dev_zero, run_limited

    replace_with_dev_zero(saved / name)
    result = run_limited(f"""
        try:
            PeftModel.from_pretrained(tiny_model("opt"), {str(saved)!r})
        except MaskingError as e:
            print("REFUSED", e)
    """, imports="import randmask.peft\nfrom peft import PeftModel\nfrom randmask import MaskingError\n"
                 "from tests.conftest import tiny_model")
    assert "REFUSED" in result.stdout and "not a regular file" in result.stdout, result.stderr[-2000:]


def test_a_weights_file_far_larger_than_the_masks_need_is_refused(saved):
    with open(saved / WEIGHTS_NAME, "r+b") as f:  # sparse: costs nothing on disk, 4 GiB to a naive reader
        f.truncate(4 << 30)
    with pytest.raises(MaskingError, match="over the .*-byte limit"):
        PeftModel.from_pretrained(tiny_model("opt"), saved)


def test_a_pickled_weights_file_is_never_loaded(saved):
    os.replace(saved / WEIGHTS_NAME, saved / "adapter_model.bin")
    with pytest.raises(MaskingError, match="never loads pickles"):
        PeftModel.from_pretrained(tiny_model("opt"), saved)


def test_a_pickled_save_is_refused_and_never_seals_an_older_weights_file(tmp_path):
    """save_pretrained(..., safe_serialization=False) over an earlier save sealed the earlier safetensors file, which
    then loaded as verified: the old adapter, silently."""
    model = _trained()
    model.save_pretrained(tmp_path)
    first = model_output(PeftModel.from_pretrained(tiny_model("opt"), tmp_path), tiny_inputs("opt"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    with pytest.raises(MaskingError, match="safe_serialization=False"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()  # peft wrote it; the folder keeps the earlier save
    assert torch.equal(model_output(PeftModel.from_pretrained(tiny_model("opt"), tmp_path), tiny_inputs("opt")), first)
    model.save_pretrained(tmp_path)  # a safetensors save over the pickle's leftover is fine, and loads the new values
    assert torch.equal(model_output(PeftModel.from_pretrained(tiny_model("opt"), tmp_path), tiny_inputs("opt")),
                       model_output(model, tiny_inputs("opt")))


@pytest.mark.parametrize(("edit", "match", "sealed"), [
    (lambda d: d.update(checksums={"x": "y"}), "checksums is", True),
    (lambda d: d.update(config_sha256=7), "config_sha256 is", False),
    (lambda d: d.update(seed=1e30), "seed is", True),
    (lambda d: d.update(target_modules=[3]), "target_modules is", True),
    (lambda d: d.update(mask_kind_version=99), "sampler version 99", True),
])
def test_bad_fields_are_one_line_masking_errors(saved, edit, match, sealed):
    _edit(saved, edit, sealed=sealed)
    with pytest.raises(MaskingError, match=match):
        PeftModel.from_pretrained(tiny_model("opt"), saved)


def test_nan_and_garbage_json_are_refused(saved):
    text = (saved / CONFIG_NAME).read_text().replace('"density": 0.2', '"density": NaN')
    (saved / CONFIG_NAME).write_text(text)
    with pytest.raises(MaskingError, match="not JSON"):
        PeftModel.from_pretrained(tiny_model("opt"), saved)


def test_verify_base_false_is_the_named_way_past_the_fingerprint(saved):
    other = tiny_model("opt", seed=1)
    model = PeftModel.from_pretrained(other, saved, randmask_verify_base=False)
    assert any(n.endswith(".values") for n, _ in model.named_parameters())


def test_peft_reads_every_local_config_through_the_bounded_reader(tmp_path, saved):
    """PEFT's own first read of adapter_config.json (it picks the config class) goes through randmask's reader once
    randmask.peft is imported: garbage is a MaskingError (a ValueError, as PEFT's JSONDecodeError is) and a FIFO is
    refused unread, for every adapter type; other adapters load as before."""
    from peft import LoraConfig
    from tests.hostile import hang_guard, replace_with_fifo

    lora = get_peft_model(tiny_model("opt"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    loaded = PeftModel.from_pretrained(tiny_model("opt"), tmp_path / "lora")
    assert torch.equal(model_output(loaded, tiny_inputs("opt")), model_output(lora, tiny_inputs("opt")))
    for folder in (saved, tmp_path / "lora"):
        (folder / CONFIG_NAME).write_text('{"peft_type": "RAND')
        with pytest.raises(MaskingError, match="is not valid JSON"):
            PeftModel.from_pretrained(tiny_model("opt"), folder)
        replace_with_fifo(folder / CONFIG_NAME)
        with hang_guard(30), pytest.raises(MaskingError, match="not a regular file"):
            PeftModel.from_pretrained(tiny_model("opt"), folder)
