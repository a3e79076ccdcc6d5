"""How a committed study file counts: a run adopts it into the store, and ``--plan`` takes the same view."""

from __future__ import annotations

from pathlib import Path

from tests.randmask_lab.study.test_plan import PROTOCOL

from randmask_lab.experiment.record import RunRecord
from randmask_lab.experiment.store import ResultStore
from randmask_lab.study.run import adopt_records, with_committed


def record(run_id: str, status: str = "done", test: float = 0.5) -> RunRecord:
    config = {"model": "tiny", "task": "sst2", "method": "lora", "lr": 1e-3, "seed": 0, "batch_size": 4,
              "mode": "lm", **PROTOCOL["sst2"]}
    return RunRecord(run_id, config, status, "accuracy", val_loss=0.7, test_metric=test)


def test_adopt_and_plan_view_count_the_same_committed_records(tmp_path: Path) -> None:
    held = record("a", test=0.9)  # the store's own copy wins over the committed one
    committed = [record("a", test=0.1), record("b"), record("b", test=0.2), record("c", "diverged"),
                 record("d", "failed"), record("e", "running")]
    store = ResultStore(tmp_path / "results.sqlite")
    store.put(held)

    view = with_committed([held], committed)
    assert [r.run_id for r in view] == ["a", "b", "c"]  # each finished id once, the held copy first
    assert adopt_records(store, committed) == 2  # the run takes the same two into its store
    assert sorted(r.run_id for r in store.records()) == ["a", "b", "c"]
    assert store.get("a").test_metric == 0.9 and store.get("b").test_metric == 0.5  # a repeated id: the first
