"""benchmarks/gpu/run.sh --dry-run: every section of the GPU benchmark runs on the CPU at tiny shapes and writes
its JSON (with the machine's description) and the markdown summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[2]


def _dry_run(out: Path, *extra: str) -> None:
    """``run.sh --dry-run`` into ``out``, with ``extra`` arguments; it must succeed."""
    env = {**os.environ, "PY": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), "--dry-run", *extra, "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_dry_run_writes_every_section(tmp_path):
    _dry_run(tmp_path)
    for section in ("tests", "sddmm", "step", "runner", "targets"):
        payload = json.loads((tmp_path / f"gpu_{section}.json").read_text())
        assert payload["machine"]["device"] == "cpu" and "cpu_kind" in payload["machine"], section
    assert json.loads((tmp_path / "gpu_tests.json").read_text())["returncode"] == 0  # the device tests collect
    sddmm = json.loads((tmp_path / "gpu_sddmm.json").read_text())["rows"]
    assert {r["way"] for r in sddmm} == {"sampled_addmm", "gather", "triton"} or not _has_triton()
    assert all(r["max_rel_error"] < 2e-2 for r in sddmm)  # every way computes the masked gradient
    step = {r["variant"]: r for r in json.loads((tmp_path / "gpu_step.json").read_text())["rows"]}
    assert {"floor", "lora r=8 q/v", "shira r=8 q/v", "randmask 0.1% q/v", "randmask 1% all-linear"} <= set(step)
    assert all("max_memory_allocated" in r for r in step.values())
    runner = json.loads((tmp_path / "gpu_runner.json").read_text())["result"]
    assert runner["status"] == "done" and runner["step_seconds_median"] > 0
    summary = (tmp_path / "gpu_summary.md").read_text()
    assert "## Targets" in summary and "randmask 1% all-linear <= 1.05x floor" in summary


def test_the_opt_in_compile_section_writes_its_paired_ratios(tmp_path):
    _dry_run(tmp_path, "--sections", "compile")
    payload = json.loads((tmp_path / "gpu_compile.json").read_text())
    assert payload["machine"]["device"] == "cpu" and payload["backend"] == "aot_eager"
    assert set(payload["ratios"]) == {"randmask 0.1% q/v: compiled / eager", "lora r=8 q/v: compiled / eager",
                                      "eager: randmask / lora", "compiled: randmask / lora"}


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def test_the_opt_in_mixed_section_times_every_layout_eager_and_compiled(tmp_path):
    _dry_run(tmp_path, "--sections", "mixed")
    payload = json.loads((tmp_path / "gpu_mixed_layouts.json").read_text())
    assert payload["machine"]["device"] == "cpu" and payload["compiled"] == "aot_eager"
    assert [r["tokens"] for r in payload["runs"]] == [1, 8]
    assert {"gathered", "per group", "compiled, gathered", "compiled, per group"} <= set(payload["runs"][0]["ratios"])
