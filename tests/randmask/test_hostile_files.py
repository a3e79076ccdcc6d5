"""Issue 11's probe list, one test each: every hostile or wrong input gets a clear MaskingError."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from tests.conftest import model_output, tiny_inputs, tiny_model, trained
from tests.hostile import fresh_copy

from randmask import MaskingConfig, MaskingError, apply_masking, load_adapter, merge_and_unload, save_adapter
from randmask.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from randmask.files import atomic_write_bytes
from randmask.integrity import CONFIG_CHECKSUM_KEY, config_checksum


def _trained(arch="opt", **cfg):
    return trained(apply_masking(tiny_model(arch), MaskingConfig(**(cfg or {"density": 0.2}))), arch, steps=2)


@pytest.fixture(scope="module")
def _saved_once(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    save_adapter(_trained(), folder)
    return folder


@pytest.fixture
def saved(tmp_path, _saved_once):
    """A fresh copy of one trained adapter (trained once per module) for each test to edit."""
    return fresh_copy(_saved_once, tmp_path, (CONFIG_NAME, WEIGHTS_NAME))


def edit_header(folder, fn, reseal=True):
    """Edit adapter_config.json; ``reseal`` recomputes its checksum (a careful hand edit)."""
    header = json.loads((folder / CONFIG_NAME).read_text())
    fn(header)
    if reseal and isinstance(header, dict):
        header[CONFIG_CHECKSUM_KEY] = config_checksum(header)
    (folder / CONFIG_NAME).write_text(json.dumps(header))


def _recount(header):
    header["trainable"] = sum(m["nnz"] for m in header["matrices"].values())


def _first(header):
    return next(iter(header["matrices"].values()))


def _refused(folder, match, model=None):
    with pytest.raises(MaskingError, match=match):
        load_adapter(model if model is not None else tiny_model("opt"), folder)


@pytest.mark.parametrize("block", [["", -5, 1e9, 52], ["", -5, 10**9, 52], ["", 0, 10**9, 52],
                                   ["", 0, 4, 10**12], ["", 0, 32, 0], ["x", 0, 32]])
def test_huge_or_negative_blocks_are_refused_before_allocating(saved, block):
    edit_header(saved, lambda h: _first(h).update(blocks=[block]))
    _refused(saved, "block|blocks'|expected int|nnz")


def test_nnz_must_match_the_blocks_and_the_values(saved):
    edit_header(saved, lambda h: (_first(h).update(nnz=10**12), _recount(h)))
    _refused(saved, "do not sum to nnz|more than the .* this base model has")


def test_wrong_base_same_architecture(saved):
    _refused(saved, "differ from the base", tiny_model("opt", seed=1))


def test_double_delta_on_a_merged_model(tmp_path):
    model = _trained()
    save_adapter(model, tmp_path)
    _refused(tmp_path, "already has this adapter merged", merge_and_unload(model))


def test_base_fingerprint_passes_across_dtypes(tmp_path):
    model = _trained()
    save_adapter(model, tmp_path)
    # fp32 adapter onto the same base cast to bf16 / fp16: compared in the narrower dtype.
    for dtype in (torch.bfloat16, torch.float16):
        load_adapter(tiny_model("opt").to(dtype), tmp_path)
    half = apply_masking(tiny_model("opt").to(torch.bfloat16), MaskingConfig(density=0.2))
    save_adapter(half, tmp_path / "bf16")
    load_adapter(tiny_model("opt"), tmp_path / "bf16")  # fp32 base, bf16 adapter: compared in bf16
    with pytest.raises(MaskingError, match="verify_base=False"):
        load_adapter(tiny_model("opt").to(torch.float16), tmp_path / "bf16")
    load_adapter(tiny_model("opt").to(torch.float16), tmp_path / "bf16", verify_base=False)


def test_removed_matrix_is_refused(saved):
    header = json.loads((saved / CONFIG_NAME).read_text())
    first = next(iter(header["matrices"]))
    edit_header(saved, lambda h: (h["matrices"].pop(first), _recount(h)), reseal=False)
    _refused(saved, "does not match its own config_sha256")
    edit_header(saved, lambda h: (h["matrices"].pop(first, None), _recount(h)))
    _refused(saved, "do not match the matrices")


def test_empty_adapter_is_refused(saved):
    edit_header(saved, lambda h: h.update(matrices={}, trainable=1))
    _refused(saved, "lists no matrices")


@pytest.mark.parametrize("key", ["masking_config", "base_model", "total_params", "matrices", "weights_sha256",
                                 "config_sha256"])
def test_missing_keys_are_clear(saved, key):
    edit_header(saved, lambda h: h.pop(key), reseal=key != "config_sha256")
    _refused(saved, f"lacks '{key}'")


@pytest.mark.parametrize("edit,match", [
    (lambda h: h.update(format_version="2"), "not an int"),
    (lambda h: h.update(format_version=1), "format_version 1"),
    (lambda h: h.update(format_version=99), "Upgrade randmask"),
    (lambda h: _first(h).update(blocks="garbage"), "expected list"),
    (lambda h: _first(h).update(blocks=[["", "a", None, 3]]), r"not \[name, start, stop, nnz\]"),
    (lambda h: _first(h).update(stored_shape=[32]), "stored_shape"),
    (lambda h: h["masking_config"].update(density="high"), "density"),
    (lambda h: h["masking_config"].update(mask_kind=[1]), "mask_kind"),
    (lambda h: h["masking_config"].update(targets=[3]), "targets"),
    (lambda h: h.update(masking_config=[]), "expected dict"),
    (lambda h: h.update(total_params=True), "expected int"),
])
def test_garbage_fields_give_masking_errors(saved, edit, match):
    edit_header(saved, edit)
    _refused(saved, match)


def test_nan_in_config_is_refused(saved):
    text = (saved / CONFIG_NAME).read_text().replace('"density": 0.2', '"density": NaN')
    (saved / CONFIG_NAME).write_text(text)
    _refused(saved, "not JSON")


def _custom_adapter(folder, indices):
    model = tiny_model("opt")
    names = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    apply_masking(model, MaskingConfig(mask_kind="custom"), custom_masks={n: indices for n in names})
    save_adapter(model, folder)
    return names


def _rewrite_indices(folder, name, new):
    from safetensors.torch import load_file
    from safetensors.torch import save as st_save

    tensors = load_file(str(folder / WEIGHTS_NAME))
    tensors[f"{name}.indices"] = new
    blob = st_save(tensors, metadata={"format": "randmask-adapter"})
    (folder / WEIGHTS_NAME).write_bytes(blob)
    import hashlib

    from randmask.masks import indices_checksum

    def fix(h):
        h["weights_sha256"] = hashlib.sha256(blob).hexdigest()
        h["matrices"][name]["indices_checksum"] = indices_checksum(new)
    edit_header(folder, fix)


@pytest.mark.parametrize("bad", [torch.tensor([-1, 0, 5]), torch.tensor([0, 5, 32 * 32]),
                                 torch.tensor([5, 0, 7]), torch.tensor([0, 0, 7]),
                                 torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0, 1, 2], dtype=torch.int32)])
def test_crafted_custom_indices_with_matching_checksums(tmp_path, bad):
    name = _custom_adapter(tmp_path, torch.tensor([0, 7, 100]))[0]
    _rewrite_indices(tmp_path, name, bad)
    _refused(tmp_path, "stored indices")


def test_custom_masks_are_checked_at_apply():
    model = tiny_model("opt")
    names = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    cfg = MaskingConfig(mask_kind="custom")
    probes = [({n: torch.tensor([1.7, 2.2]) for n in names}, "silently truncated"),
              ({n: torch.tensor([-1, 3]) for n in names}, "outside"),
              ({n: torch.tensor([0, 32 * 32]) for n in names}, "outside"),
              ({n: torch.tensor([3, 3]) for n in names}, "duplicates"),
              ({**{n: torch.tensor([1]) for n in names}, "model.decoder.nope": torch.tensor([1])}, "not targets")]
    for masks, match in probes:
        with pytest.raises(MaskingError, match=match):
            apply_masking(tiny_model("opt"), cfg, custom_masks=masks)
    with pytest.raises(MaskingError, match="used only with mask_kind='custom'"):
        apply_masking(tiny_model("opt"), MaskingConfig(density=0.1), custom_masks={names[0]: torch.tensor([1])})


def test_string_targets():
    a = apply_masking(tiny_model("opt"), MaskingConfig(density=0.2, targets="q_proj"))
    b = apply_masking(tiny_model("opt"), MaskingConfig(density=0.2, targets=["q_proj"]))
    assert [n for n, _ in a.named_modules() if n.endswith("q_proj")] == \
           [n for n, _ in b.named_modules() if n.endswith("q_proj")]
    assert sum(p.numel() for p in a.parameters() if p.requires_grad) > 0
    with pytest.raises(MaskingError, match="not a valid regular expression"):
        apply_masking(tiny_model("opt"), MaskingConfig(density=0.2, targets="["))


@pytest.mark.parametrize("cast", [lambda m: m.half(), lambda m: m.to(torch.bfloat16)])
def test_casting_after_apply_keeps_fp32_master_values(cast):
    model = apply_masking(tiny_model("llama"), MaskingConfig(density=0.2))
    params = [p for p in model.parameters() if p.requires_grad]
    cast(model)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert [p for p in model.parameters() if p.requires_grad][0] is params[0]  # the optimizer's objects
    opt = torch.optim.AdamW(params, lr=1e-3)
    inputs = tiny_inputs("llama")
    for _ in range(5):
        loss = model(**inputs).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in params)
    assert model_output(model, inputs).dtype != torch.float32
    model.double()  # fp64 is wide enough: the master values follow it
    assert all(p.dtype == torch.float64 for p in params)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "f.bin", b"x")
        save_adapter(_trained(), tmp_path / "a")
    finally:
        os.umask(old)
    for path in (tmp_path / "f.bin", tmp_path / "a" / WEIGHTS_NAME, tmp_path / "a" / CONFIG_NAME):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
