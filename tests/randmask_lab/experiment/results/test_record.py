"""RunRecord's code version: the weight-gradient kernel named is the one the run's device uses."""

from __future__ import annotations

import importlib.util

import torch

from randmask import native
from randmask_lab.experiment.results.record import RunRecord, code_version


def test_a_gpu_run_names_its_kernel():
    gpu = "triton" if importlib.util.find_spec("triton") is not None else "torch"  # randmask[gpu] brings triton
    assert code_version(torch.device("cuda", 0))["sddmm_kernel"] == gpu
    assert code_version("cpu")["sddmm_kernel"] == ("native" if native.available() else "torch")
    assert code_version("cuda")["package"] == code_version("cpu")["package"]


def test_a_record_round_trips_and_ignores_unknown_keys():
    record = RunRecord("rid", {"task": "sst2"}, "done", metric="accuracy", code_version=code_version())
    data = {**record.to_dict(), "field_of_a_newer_version": 1}
    assert RunRecord.from_dict(data) == record


def test_a_record_made_before_cpu_seconds_loads_without_it():
    old = RunRecord("rid", {"task": "sst2"}, "done", metric="accuracy").to_dict()
    del old["cpu_seconds"]
    assert RunRecord.from_dict(old).cpu_seconds is None


def test_a_resumed_records_compute_counts_what_its_earlier_attempts_carried_in():
    record = RunRecord("rid", {"task": "sst2"}, "done", metric="accuracy", wall_seconds=100.0, cpu_seconds=90.0,
                       carried_seconds=40.0, carried_cpu_seconds=30.0,
                       notes=["resumed from the checkpoint at step 8"])
    assert record.resumed_at == 8
    assert (record.compute_seconds, record.compute_cpu_seconds) == (140.0, 120.0)


def test_a_resumed_record_made_before_carried_seconds_takes_it_from_its_history():
    epochs = [{"epoch": 1, "steps": 4, "seconds": 30.0}, {"epoch": 2, "steps": 8, "seconds": 61.5},
              {"epoch": 3, "steps": 12, "seconds": 90.0}]
    old = RunRecord("rid", {"task": "sst2"}, "done", metric="accuracy", wall_seconds=100.0, cpu_seconds=90.0,
                    epochs=epochs, notes=["sampled 8 of 10", "resumed from the checkpoint at step 10"]).to_dict()
    del old["carried_seconds"], old["carried_cpu_seconds"]
    record = RunRecord.from_dict(old)
    assert record.carried_seconds is None and record.resumed_at == 10
    assert record.compute_seconds == 161.5  # the last epoch end at or before step 10: a lower bound
    assert record.compute_cpu_seconds == 90.0  # earlier attempts' CPU time was not kept then
    once = RunRecord("rid", {"task": "sst2"}, "done", metric="accuracy", wall_seconds=100.0, epochs=epochs)
    assert once.resumed_at is None and once.compute_seconds == 100.0 and once.compute_cpu_seconds is None


def test_a_run_from_a_checkout_names_its_commit() -> None:
    """A record made from a git checkout names HEAD. (It once read the root from this module's depth, and a
    move into a sub-package made every record's commit None.)"""
    import subprocess
    from pathlib import Path

    import pytest

    import randmask_lab
    from randmask_lab.experiment.results.record import checkout_root, source_version

    repo = Path(__file__).resolve().parents[4]
    if Path(randmask_lab.__file__).resolve().parent != repo / "src" / "randmask_lab" or not (repo / ".git").exists():
        pytest.skip("the package under test is not this checkout's src/ (an installed copy): no commit to name")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip(f"git cannot read {repo}: {head.stderr.strip()}")
    assert checkout_root() == repo
    source_version.cache_clear()
    assert source_version()["commit"] == head.stdout.strip()
