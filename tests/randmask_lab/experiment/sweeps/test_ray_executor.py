"""`randmask sweep --executor ray`: a local Ray instance (2 CPUs) runs a tiny grid; each cell once, the
same records as the local executor, nothing twice on a re-run or beside a concurrent local sweep, and
a worker killed mid-run is retried by Ray and resumes from its checkpoint."""

from __future__ import annotations

import csv
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from randmask_lab.cli import main
from randmask_lab.experiment import ResultStore, RunConfig, RunRecord, SweepConfig
from randmask_lab.experiment.run.config import STORED_NAMES, field_role
from randmask_lab.experiment.sweeps.executors import ExecutorConfig, run_grid

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[3] / "src"
WORKER = HERE / "sweep_worker.py"
# What differs between two executions of the same run by nature: when and where it ran, how long it took.
CIRCUMSTANCES = {"wall_seconds", "train_seconds", "cpu_seconds", "created", "code_version", "run_dir"}


def _grid(tiny_lm: str, out: Path, **run: object) -> tuple[SweepConfig, RunConfig]:
    sweep = SweepConfig(models=[tiny_lm], tasks=["rte"], methods=["randmask"], ratios=[0.02], lrs=[0.01, 0.03],
                        seeds=[0, 1])
    options = dict(n_train=12, n_val=6, n_test=6, epochs=1, batch_size=4, max_length=96, eval_batch_size=8,
                   threads=1, checkpoint_every=1, out_dir=str(out), progress=False)
    base = RunConfig(**{**options, **run})  # type: ignore[arg-type]
    return sweep, base


def _result(record: RunRecord) -> dict:
    """Everything a run computed (and its identity), without the circumstances of its execution."""
    data = {k: v for k, v in record.to_dict().items() if k not in CIRCUMSTANCES}
    roles = {STORED_NAMES.get(f.name, f.name): field_role(f) for f in dataclasses.fields(RunConfig)}  # dict keys
    data["config"] = {k: v for k, v in data["config"].items() if roles[k] == "identity"}
    data["epochs"] = [{k: v for k, v in e.items() if k != "seconds"} for e in data["epochs"]]
    return data


def _steps(out: Path, run_id: str) -> list[int]:
    with open(out / run_id / "steps.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def _submitted(lines: list[str]) -> list[str]:
    return [line.split()[-1] for line in lines if line.startswith("[") and " submitted " in line]


def test_without_ray_the_ray_executor_is_a_one_line_error_naming_the_extra(tiny_lm, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails, as when it is not installed
    code = main(["sweep", "--models", tiny_lm, "--tasks", "rte", "--lrs", "0.01", "--seeds", "0", "--ratios", "0.02",
                 "--out-dir", str(tmp_path), "--executor", "ray"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "randmask[ray]" in err and "not installed" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--executor", "ray", "--cpus-per-run", "0"], "--cpus-per-run must be > 0"),
    (["--executor", "ray", "--gpus-per-run", "-1"], "--gpus-per-run must be >= 0"),
    (["--cpus-per-run", "2"], "apply to --executor ray only"),
])
def test_executor_options_are_checked(tiny_lm, tmp_path, capsys, args, message):
    code = main(["sweep", "--models", tiny_lm, "--tasks", "rte", "--out-dir", str(tmp_path), *args])
    assert code == 2 and message in capsys.readouterr().err


def test_a_ray_address_where_nothing_listens_is_a_one_line_error(tiny_lm, tmp_path, capsys):
    pytest.importorskip("ray")
    code = main(["sweep", "--models", tiny_lm, "--tasks", "rte", "--lrs", "0.01", "--seeds", "0", "--ratios", "0.02",
                 "--out-dir", str(tmp_path), "--executor", "ray", "--ray-address", "127.0.0.1:1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no Ray cluster answers at 127.0.0.1:1" in err


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory):
    """A local Ray instance with 2 CPUs whose workers run ray_hooks.install (pid files, slow steps)."""
    ray = pytest.importorskip("ray")
    hooks = tmp_path_factory.mktemp("ray_hooks")
    path = os.pathsep.join([str(SRC), str(HERE)])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "RANDMASK_TEST_HOOK_DIR": str(hooks)},
                          "worker_process_setup_hook": "ray_hooks.install"})
    yield hooks
    ray.shutdown()


