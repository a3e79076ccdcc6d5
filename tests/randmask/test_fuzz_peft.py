"""Fuzzed PEFT adapter files: PeftModel.from_pretrained raises MaskingError, or loads bit-exact.

Mutations edit one node of ``adapter_config.json`` (any field but ``peft_type`` and ``task_type``,
which choose PEFT's own classes, not randmask's loader) or damage the weights file's bytes; half
the time the checksums are recomputed (a careful hand edit), so the structural checks are tested
too. Run in a subprocess under a memory cap, as test_fuzz_loader does for randmask's own files.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import model_output, tiny_inputs, tiny_model
from tests.hostile import damage_bytes, mutate_json, run_limited, to_json_text

pytest.importorskip("peft")

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
NOT_OURS = ("peft_type", "task_type")
_STATE: dict = {}


def _reference() -> dict:
    """One trained RandMask PEFT adapter: its files and the output it must reproduce (built once per process)."""
    if not _STATE:
        from peft import get_peft_model

        from randmask.peft import RandMaskConfig

        model = get_peft_model(tiny_model("opt"), RandMaskConfig(trainable_ratio=2e-2))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.05)
        folder = Path(tempfile.mkdtemp())
        model.save_pretrained(folder)
        _STATE.update(config=json.loads((folder / "adapter_config.json").read_text()),
                      weights=(folder / "adapter_model.safetensors").read_bytes(),
                      expected=model_output(model, tiny_inputs("opt")))
    return _STATE


def _reseal(config: dict, weights: bytes) -> None:
    from randmask.peft_files import config_checksum

    config["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    config["config_sha256"] = config_checksum(config)


def _load_or_refuse(config_text: bytes, weights: bytes):
    from peft import PeftModel

    from randmask import MaskingError

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "adapter_config.json").write_bytes(config_text)
        (Path(d) / "adapter_model.safetensors").write_bytes(weights)
        try:
            return PeftModel.from_pretrained(tiny_model("opt"), d)
        except MaskingError:
            return None


@FUZZ
@given(st.data())
def fuzz_peft_config(data) -> None:
    ref = _reference()
    skip = lambda path: not path or path[0] in NOT_OURS  # noqa: E731
    config = mutate_json(copy.deepcopy(ref["config"]), data, skip=skip)
    if data.draw(st.booleans()):
        _reseal(config, ref["weights"])
    text = to_json_text(config)
    if data.draw(st.booleans()):
        text = damage_bytes(text, data)
    model = _load_or_refuse(text, ref["weights"])
    if model is not None:  # the weights are untouched, so a load must reproduce the adapter exactly
        assert torch.equal(model_output(model, tiny_inputs("opt")), ref["expected"])


@FUZZ
@given(st.data())
def fuzz_peft_weights(data) -> None:
    from safetensors.torch import load as st_load

    ref = _reference()
    weights = damage_bytes(ref["weights"], data)
    config = copy.deepcopy(ref["config"])
    resealed = data.draw(st.booleans())
    if resealed:
        _reseal(config, weights)
    model = _load_or_refuse(json.dumps(config).encode(), weights)
    if model is None:
        return
    if not resealed:
        assert torch.equal(model_output(model, tiny_inputs("opt")), ref["expected"])
    saved = st_load(weights)
    for name, p in model.named_parameters():  # exactly the file's values, nothing else
        if name.endswith(".randmask_adapters.default.values"):
            key = name.replace(".randmask_adapters.default.values", ".randmask_adapters.values")
            assert torch.equal(p.detach(), saved[key].to(p.dtype))


def run_under_memory_limit() -> None:
    _reference()
    fuzz_peft_config()
    fuzz_peft_weights()
    print("FUZZ-OK")


def test_fuzzed_peft_files_under_memory_limit() -> None:
    result = run_limited("run_under_memory_limit()", imports="import randmask.peft\n"
                         "from tests.randmask.test_fuzz_peft import run_under_memory_limit")
    assert result.returncode == 0 and "FUZZ-OK" in result.stdout, result.stderr[-4000:]
