"""The kernel-path benchmark: every path this CPU runs is built and timed against the portable one, CPU named."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import native_paths  # noqa: E402
from randmask import native  # noqa: E402


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")
def test_kernel_part_compares_each_path_with_the_portable_one(tmp_path, capsys, monkeypatch):
    from randmask_lab.machine import describe

    monkeypatch.setenv("RANDMASK_CACHE", str(tmp_path / "cache"))
    before = native._tried, native._library
    out = tmp_path / "paths.json"
    assert native_paths.main(["--no-step", "--rounds", "2", "--tokens", "64", "--threads", "1",
                              "--json", str(out)]) == 0
    assert (native._tried, native._library) == before  # the process's own kernel is left as it was
    payload = json.loads(out.read_text())
    assert payload["machine"]["cpu_model"] and "cpu_bf16_native" in payload["machine"]
    for dtype in ("fp32", "bf16"):
        rows = payload["kernel"][dtype]
        assert "portable" in rows and rows["portable"]["ratio"] == 1.0
        assert set(rows) <= {"avx512", "avx2", "portable"}
        for r in rows.values():
            assert r["ci_low"] <= r["ratio"] <= r["ci_high"] and r["ms_median"] > 0
    assert describe() in capsys.readouterr().out
