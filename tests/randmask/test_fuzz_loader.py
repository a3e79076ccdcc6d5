"""Fuzzed loader: mutated configs and weight files either load bit-exact or raise MaskingError.

The properties run in a subprocess under ``RLIMIT_AS`` (a few GiB above the process's size after
imports), so a file that makes the loader allocate without bound fails the test instead of
taking the machine down.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import REPO_ROOT, model_output, tiny_inputs, tiny_model

from randmask import MaskingConfig, MaskingError, apply_masking, load_adapter, masked_layers, save_adapter
from randmask.integrity import CONFIG_CHECKSUM_KEY, config_checksum
from randmask.io import CONFIG_NAME, WEIGHTS_NAME

MEMORY_HEADROOM = 3 << 30  # bytes of address space the loader may grow by
FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
_STATE: dict = {}


def _reference() -> dict:
    """One trained adapter: its files, and the output it must reproduce (built once per process)."""
    if not _STATE:
        model = apply_masking(tiny_model("gpt2"), MaskingConfig(trainable_ratio=2e-2))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.05)
        folder = Path(tempfile.mkdtemp())
        save_adapter(model, folder)
        _STATE.update(header=json.loads((folder / CONFIG_NAME).read_text()),
                      weights=(folder / WEIGHTS_NAME).read_bytes(),
                      expected=model_output(model, tiny_inputs("gpt2")))
    return _STATE


def _nodes(obj, path=()):
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nodes(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _nodes(v, (*path, i))


_ODD = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.integers(-10**20, 10**20),
                 st.floats(allow_nan=True, allow_infinity=True), st.lists(st.integers(-3, 3), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _mutate(header, data) -> object:
    """One structural edit at a random node: drop, duplicate, retype, huge, negative or NaN."""
    path = data.draw(st.sampled_from(list(_nodes(header))))
    op = data.draw(st.sampled_from(["drop", "duplicate", "retype", "huge", "negative", "nan"]))
    if not path:
        return data.draw(_ODD)
    parent = header
    for key in path[:-1]:
        parent = parent[key]
    key, value = path[-1], parent[path[-1]]
    if op == "drop":
        del parent[key]
    elif op == "duplicate" and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(value))
    elif op == "duplicate":  # a sibling key takes this value (JSON's last-duplicate-wins)
        parent[data.draw(st.sampled_from(list(parent)))] = copy.deepcopy(value)
    elif op == "retype":
        parent[key] = data.draw(_ODD)
    elif op == "huge":
        parent[key] = data.draw(st.sampled_from([10**12, 2**63, 10**30, 1e308, 1e9]))
    elif op == "negative":
        parent[key] = -value if isinstance(value, (int, float)) and value else -1
    else:
        parent[key] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return header


def _damage(blob: bytes, data) -> bytes:
    """Truncate or flip a byte (raw disk damage)."""
    if not blob:
        return blob
    pos = data.draw(st.integers(0, len(blob) - 1))
    if data.draw(st.booleans()):
        return blob[:pos]
    return blob[:pos] + bytes([blob[pos] ^ data.draw(st.integers(1, 255))]) + blob[pos + 1:]


def _load_or_refuse(header_text: bytes, weights: bytes):
    """Load the files onto a fresh base: the model, or None after a MaskingError."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / CONFIG_NAME).write_bytes(header_text)
        (Path(d) / WEIGHTS_NAME).write_bytes(weights)
        try:
            return load_adapter(tiny_model("gpt2"), d)
        except MaskingError:
            return None


@FUZZ
@given(st.data())
def fuzz_config(data) -> None:
    ref = _reference()
    header = _mutate(copy.deepcopy(ref["header"]), data)
    if isinstance(header, dict) and data.draw(st.booleans()):  # a careful hand edit reseals the checksum
        header[CONFIG_CHECKSUM_KEY] = config_checksum(header)
    text = json.dumps(header).encode()
    if data.draw(st.booleans()):
        text = _damage(text, data)
    model = _load_or_refuse(text, ref["weights"])
    if model is not None:  # the values file is untouched, so a successful load must be bit-exact
        assert torch.equal(model_output(model, tiny_inputs("gpt2")), ref["expected"])


@FUZZ
@given(st.data())
def fuzz_weights(data) -> None:
    ref = _reference()
    weights = _damage(ref["weights"], data)
    header = copy.deepcopy(ref["header"])
    resealed = data.draw(st.booleans())
    if resealed:  # the checksum matches: safetensors parsing and the tensor checks must hold
        header["weights_sha256"] = hashlib.sha256(weights).hexdigest()
        header[CONFIG_CHECKSUM_KEY] = config_checksum(header)
    model = _load_or_refuse(json.dumps(header).encode(), weights)
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
    """Entry point of the subprocess: cap the address space, then run both properties."""
    import resource

    _reference()
    size = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmSize:"))) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + MEMORY_HEADROOM, size + MEMORY_HEADROOM))
    fuzz_config()
    fuzz_weights()
    print("FUZZ-OK")


def test_fuzzed_loader_under_memory_limit() -> None:
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(REPO_ROOT / "src")!r}, {str(REPO_ROOT)!r}]
        import tests.conftest  # thread count and quiet transformers, as under pytest
        from tests.randmask.test_fuzz_loader import run_under_memory_limit
        run_under_memory_limit()
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=300)
    assert result.returncode == 0 and "FUZZ-OK" in result.stdout, result.stderr[-4000:]

