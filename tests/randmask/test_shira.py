"""SHiRA interop against the installed peft: export loads in stock PEFT; import reproduces SHiRA."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from tests.conftest import REPO_ROOT, model_output, tiny_inputs, tiny_model, trained

from randmask import MaskingConfig, MaskingError, apply_masking, load_adapter, save_adapter

peft = pytest.importorskip("peft")
from peft import PeftModel, ShiraConfig, get_peft_model  # noqa: E402

from randmask.peft import RandMaskConfig, export_shira, import_shira  # noqa: E402


def _stock_peft_outputs(tmp_path, cases):
    """Outputs of stock PeftModel.from_pretrained on SHiRA folders, in one process where randmask cannot import.

    ``cases``: (arch, dtype name, folder) triples.
    """
    code = textwrap.dedent(f"""
        import sys, torch
        sys.modules["randmask"] = None  # plain PEFT: any import of randmask fails
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from peft import PeftModel
        from tests.conftest import tiny_model, tiny_inputs, model_output
        outs = []
        for arch, dtype, folder in {[(a, d, str(f)) for a, d, f in cases]!r}:
            model = PeftModel.from_pretrained(tiny_model(arch).to(getattr(torch, dtype)), folder)
            outs.append(model_output(model, tiny_inputs(arch)))
        assert "randmask" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
        torch.save(outs, {str(tmp_path / "stock.pt")!r})
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "stock.pt", weights_only=True)


def test_export_loads_in_stock_peft_without_randmask(tmp_path):
    """fp32 OPT and Llama: equal to randmask's outputs; a bf16 base: equal within bf16 rounding."""
    cases, expected = [], []
    for arch, dtype, cfg in [("opt", "float32", {"trainable_ratio": 1e-2}), ("llama", "float32", {"density": 0.1}),
                             ("opt", "bfloat16", {"density": 0.05})]:
        base = tiny_model(arch).to(getattr(torch, dtype))
        model = trained(get_peft_model(base, RandMaskConfig(**cfg)), arch)
        expected.append(model_output(model, tiny_inputs(arch)))
        folder = tmp_path / f"{arch}-{dtype}"
        export_shira(model, folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "SHIRA" and config["r"] >= 1
        cases.append((arch, dtype, folder))
    outs = _stock_peft_outputs(tmp_path, cases)
    torch.testing.assert_close(outs[0], expected[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[1], expected[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[2].float(), expected[2].float(), rtol=2e-2, atol=2e-2)


def test_export_from_a_randmask_folder_and_model(tmp_path):
    model = trained(apply_masking(tiny_model("llama"), MaskingConfig(density=0.1, mask_kind="random_exact")), "llama")
    expected = model_output(model, tiny_inputs("llama"))
    save_adapter(model, tmp_path / "rm")
    export_shira(tmp_path / "rm", tmp_path / "from_dir")
    export_shira(model, tmp_path / "from_model")
    for folder in ("from_dir", "from_model"):
        shira = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / folder)
        torch.testing.assert_close(model_output(shira, tiny_inputs("llama")), expected, rtol=0, atol=1e-6)


def test_export_of_a_structured_adapter_with_empty_matrices(tmp_path):
    # Under one column per matrix some matrices hold no entry: SHiRA gets them as all-zero updates.
    model = trained(apply_masking(tiny_model("llama"), MaskingConfig(trainable_ratio=2e-3, mask_kind="structured")),
                   "llama")
    expected = model_output(model, tiny_inputs("llama"))
    export_shira(model, tmp_path / "shira")
    shira = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "shira")
    torch.testing.assert_close(model_output(shira, tiny_inputs("llama")), expected, rtol=0, atol=1e-6)


def test_gpt2_conv1d_is_refused(tmp_path):
    model = get_peft_model(tiny_model("gpt2"), RandMaskConfig(density=0.1))
    with pytest.raises(MaskingError, match="SHiRA supports torch.nn.Linear only"):
        export_shira(model, tmp_path)


def test_file_sizes_side_by_side(tmp_path):
    """randmask bf16 ~2 bytes/entry against SHiRA's ~12 (fp32 value + two int32 indices)."""
    model = trained(apply_masking(tiny_model("llama").to(torch.bfloat16), MaskingConfig(density=0.5)), "llama")
    save_adapter(model, tmp_path / "rm")
    export_shira(model, tmp_path / "shira")
    header = json.loads((tmp_path / "rm" / "adapter_config.json").read_text())
    nnz = header["trainable"]
    rm_size = (tmp_path / "rm" / "adapter.safetensors").stat().st_size
    shira_size = (tmp_path / "shira" / "adapter_model.safetensors").stat().st_size
    print(f"entries {nnz}: randmask {rm_size} B ({rm_size / nnz:.2f} B/entry), "
          f"SHiRA {shira_size} B ({shira_size / nnz:.2f} B/entry)")
    assert rm_size / nnz < 2.6 and shira_size / nnz >= 12


def test_import_reproduces_a_stock_shira_adapter(tmp_path):
    torch.manual_seed(0)
    shira = get_peft_model(tiny_model("opt"), ShiraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                          init_weights=False, random_seed=5))
    expected = model_output(shira, tiny_inputs("opt"))
    shira.save_pretrained(tmp_path / "shira")
    model = import_shira(tmp_path / "shira", tiny_model("opt"))
    torch.testing.assert_close(model_output(model, tiny_inputs("opt")), expected, rtol=0, atol=1e-6)
    save_adapter(model, tmp_path / "rm")  # a custom-mask randmask adapter from here on
    reloaded = load_adapter(tiny_model("opt"), tmp_path / "rm")
    assert torch.equal(model_output(reloaded, tiny_inputs("opt")), model_output(model, tiny_inputs("opt")))


