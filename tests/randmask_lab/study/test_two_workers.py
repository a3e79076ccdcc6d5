"""Two `randmask study` processes started at the same moment on one new --out-dir and one export file, as
experiments/smollm2_confirm.sh starts its workers: both finish, and each planned run is trained and exported once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import DATA_DIR

ROOT = Path(__file__).resolve().parents[3]
WORKER = ROOT / "tests" / "randmask_lab" / "experiment" / "sweeps" / "sweep_worker.py"  # runs any CLI verb


def _tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)


def test_two_study_workers_started_together_run_each_planned_run_once(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "randmask_lab" / "experiment"))
    from tiny import make_tiny_lm

    if not (DATA_DIR / "superglue" / "RTE").is_dir():
        pytest.skip("no ../shared/data")
    study = {"name": "tiny", "model": str(make_tiny_lm(tmp_path / "model")), "precision": "32", "seeds": [0, 1, 2],
             "max_extend": 0, "common": {"batch_size": 4, "max_length": 64, "mode": "lm"},
             "protocol": {"rte": {"n_train": 8, "n_val": 4, "n_test": 4, "epochs": 1}},
             "cells": [{"method": "randmask", "ratio": 1e-2, "lrs": [1e-2, 1e-1]}, {"method": "zeroshot"}]}
    spec, out, export = tmp_path / "s.json", tmp_path / "runs", tmp_path / "study.jsonl"
    spec.write_text(json.dumps(study))
    args = [sys.executable, str(WORKER), "study", str(spec), "--out-dir", str(out), "--export", str(export),
            "--threads", "1", "--lease-seconds", "60", "--no-progress", "--allow-dirty"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    workers = [subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env) for log in logs]
    for w in workers:
        assert w.wait(timeout=300) == 0, _tails(logs)
    tails = _tails(logs)
    records = [json.loads(line) for line in export.read_text().splitlines()]
    ids = [r["run_id"] for r in records]
    assert len(ids) == len(set(ids)) and all(r["status"] == "done" for r in records), tails
    # the plan: 2 search LRs on seed 0, then seeds 1-2 at the chosen one; zero-shot on seeds 0-2
    assert sorted((r["config"]["method"], r["config"]["seed"]) for r in records) == [
        ("randmask", 0), ("randmask", 0), ("randmask", 1), ("randmask", 2),
        ("zeroshot", 0), ("zeroshot", 1), ("zeroshot", 2)], tails
    trained = [line for log in logs for line in log.read_text().splitlines() if line.startswith("done:")]
    assert len(trained) == len(records), tails  # no run trained twice, by one worker or both