RAY = ExecutorConfig(executor="ray", cpus_per_run=1)


def test_a_ray_sweep_equals_a_local_sweep_and_a_rerun_executes_nothing(tiny_lm, tmp_path, ray_instance):
    sweep, base = _grid(tiny_lm, tmp_path / "local")
    local = run_grid(ExecutorConfig(), sweep, base, say=lambda s: None)
    sweep, base = _grid(tiny_lm, tmp_path / "ray")
    lines: list[str] = []
    remote = run_grid(RAY, sweep, base, say=lines.append)
    assert len(remote) == 4 and all(r.status == "done" for r in remote)
    assert sorted(_submitted(lines)) == sorted(r.run_id for r in remote)  # each cell submitted once
    assert [r.run_id for r in remote] == [r.run_id for r in local]  # same cells (identity), grid order
    for a, b in zip(local, remote):
        assert _result(a) == _result(b)  # bit for bit: every metric, loss and count
        assert _steps(tmp_path / "ray", b.run_id) == [1, 2, 3]
        for name in ("adapter.safetensors", "trainable.safetensors"):
            found = sorted((tmp_path / "ray" / b.run_id).rglob(name))
            assert [p.read_bytes() for p in found] == [
                p.read_bytes() for p in sorted((tmp_path / "local" / a.run_id).rglob(name))]
    stored = {r.run_id: r for r in ResultStore(tmp_path / "ray" / "results.sqlite").records()}
    assert {k: _result(v) for k, v in stored.items()} == {r.run_id: _result(r) for r in remote}
    again: list[str] = []
    run_grid(RAY, sweep, base, say=again.append)
    assert _submitted(again) == [] and sum("skip (finished)" in s for s in again) == 4


