"""benchmarks/attention_kernels.py runs and prints one row per kernel (a smoke test, not a timing)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import attention_kernels  # noqa: E402


def test_it_prints_every_kernel(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["attention_kernels.py", "--rounds", "1"])
    attention_kernels.main()
    out = capsys.readouterr().out
    for kernel in ("fp32, default SDPA", "bf16, default SDPA (flash)", "bf16, SDPA math", "bf16, folded"):
        assert f"| {kernel} |" in out
