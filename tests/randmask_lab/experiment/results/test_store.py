"""The SQLite results store: put/get round trip, filters, finished runs."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from randmask_lab.experiment import ResultStore, RunConfig, RunRecord


def record(status: str = "done", lr: float = 1e-3, seed: int = 0, task: str = "rte", **extra) -> RunRecord:
    config = RunConfig(model="m", task=task, method="randmask", ratio=1e-3, lr=lr, seed=seed)
    fields = dict(val_loss=0.5, val_metric=0.7, test_metric=0.6, best_epoch=2, trainable=10, total=1000)
    return RunRecord(config.run_id, config.to_dict(), status, "accuracy", **{**fields, **extra})


def test_round_trip_and_filters(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    a, b = record(lr=1e-3), record(lr=1e-2, task="sst2", status="diverged", test_metric=None)
    store.put(a)
    store.put(b)
    assert store.get(a.run_id) == a and len(store) == 2
    assert [r["run_id"] for r in store.rows(task="sst2")] == [b.run_id]
    assert store.rows(task="rte")[0]["protocol"].startswith("1000/500/1000 ex, 5 ep")
    assert store.records(status="diverged") == [b]
    with pytest.raises(ValueError, match="unknown store columns"):
        store.rows(colour="red")


def test_finished_means_done_or_diverged(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    done, failed = record(seed=1), record(seed=2, status="failed")
    store.put(done)
    store.put(failed)
    assert store.is_finished(done.run_id) and not store.is_finished(failed.run_id)
    assert not store.is_finished("nope") and store.get("nope") is None
    store.put(record(seed=2))  # the retried run replaces the failed row
    assert store.is_finished(failed.run_id) and len(store) == 2


def test_protocol_label_names_length_grouping_only_when_on():
    from randmask_lab.experiment.results.store import protocol_label

    old = {k: v for k, v in RunConfig(task="rte", mode="lm").to_dict().items() if k != "group_by_length"}
    assert protocol_label(old) == protocol_label(RunConfig(task="rte", mode="lm").to_dict()) == \
        "1000/500/1000 ex, 5 ep, bs 8, lm"
    assert protocol_label({**old, "group_by_length": True}) == "1000/500/1000 ex, 5 ep, bs 8, by length, lm"


def test_opening_a_new_store_waits_for_another_process_creating_it(tmp_path):
    # Two workers started together on one new --out-dir: the first holds a write lock on the still
    # rollback-journal file while the second asks for WAL, which SQLite refuses at once ("database is
    # locked") without its busy timeout. The store must wait for the lock instead of failing.
    path = tmp_path / "results.sqlite"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE scratch(x)")
    release = threading.Timer(0.3, lambda: other.execute("ROLLBACK"))
    release.start()
    try:
        store = ResultStore(path)
    finally:
        release.join()
        other.close()
    store.put(record())
    assert [r.status for r in store.records()] == ["done"]


@pytest.mark.parametrize("crafted", ["[1, 2]", '{"config": [1]}', '{"run_id": "x", "config": {"task": "rte"}}', "{"])
def test_a_crafted_record_in_the_store_is_one_line(tmp_path, crafted):
    """Found by a hostile pass: a record column holding a list ended in AttributeError in report, curves and export."""
    from randmask_lab.experiment.results.store import StoreError

    store = ResultStore(tmp_path / "r.sqlite")
    good = record()
    store.put(good)
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE runs SET record = ? WHERE run_id = ?", (crafted, good.run_id))
    with pytest.raises(StoreError, match=f"the record of run {good.run_id} is damaged .*--restart"):
        store.records()
