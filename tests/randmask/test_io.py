"""save_adapter / load_adapter: round trips, sizes, and every way a file can be wrong."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from tests.conftest import REPO_ROOT, model_output, tiny_inputs, tiny_model, trained

from randmask import MaskingConfig, MaskingError, apply_masking, load_adapter, save_adapter
from randmask.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from randmask.integrity import config_checksum


def _trained(arch="opt", dtype=torch.float32, **cfg):
    model = tiny_model(arch).to(dtype)
    apply_masking(model, MaskingConfig(**(cfg or {"density": 0.2})))
    return trained(model, arch, steps=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bit_exact(tmp_path, arch, dtype):
    model = _trained(arch, dtype)
    inputs = tiny_inputs(arch)
    out = model_output(model, inputs)
    save_adapter(model, tmp_path)
    torch.manual_seed(1234)  # another global seed must not matter
    fresh = load_adapter(tiny_model(arch).to(dtype), tmp_path)
    assert torch.equal(model_output(fresh, inputs), out)
    assert not any(p.requires_grad for p in fresh.parameters())
    resumed = load_adapter(tiny_model(arch).to(dtype), tmp_path, is_trainable=True)
    assert all(n.endswith(".values") for n, p in resumed.named_parameters() if p.requires_grad)


def test_round_trip_in_a_fresh_process(tmp_path):
    model = _trained("llama")
    inputs = tiny_inputs("llama")
    torch.save(model_output(model, inputs), tmp_path / "expected.pt")  # test artefact only
    save_adapter(model, tmp_path / "adapter")
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path[:0] = [{str(REPO_ROOT / "src")!r}, {str(REPO_ROOT)!r}]
        from tests.conftest import tiny_model, tiny_inputs, model_output
        from randmask import load_adapter
        model = load_adapter(tiny_model("llama"), {str(tmp_path / "adapter")!r})
        out = model_output(model, tiny_inputs("llama"))
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        print("EQUAL" if torch.equal(out, expected) else "DIFFERENT")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.stdout.strip().endswith("EQUAL"), result.stderr


@pytest.mark.parametrize("dtype,limit", [(torch.bfloat16, 2.1), (torch.float32, 4.1)])
def test_adapter_size(tmp_path, dtype, limit):
    model = _trained("opt", dtype, density=0.5)
    save_adapter(model, tmp_path)
    header = json.loads((tmp_path / CONFIG_NAME).read_text())
    n_tensors = len(header["matrices"])
    size = (tmp_path / WEIGHTS_NAME).stat().st_size
    # safetensors' JSON header costs ~100 bytes per tensor; the payload must be within the limit.
    payload = size - 8 - 100 * n_tensors
    assert payload <= limit * header["trainable"], (size, header["trainable"])
    assert header["masking_config"]["density"] == 0.5 and header["trainable"] > 0
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files


def test_custom_mask_round_trip(tmp_path):
    model = tiny_model("bert")
    masks = {n: torch.tensor([0, 7, 100]) for n, _ in model.named_modules() if n.endswith(("query", "value"))}
    apply_masking(model, MaskingConfig(mask_kind="custom"), custom_masks=masks)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(0.5)
    inputs = tiny_inputs("bert")
    out = model_output(model, inputs)
    save_adapter(model, tmp_path)
    assert torch.equal(model_output(load_adapter(tiny_model("bert"), tmp_path), inputs), out)


def test_another_base_model_is_rejected(tmp_path):
    save_adapter(_trained("opt"), tmp_path)
    with pytest.raises(MaskingError, match="saved from a 'opt' model"):
        load_adapter(tiny_model("llama"), tmp_path)
    import transformers as tf

    bigger = tf.OPTForCausalLM(tf.OPTConfig(hidden_size=48, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                                            vocab_size=128, max_position_embeddings=64, word_embed_proj_dim=48))
    with pytest.raises(MaskingError, match="parameters"):
        load_adapter(bigger, tmp_path)


def _edit_header(tmp_path, fn):
    header = json.loads((tmp_path / CONFIG_NAME).read_text())
    fn(header)
    header["config_sha256"] = config_checksum(header)  # a careful hand edit reseals the config
    (tmp_path / CONFIG_NAME).write_text(json.dumps(header))


def test_seed_or_name_edits_are_detected(tmp_path):
    save_adapter(_trained("opt"), tmp_path)
    original = (tmp_path / CONFIG_NAME).read_text()
    (tmp_path / CONFIG_NAME).write_text(original.replace('"seed": 0', '"seed": 99'))
    with pytest.raises(MaskingError, match="does not match its own config_sha256"):
        load_adapter(tiny_model("opt"), tmp_path)
    _edit_header(tmp_path, lambda h: h["masking_config"].update(seed=99))
    with pytest.raises(MaskingError, match="does not match the saved checksum"):
        load_adapter(tiny_model("opt"), tmp_path)
    _edit_header(tmp_path, lambda h: h["masking_config"].update(seed=0))
    _edit_header(tmp_path, lambda h: h.update(matrices={k.replace("layers.0", "layers.9"): v
                                                       for k, v in h["matrices"].items()}))
    with pytest.raises(MaskingError, match="do not match the matrices|not a Linear/Conv1D module"):
        load_adapter(tiny_model("opt"), tmp_path)


def test_truncated_and_corrupt_files(tmp_path):
    save_adapter(_trained("opt"), tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(MaskingError, match="truncated, corrupt"):
        load_adapter(tiny_model("opt"), tmp_path)
    weights.write_bytes(blob)
    (tmp_path / CONFIG_NAME).write_text('{"format": "randmask-ad')
    with pytest.raises(MaskingError, match="not valid JSON"):
        load_adapter(tiny_model("opt"), tmp_path)
    (tmp_path / CONFIG_NAME).unlink()
    with pytest.raises(MaskingError, match="not found"):
        load_adapter(tiny_model("opt"), tmp_path)


def test_non_finite_values_are_refused(tmp_path):
    model = _trained("opt")
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad)[0] = float("nan")
    with pytest.raises(MaskingError, match="not finite"):
        save_adapter(model, tmp_path)
    assert not (tmp_path / WEIGHTS_NAME).exists()


def test_saving_onto_a_file_is_refused_by_name(tmp_path):
    target = tmp_path / "adapter.bin"
    target.write_bytes(b"keep")
    with pytest.raises(MaskingError, match="is a file; save_adapter writes a folder"):
        save_adapter(_trained("opt"), target)
    assert target.read_bytes() == b"keep"


def test_loading_twice_under_one_name(tmp_path):
    save_adapter(_trained("opt"), tmp_path)
    model = load_adapter(tiny_model("opt"), tmp_path)
    with pytest.raises(MaskingError, match="already has an adapter"):
        load_adapter(model, tmp_path)
    load_adapter(model, tmp_path, adapter_name="second")


def test_ratio_budget_round_trip_on_fused_blocks(tmp_path):
    # trainable_ratio + GPT-2's fused c_attn[q,v] (Conv1D, transposed): densities must be recomputed
    # on load exactly as apply_masking computed them, or the regenerated masks would not match.
    model = _trained("gpt2", trainable_ratio=1e-2)
    inputs = tiny_inputs("gpt2")
    out = model_output(model, inputs)
    save_adapter(model, tmp_path)
    assert torch.equal(model_output(load_adapter(tiny_model("gpt2"), tmp_path), inputs), out)


def test_structured_adapter_with_empty_matrices_round_trips(tmp_path):
    # 2e-3 of the tiny llama: some q/v matrices are allotted no column (nnz 0) and are saved as such.
    model = _trained("llama", trainable_ratio=2e-3, mask_kind="structured")
    inputs = tiny_inputs("llama")
    out = model_output(model, inputs)
    save_adapter(model, tmp_path)
    header = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert header["mask_kind_version"] == 2
    assert any(info["nnz"] == 0 for info in header["matrices"].values())
    assert torch.equal(model_output(load_adapter(tiny_model("llama"), tmp_path), inputs), out)


def test_structured_adapter_of_the_old_sampler_is_refused_by_name(tmp_path):
    save_adapter(_trained("llama", trainable_ratio=2e-3, mask_kind="structured"), tmp_path)
    _edit_header(tmp_path, lambda h: h.pop("mask_kind_version"))  # as randmask < 0.4 wrote it
    with pytest.raises(MaskingError, match="drawn by sampler version 1; this randmask .* draws version 2"):
        load_adapter(tiny_model("llama"), tmp_path)
