"""benchmarks/adapter_memory.py runs end to end and counts every part it names (a smoke test)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import adapter_memory  # noqa: E402
from randmask import mixed  # noqa: E402

pytest.importorskip("peft")


def test_it_counts_the_adapters_their_caches_and_loras(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    monkeypatch.setattr(mixed, "GATHERED_MAX_ELEMENTS", 64)  # the prefill runs per group: its CSR layouts are kept
    monkeypatch.setattr(sys, "argv", ["adapter_memory.py", "--shape", "tiny", "--adapters", "3", "--batch", "6",
                                      "--prompt-len", "5", "--json", str(out)])
    adapter_memory.main()
    result = json.loads(out.read_text())
    parts, entries = result["randmask_bytes"], result["kept_entries"]
    assert entries > 0 and result["lora_bytes"] > 0
    # fp32 values and int32 indices; W0 at the kept entries is held by an active adapter only, and a mixed batch
    # leaves none active (the weights hold W0 during it).
    assert parts["adapter"] == 8 * entries
    assert parts["tables"] >= 4 * entries  # two int16 index tables (and the values stack), padded per layer
    assert parts["CSR layouts"] >= 4 * entries  # one int32 column per entry at least