def test_a_concurrent_local_sweep_on_the_same_store_duplicates_nothing(tiny_lm, tmp_path, ray_instance):
    out = tmp_path / "runs"
    sweep, base = _grid(tiny_lm, out, lease_seconds=8)
    args = ["sweep", "--models", tiny_lm, "--tasks", "rte", "--methods", "randmask", "--ratios", "0.02",
            "--lrs", "0.01", "0.03", "--seeds", "0", "1", "--n-train", "12", "--n-val", "6", "--n-test", "6",
            "--epochs", "1", "--batch-size", "4", "--max-length", "96", "--eval-batch-size", "8", "--threads", "1",
            "--checkpoint-every", "1", "--lease-seconds", "8", "--out-dir", str(out), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "RANDMASK_TEST_STEP_SLEEP": "0.3"}
    log = tmp_path / "local.log"
    local = subprocess.Popen([sys.executable, str(WORKER), *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
                             env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*/config.json")) and local.poll() is None:
        time.sleep(0.1)  # the local sweep has claimed its first cell and is running it (slowly)
    lines: list[str] = []
    remote = run_grid(RAY, sweep, base, say=lines.append)
    assert local.wait(timeout=300) == 0
    ran_locally = [line.split()[1] for line in log.read_text().splitlines()
                   if line.startswith("[") and "skip" not in line]
    records = ResultStore(out / "results.sqlite").records()
    assert len(records) == 4 and all(r.status == "done" for r in records) and len(remote) == 4
    assert sorted(ran_locally + _submitted(lines)) == sorted(r.run_id for r in records)  # each cell exactly once
    assert ran_locally and _submitted(lines) and any("skip (running in" in s for s in lines)  # both worked
    for r in records:
        assert _steps(out, r.run_id) == [1, 2, 3]


def test_a_killed_ray_worker_is_retried_and_resumes_from_its_checkpoint(tiny_lm, tmp_path, ray_instance):
    out = tmp_path / "runs"
    sweep, base = _grid(tiny_lm, out, n_train=24)  # 6 steps per run
    sweep = dataclasses.replace(sweep, lrs=[0.01], seeds=[0])
    (ray_instance / "slow").touch()
    lines: list[str] = []
    done: list[list[RunRecord]] = []
    driver = threading.Thread(target=lambda: done.append(run_grid(RAY, sweep, base, say=lines.append)))
    driver.start()
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob("*/checkpoint/state.json")):
            time.sleep(0.1)
        (ckpt,) = list(out.glob("*/checkpoint/state.json"))
        run_id = ckpt.parent.parent.name
        time.sleep(0.6)  # a step or two past the first checkpoint
        pid = int((ray_instance / f"{run_id}.pid").read_text())
        os.kill(pid, signal.SIGKILL)  # the Ray worker process running the cell
        print(f"killed Ray worker {pid} running {run_id}, step log so far {_steps(out, run_id)}")
    finally:
        driver.join(timeout=300)
        (ray_instance / "slow").unlink()
    (record,) = done[0]
    print("driver said:", *lines, sep="\n  ")
    print("notes:", record.notes)
    assert record.status == "done" and _submitted(lines) == [run_id]  # Ray retried it; the driver submitted once
    assert int((ray_instance / f"{run_id}.pid").read_text()) != pid  # the retry ran in another worker process
    assert any(n.startswith("resumed from the checkpoint at step") for n in record.notes)
    assert _steps(out, run_id) == [1, 2, 3, 4, 5, 6]  # resumed: each step once
    assert ResultStore(out / "results.sqlite").get(run_id).status == "done"


@pytest.mark.slow
def test_a_killed_driver_loses_at_most_its_runs_in_flight(tiny_lm, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "runs"
    args = ["sweep", "--models", tiny_lm, "--tasks", "rte", "--methods", "randmask", "--ratios", "0.02",
            "--lrs", "0.01", "0.03", "--seeds", "0", "1", "--n-train", "240", "--n-val", "6", "--n-test", "6",
            "--epochs", "1", "--batch-size", "2", "--max-length", "96", "--threads", "1", "--checkpoint-every", "5",
            "--lease-seconds", "5", "--out-dir", str(out), "--no-progress", "--executor", "ray"]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def sweep(log: Path, **kw: object) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "randmask_lab.cli", *args], stdout=log.open("w"),
                                stderr=subprocess.STDOUT, env=env, **kw)

    driver = sweep(tmp_path / "a.log", start_new_session=True)  # its own process group, for the clean-up below
    deadline = time.time() + 180
    while time.time() < deadline and not list(out.glob("*/checkpoint/state.json")):
        time.sleep(0.1)
    time.sleep(1.0)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    time.sleep(3)
    logged = {p: len(p.read_text().splitlines()) for p in out.glob("*/steps.csv")}
    time.sleep(3)
    assert logged == {p: len(p.read_text().splitlines()) for p in out.glob("*/steps.csv")}  # its workers stopped
    try:
        os.killpg(driver.pid, signal.SIGKILL)  # Ray's agents of the dead local instance
    except ProcessLookupError:
        pass
    in_flight = [p.parent.name for p in out.glob("*/checkpoint")]
    assert in_flight
    assert sweep(tmp_path / "b.log").wait(timeout=600) == 0  # the same command finishes the grid
    records = {r.run_id: r for r in ResultStore(out / "results.sqlite").records()}
    assert len(records) == 4 and all(r.status == "done" for r in records.values())
    for run_id in in_flight:
        assert any(n.startswith("resumed from the checkpoint at step") for n in records[run_id].notes)
    for run_id in records:
        assert _steps(out, run_id) == list(range(1, 121))  # each step once: nothing ran twice
    assert sweep(tmp_path / "c.log").wait(timeout=300) == 0
    assert _submitted((tmp_path / "c.log").read_text().splitlines()) == []  # a third run executes nothing


def test_local_ray_workers_import_the_lab_from_where_the_driver_does() -> None:
    """The PYTHONPATH a local Ray instance hands its workers is the folder holding the driver's randmask_lab
    (it once pointed inside the package after a module move, so workers imported an installed copy)."""
    import randmask_lab
    from randmask_lab.experiment.sweeps.executors.ray_executor import source_folder

    assert (source_folder() / "randmask_lab" / "__init__.py").resolve() == Path(randmask_lab.__file__).resolve()
