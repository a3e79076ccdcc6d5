"""RunRecord's code version: the weight-gradient kernel named is the one the run's device uses."""

from __future__ import annotations

import torch

from randmask import native
from randmask_lab.experiment.record import RunRecord, code_version


def test_a_gpu_run_names_the_torch_kernel():
    assert code_version(torch.device("cuda", 0))["sddmm_kernel"] == "torch"
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
