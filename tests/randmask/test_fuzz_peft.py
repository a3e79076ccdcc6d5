"""Fuzzed PEFT adapter files: PeftModel.from_pretrained raises MaskingError, or loads bit-exact.

Mutations edit one node of ``adapter_config.json`` (any field but ``peft_type`` and ``task_type``,
which choose PEFT's own classes, not randmask's loader) or damage the weights file's bytes; half
the time the checksums are recomputed (a careful hand edit), so the structural checks are tested
too. Run in a subprocess under a memory cap, as test_fuzz_loader does for randmask's own files.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tests.conftest import model_output, tiny_inputs, tiny_model
from tests.hostile import (
    damaged_weights,
    fuzz_settings,
    load_or_refuse,
    mutated_config_text,
    perturb_trainable,
    run_limited,
)

pytest.importorskip("peft")

FUZZ = fuzz_settings(max_examples=40)
NOT_OURS = ("peft_type", "task_type")
_STATE: dict = {}


def _reference() -> dict:
    """One trained RandMask PEFT adapter: its files and the output it must reproduce (built once per process)."""
    if not _STATE:
        from peft import get_peft_model

        from randmask.peft import RandMaskConfig

        model = perturb_trainable(get_peft_model(tiny_model("opt"), RandMaskConfig(trainable_ratio=2e-2)))
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

    return load_or_refuse({"adapter_config.json": config_text, "adapter_model.safetensors": weights},
                          lambda folder: PeftModel.from_pretrained(tiny_model("opt"), folder))


@FUZZ
@given(st.data())
def fuzz_peft_config(data) -> None:
    ref = _reference()
    text = mutated_config_text(ref["config"], data, reseal=lambda config: _reseal(config, ref["weights"]),
                               skip=lambda path: not path or path[0] in NOT_OURS)
    model = _load_or_refuse(text, ref["weights"])
    if model is not None:  # the weights are untouched, so a load must reproduce the adapter exactly
        assert torch.equal(model_output(model, tiny_inputs("opt")), ref["expected"])


@FUZZ
@given(st.data())
def fuzz_peft_weights(data) -> None:
    from safetensors.torch import load as st_load

    ref = _reference()
    text, weights, resealed = damaged_weights(ref["config"], ref["weights"], data, reseal=_reseal)
    model = _load_or_refuse(text, weights)
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
