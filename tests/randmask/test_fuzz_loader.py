"""Fuzzed loader: mutated configs and weight files either load bit-exact or raise MaskingError.

The properties run in a subprocess under ``RLIMIT_AS`` (a few GiB above the process's size after
imports), so a file that makes the loader allocate without bound fails the test instead of
taking the machine down.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

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

from randmask import MaskingConfig, apply_masking, load_adapter, masked_layers, save_adapter
from randmask.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from randmask.integrity import CONFIG_CHECKSUM_KEY, config_checksum

MEMORY_HEADROOM = 3 << 30  # bytes of address space the loader may grow by
FUZZ = fuzz_settings(max_examples=120)
_STATE: dict = {}


def _reference() -> dict:
    """One trained adapter: its files, and the output it must reproduce (built once per process)."""
    if not _STATE:
        model = perturb_trainable(apply_masking(tiny_model("gpt2"), MaskingConfig(trainable_ratio=2e-2)))
        folder = Path(tempfile.mkdtemp())
        save_adapter(model, folder)
        _STATE.update(header=json.loads((folder / CONFIG_NAME).read_text()),
                      weights=(folder / WEIGHTS_NAME).read_bytes(),
                      expected=model_output(model, tiny_inputs("gpt2")))
    return _STATE


def _reseal_config(header: dict) -> None:
    header[CONFIG_CHECKSUM_KEY] = config_checksum(header)


def _reseal(header: dict, weights: bytes) -> None:
    header["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    _reseal_config(header)


def _load_or_refuse(header_text: bytes, weights: bytes):
    """Load the files onto a fresh base: the model, or None after a MaskingError."""
    return load_or_refuse({CONFIG_NAME: header_text, WEIGHTS_NAME: weights},
                          lambda folder: load_adapter(tiny_model("gpt2"), folder))


@FUZZ
@given(st.data())
def fuzz_config(data) -> None:
    ref = _reference()
    text = mutated_config_text(ref["header"], data, reseal=_reseal_config)
    model = _load_or_refuse(text, ref["weights"])
    if model is not None:  # the values file is untouched, so a successful load must be bit-exact
        assert torch.equal(model_output(model, tiny_inputs("gpt2")), ref["expected"])


@FUZZ
@given(st.data())
def fuzz_weights(data) -> None:
    ref = _reference()
    text, weights, resealed = damaged_weights(ref["header"], ref["weights"], data, reseal=_reseal)
    model = _load_or_refuse(text, weights)
    if model is None:
        return
    if not resealed:
        assert torch.equal(model_output(model, tiny_inputs("gpt2")), ref["expected"])
    from safetensors.torch import load as st_load

    saved = st_load(weights)
    for name, layer in masked_layers(model).items():  # bit-exact: exactly the file's values, in place
        adapter = layer.adapters["default"]
        assert torch.equal(adapter.values.detach(), saved[f"{name}.values"].to(adapter.values.dtype))
        assert torch.equal(layer.weight.detach().reshape(-1)[adapter.indices], adapter.target_entries(
            layer.weight.dtype))


def run_under_memory_limit() -> None:
    """Entry point of the subprocess (its address space capped after ``_reference``): both properties."""
    fuzz_config()
    fuzz_weights()
    print("FUZZ-OK")


def test_fuzzed_loader_under_memory_limit() -> None:
    result = run_limited("run_under_memory_limit()", headroom=MEMORY_HEADROOM,
                         imports="from tests.randmask.test_fuzz_loader import _reference, run_under_memory_limit\n"
                         "_reference()  # built before the cap, as the loader's growth is what it bounds")
    assert result.returncode == 0 and "FUZZ-OK" in result.stdout, result.stderr[-4000:]