def test_import_refuses_other_files_and_bases(tmp_path):
    shira = get_peft_model(tiny_model("opt"), ShiraConfig(r=2, target_modules=["q_proj"]))
    shira.save_pretrained(tmp_path / "shira")
    with pytest.raises(MaskingError, match="not an nn.Linear of this model"):
        import_shira(tmp_path / "shira", tiny_model("llama"))
    model = get_peft_model(tiny_model("opt"), RandMaskConfig(density=0.1))
    model.save_pretrained(tmp_path / "rm")
    with pytest.raises(MaskingError, match="not a SHiRA adapter"):
        import_shira(tmp_path / "rm", tiny_model("opt"))
    with pytest.raises(MaskingError, match="not a readable PEFT SHiRA adapter"):
        import_shira(tmp_path / "missing", tiny_model("opt"))


# -- issue 28: SHiRA interop is bounded and checked ----------------------------------------------------------------


def _reseal_randmask(folder, fn):
    from randmask.integrity import CONFIG_CHECKSUM_KEY, config_checksum

    header = json.loads((folder / "adapter_config.json").read_text())
    fn(header)
    header[CONFIG_CHECKSUM_KEY] = config_checksum(header)
    (folder / "adapter_config.json").write_text(json.dumps(header))


@pytest.mark.parametrize("shape", [[100_000, 100_000], [100_000_000, 100_000_000]])
def test_an_edited_stored_shape_is_refused_before_allocating(tmp_path, shape):
    """A 2 KB config whose shape (checksum recomputed) asks for 4-16 GB: refused under a 2 GB memory cap."""
    from tests.hostile import run_limited

    save_adapter(apply_masking(tiny_model("llama"), MaskingConfig(density=0.1)), tmp_path / "rm")

    def edit(h):
        first = next(iter(h["matrices"].values()))
        first["stored_shape"], first["blocks"][0][2] = shape, shape[0]

    _reseal_randmask(tmp_path / "rm", edit)
    result = run_limited(f"""
        try:
            export_shira({str(tmp_path / "rm")!r}, {str(tmp_path / "out")!r})
        except MaskingError as e:
            print("REFUSED", e)
    """, imports="from randmask import MaskingError\nfrom randmask.peft import export_shira")
    assert "REFUSED" in result.stdout and ("would draw about" in result.stdout or "above max_entries" in
                                           result.stdout), result.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_an_edited_budget_cannot_dodge_the_size_bound(tmp_path):
    save_adapter(apply_masking(tiny_model("llama"), MaskingConfig(density=0.1)), tmp_path / "rm")

    def edit(h):  # a tiny density on a huge matrix draws almost nothing, but SHiRA's r*(in+out) is huge
        h["masking_config"]["density"] = 1e-16
        first = next(iter(h["matrices"].values()))
        first["stored_shape"], first["blocks"][0][2] = [100_000_000, 100_000_000], 100_000_000

    _reseal_randmask(tmp_path / "rm", edit)
    with pytest.raises(MaskingError, match="above max_entries"):
        export_shira(tmp_path / "rm", tmp_path / "out")


