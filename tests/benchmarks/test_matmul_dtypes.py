"""matmul_dtypes runs end to end at a tiny shape and writes its ratios beside the machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import matmul_dtypes  # noqa: E402


def test_tiny_run_writes_ratios_and_the_machine(tmp_path, capsys):
    out = tmp_path / "mm.json"
    assert matmul_dtypes.main(["--shape", "8", "8", "8", "--rounds", "2", "--threads", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["ratio"]) == {"bf16", "fp16"} and len(data["ratio"]["bf16"]) == 2
    assert {"cpu_model", "cpu_capability", "cpu_bf16_native"} <= set(data["machine"])
    assert "bf16 / fp32: median" in capsys.readouterr().out
