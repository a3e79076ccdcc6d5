"""Fuzzed study specs: from_file / validate_spec raise RunError, or the plan works through four rounds.

Each example edits one node of a valid spec (or damages its bytes). An accepted spec must plan four rounds,
taking fake results for each (the searches, the grid-edge extensions and other seeds, any re-estimated seeds),
without any other exception, and count per cell the runs it plans. Run in a subprocess under a memory cap
(tests/hostile.py).
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from tests.hostile import damage_bytes, fuzz_settings, mutate_json, run_limited, to_json_text

FUZZ = fuzz_settings(max_examples=200)
SPEC = {"name": "s", "model": "tiny", "precision": "32", "seeds": [0, 1], "search_seed": 0, "max_extend": 1,
        "common": {"batch_size": 4, "mode": "lm"},
        "protocol": {"rte": {"n_train": 8, "n_val": 4, "n_test": 4, "epochs": 1},
                     "sst2": {"n_train": 8, "n_val": 4, "n_test": 4, "epochs": 2}},
        "cells": [{"method": "zeroshot"}, {"method": "lora", "lrs": [1e-4, 1e-3]},
                  {"method": "randmask", "ratio": 1e-3, "lrs": [1e-3, 1e-2], "tasks": ["rte"]}],
        "reestimate": {"compare": [["randmask 1e-03", "lora"]], "half_width": 0.05, "max_seeds": 4}}


def _plan_four_rounds(spec, out_dir: str, data) -> None:
    from randmask_lab.experiment.results.record import RunRecord
    from randmask_lab.study.plan import needed_runs, plan_progress
    from randmask_lab.study.run import run_config

    records: list = []
    for round_ in range(4):  # the searches, an edge, the other seeds, then (maybe) re-estimated seeds
        planned = needed_runs(spec, records)
        left = plan_progress(spec, records).runs_left  # the same plan, counted per cell
        assert sum(n.total for n in left.values()) == len(planned)
        for i, need in enumerate(planned):  # every run of the round finished, one validation loss per LR
            config = run_config(spec, need, out_dir, {}).to_dict()
            loss = data.draw(st.floats(0.1, 3.0)) if i % 2 else 0.5 + need.lr
            test = data.draw(st.floats(0.0, 1.0))
            records.append(RunRecord(f"r{round_}-{i}", config, "done", "accuracy", val_loss=loss, test_metric=test))


@FUZZ
@given(st.data())
def fuzz_specs(data) -> None:
    from randmask_lab.errors import RunError
    from randmask_lab.study.plan import StudySpec
    from randmask_lab.study.run import validate_spec

    text = to_json_text(mutate_json(copy.deepcopy(SPEC), data))
    if data.draw(st.booleans()):
        text = damage_bytes(json.dumps(SPEC).encode(), data)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "spec.json"
        path.write_bytes(text)
        try:
            spec = StudySpec.from_file(path)
            validate_spec(spec, str(Path(d) / "runs"))
        except RunError:
            return
        _plan_four_rounds(spec, str(Path(d) / "runs"), data)


def run_under_memory_limit() -> None:
    fuzz_specs()
    print("FUZZ-OK")


def test_fuzzed_study_specs_under_memory_limit() -> None:
    result = run_limited("run_under_memory_limit()",
                         imports="from tests.randmask_lab.study.test_fuzz_spec import run_under_memory_limit")
    assert result.returncode == 0 and "FUZZ-OK" in result.stdout, result.stderr[-4000:]