def test_an_edited_seed_is_caught_by_the_index_checksum(tmp_path):
    save_adapter(apply_masking(tiny_model("llama"), MaskingConfig(density=0.1)), tmp_path / "rm")
    _reseal_randmask(tmp_path / "rm", lambda h: h["masking_config"].update(seed=9))
    with pytest.raises(MaskingError, match="does not match its saved checksum"):
        export_shira(tmp_path / "rm", tmp_path / "out")


def _stock_shira(folder):
    shira = get_peft_model(tiny_model("opt"), ShiraConfig(r=2, target_modules=["q_proj"], init_weights=False))
    shira.save_pretrained(folder)
    return folder


def test_import_refuses_a_weights_file_linked_to_dev_zero(tmp_path):
    from tests.hostile import replace_with_dev_zero, run_limited

    replace_with_dev_zero(_stock_shira(tmp_path / "shira") / "adapter_model.safetensors")
    result = run_limited(f"""
        try:
            import_shira({str(tmp_path / "shira")!r}, tiny_model("opt"))
        except MaskingError as e:
            print("REFUSED", e)
    """, imports="from randmask import MaskingError\nfrom randmask.peft import import_shira\n"
                 "from tests.conftest import tiny_model")
    assert "REFUSED" in result.stdout and "not a regular file" in result.stdout, result.stderr[-2000:]


def test_import_refuses_a_fifo_and_an_oversized_file(tmp_path):
    from tests.hostile import hang_guard, make_sparse, replace_with_fifo

    folder = _stock_shira(tmp_path / "shira")
    make_sparse(folder / "adapter_model.safetensors")
    with pytest.raises(MaskingError, match="over the .*-byte limit"):
        import_shira(folder, tiny_model("opt"))
    replace_with_fifo(folder / "adapter_config.json")
    with hang_guard(30), pytest.raises(MaskingError, match="not a regular file"):
        import_shira(folder, tiny_model("opt"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_import_refuses_non_finite_values(tmp_path, bad):
    from safetensors.torch import load_file, save_file

    folder = _stock_shira(tmp_path / "shira")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("shira_weight"))
    tensors[key][3] = bad
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    model = tiny_model("opt")
    with pytest.raises(MaskingError, match="NaN or inf"):
        import_shira(folder, model)
    assert torch.isfinite(model_output(model, tiny_inputs("opt"))).all()  # nothing was applied


def test_max_entries_bounds_an_export_from_a_model_too(tmp_path):
    model = apply_masking(tiny_model("llama"), MaskingConfig(density=0.1))
    with pytest.raises(MaskingError, match="above max_entries=100: SHiRA pads every matrix"):
        export_shira(model, tmp_path / "out", max_entries=100)
    assert not (tmp_path / "out").exists()
    export_shira(model, tmp_path / "out")  # the default bound is far above a real model's export
