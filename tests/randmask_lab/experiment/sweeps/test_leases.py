"""Leased cells: an atomic claim per run, heartbeats, expiry and takeover; two real sweep processes."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from randmask_lab.experiment import ResultStore, RunConfig, RunError, run_training
from randmask_lab.experiment.results.store import Lease, new_owner, owner_is_dead

WORKER = Path(__file__).with_name("sweep_worker.py")
SRC = Path(__file__).resolve().parents[4] / "src"


def test_claim_is_exclusive_until_the_lease_expires(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    a, b = new_owner(), new_owner()
    assert a != b and a.count(":") == 2
    assert store.claim("run", a, ttl=10, now=100.0) == "claimed"
    assert store.claim("run", b, ttl=10, now=105.0) == "busy"
    assert store.claim("run", a, ttl=10, now=105.0) == "claimed"  # the owner renews
    assert store.claim("run", b, ttl=10, now=116.0) == "claimed"  # a's lease ran out at 115: taken over
    assert store.lease("run").owner == b
    assert not store.heartbeat("run", a, ttl=10)  # a lost it, and learns so at its next heartbeat
    assert store.heartbeat("run", b, ttl=10)
    store.release("run", b)
    assert store.lease("run") is None


def test_a_dead_process_on_this_host_loses_its_lease_at_once(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(child.stdout)  # the child has exited: no process has this pid now (unless reused)
    host = socket.gethostname()
    assert store.claim("run", f"{host}:{dead_pid}:aaaa", ttl=3600) == "claimed"
    assert owner_is_dead(f"{host}:{dead_pid}:aaaa")
    assert store.claim("run", new_owner(), ttl=3600) == "claimed"  # taken over before the lease expires
    assert store.claim("other", f"{host}:{os.getpid()}:bbbb", ttl=3600) == "claimed"
    assert store.claim("other", new_owner(), ttl=3600) == "busy"  # its owner lives
    assert store.claim("third", f"elsewhere:{dead_pid}:cccc", ttl=3600) == "claimed"
    assert store.claim("third", new_owner(), ttl=3600) == "busy"  # another host: only the expiry counts


def test_a_heartbeat_keeps_the_lease_alive(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    owner = new_owner()
    assert store.claim("run", owner, ttl=0.4) == "claimed"
    lease = Lease(store, "run", owner, ttl=0.4)
    time.sleep(1.0)  # 2.5 lease lengths: only the heartbeat thread keeps it
    assert store.claim("run", new_owner(), ttl=0.4) == "busy"
    lease.release()
    assert store.claim("run", new_owner(), ttl=0.4) == "claimed"


def test_train_refuses_a_run_another_worker_holds(tiny_lm, run_kwargs):
    config = RunConfig(**{**run_kwargs, "model": tiny_lm, "epochs": 1})
    store = ResultStore(Path(config.out_dir) / "results.sqlite")
    assert store.claim(config.run_id, "elsewhere:1:abc", ttl=60) == "claimed"
    with pytest.raises(RunError, match="being run by worker elsewhere:1:abc"):
        run_training(config)


def _sweep_args(tiny_lm: str, out: Path, lease: float) -> list[str]:
    return ["sweep", "--models", tiny_lm, "--tasks", "rte", "--methods", "randmask", "--ratios", "0.02",
            "--lrs", "0.01", "0.03", "--seeds", "0", "1", "--n-train", "12", "--n-val", "6", "--n-test", "6",
            "--epochs", "1", "--batch-size", "4", "--max-length", "96", "--eval-batch-size", "8", "--threads", "1",
            "--checkpoint-every", "1", "--lease-seconds", str(lease), "--out-dir", str(out), "--no-progress"]


def _start(args: list[str], log: Path, sleep: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "RANDMASK_TEST_STEP_SLEEP": str(sleep)}
    return subprocess.Popen([sys.executable, str(WORKER), *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=env)


def _started(log: Path) -> list[str]:
    """Run ids a worker started (its "[i/n] <run id>" lines, not its skips)."""
    return [line.split()[1] for line in log.read_text().splitlines()
            if line.startswith("[") and "skip" not in line]


def _check_steps(out: Path, run_ids: list[str]) -> None:
    for run_id in run_ids:
        with open(out / run_id / "steps.csv") as f:
            steps = [int(r["step"]) for r in csv.DictReader(f)]
        assert steps == [1, 2, 3], (run_id, steps)  # 12 examples, batch 4, 1 epoch


def test_two_sweeps_on_one_out_dir_run_each_cell_once(tiny_lm, tmp_path):
    out = tmp_path / "runs"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    workers = [_start(_sweep_args(tiny_lm, out, lease=30), log) for log in logs]
    tails = lambda: "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)  # noqa: E731
    for w in workers:
        assert w.wait(timeout=300) == 0, tails()
    started = [_started(log) for log in logs]
    records = ResultStore(out / "results.sqlite").records()
    assert len(records) == 4 and all(r.status == "done" for r in records), tails()
    assert sorted(started[0] + started[1]) == sorted(r.run_id for r in records), tails()  # each cell exactly once
    _check_steps(out, [r.run_id for r in records])


def test_a_killed_workers_run_is_taken_over_and_resumed(tiny_lm, tmp_path):
    out = tmp_path / "runs"
    first = _start(_sweep_args(tiny_lm, out, lease=2), tmp_path / "a.log", sleep=0.5)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*/checkpoint/state.json")):
        time.sleep(0.2)
    (ckpt,) = list(out.glob("*/checkpoint/state.json"))  # the first worker is mid-run, with a checkpoint
    killed_run = ckpt.parent.parent.name
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    second = _start(_sweep_args(tiny_lm, out, lease=2), tmp_path / "b.log")
    assert second.wait(timeout=300) == 0
    records = {r.run_id: r for r in ResultStore(out / "results.sqlite").records()}
    assert len(records) == 4 and all(r.status == "done" for r in records.values())
    assert killed_run in _started(tmp_path / "b.log")  # taken over (its owner is dead)...
    assert any(n.startswith("resumed from the checkpoint at step") for n in records[killed_run].notes)
    _check_steps(out, list(records))  # ...and resumed: steps.csv has each step once
