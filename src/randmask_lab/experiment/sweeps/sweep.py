"""Grids over model x task x method x budget x lr x seed; resumable (finished runs are skipped), and
safe to run as several workers on one store and out-dir (runs are leased, see results/store.py)."""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from randmask_lab.errors import LabError, RunError, StoreError
from randmask_lab.experiment.parts.assemble import check_names
from randmask_lab.experiment.parts.budget import check_budgets
from randmask_lab.experiment.results.record import RunRecord, code_version
from randmask_lab.experiment.results.store import Lease, ResultStore, new_owner
from randmask_lab.experiment.run.config import MASKING_METHODS, RunConfig
from randmask_lab.experiment.run.untrained import UNTRAINED_METHODS, untrained_problem, without_training_options
from randmask_lab.experiment.training.train import LeaseLost, default_store, run_training
from randmask_lab.fs import disk_problem

# Starting LR grids per method (3 points, x~3 apart). The paper's finding: the sparser the mask,
# the larger the best LR (up to ~1e-1 at 0.001%); `masking_lrs` follows that trend.
DEFAULT_LRS: dict[str, tuple[float, ...]] = {
    "full": (1e-5, 3e-5, 1e-4), "lora": (1e-4, 3e-4, 1e-3), "adalora": (1e-4, 3e-4, 1e-3),
    "prefix": (1e-3, 3e-3, 1e-2), "bitfit": (1e-4, 1e-3, 1e-2), "adapter": (1e-4, 3e-4, 1e-3),
}
# float("3e-1"), not 3 * 0.1 = 0.30000000000000004: LRs appear in run ids and tables.
_LADDER = [float(f"{m}e{e}") for e in range(-6, 1) for m in (1, 3)]


def masking_lrs(ratio: float | None) -> tuple[float, ...]:
    """Three LRs around 3e-5 * ratio^-0.7 (full FT ~3e-5; 1e-3 -> ~4e-3; 1e-5 -> ~1e-1), on a 1-3-10 ladder."""
    center = 3e-5 * (ratio or 1e-3) ** -0.7
    i = min(range(len(_LADDER)), key=lambda k: abs(math.log(_LADDER[k] / center)))
    i = min(max(i, 1), len(_LADDER) - 2)
    return tuple(_LADDER[i - 1:i + 2])


def default_lrs(method: str, ratio: float | None) -> tuple[float, ...]:
    """The default LR grid of a method (and masking budget)."""
    return masking_lrs(ratio) if method in MASKING_METHODS else DEFAULT_LRS.get(method, (1e-4, 1e-3, 1e-2))


@dataclass
class SweepConfig:
    """The grid of a sweep; every other run option comes from a base RunConfig."""

    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    """Models to sweep."""
    tasks: list[str] = field(default_factory=lambda: ["sst2"])
    """Tasks to sweep."""
    methods: list[str] = field(default_factory=lambda: ["randmask"])
    """Methods to sweep."""
    ratios: list[float] = field(default_factory=lambda: [1e-3, 1e-4, 1e-5])
    """Masking budgets (fractions of all parameters) for randmask/structured; other methods run once."""
    lrs: list[float] | None = None
    """Learning rates; default: a 3-point grid per method and budget (see sweep.default_lrs)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds (each sets the data, mask and order seed; the paper averages 3)."""


def sweep_configs(sweep: SweepConfig, base: RunConfig) -> list[RunConfig]:
    """Every run of the grid, in a stable order (task, method, budget, lr, seed)."""
    runs = []
    for model in sweep.models:
        for task in sweep.tasks:
            for method in sweep.methods:
                budgets = sweep.ratios if method in MASKING_METHODS else [None]
                for ratio in budgets:
                    # zeroshot trains nothing: one run per seed, without the base's training options
                    lrs = [base.lr] if method == "zeroshot" else sweep.lrs or default_lrs(method, ratio)
                    for lr in lrs:
                        for seed in sweep.seeds:
                            runs.append(without_training_options(dataclasses.replace(
                                base, model=model, task=task, method=method, trainable_ratio=ratio,
                                density=None, lr=lr, seed=seed, data_seed=None, mask_seed=None,
                                order_seed=None)))
    return runs


def failed_record(config: RunConfig, error: BaseException) -> RunRecord:
    """A record for a run that raised: stored so the report shows it; a later sweep retries it."""
    return RunRecord(config.run_id, config.to_dict(), "failed", metric="", error=f"{type(error).__name__}: {error}",
                     code_version=code_version(), created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def checked_grid(sweep: SweepConfig, base: RunConfig) -> tuple[list[RunConfig], list[str]]:
    """The grid's run configs and ids, checked before any run starts: unknown names and missing data
    fail here (not hours later), and so do a grid that lists the same run twice and a masking ratio the model
    cannot take."""
    if sweep.methods and all(m in UNTRAINED_METHODS for m in sweep.methods):  # the training options reach no run
        if problem := untrained_problem(dataclasses.replace(base, method=sweep.methods[0], trainable_ratio=None)):
            raise RunError(f"every method of the sweep trains nothing: {problem}")
        if sweep.lrs:
            raise RunError(f"--lrs sets the LRs of the methods that train, and --methods {','.join(sweep.methods)} "
                           "trains nothing: it would be ignored. Drop it")
    configs = sweep_configs(sweep, base)
    for config in configs:
        check_names(config)
    ids = [c.run_id for c in configs]
    if len(set(ids)) < len(ids):
        raise RunError("the sweep grid lists the same run twice (repeated values in --lrs / --seeds / --ratios?)")
    check_budgets(configs)  # a ratio the model cannot take, from its shapes alone
    return configs, ids


def run_sweep(sweep: SweepConfig, base: RunConfig, store: ResultStore | None = None,
              say: Callable[[str], None] = print, poll_seconds: float | None = None) -> list[RunRecord]:
    """Run every unfinished run of the grid; a diverged or failed run does not stop the sweep.

    Several sweeps may share one store and out-dir: each run is claimed (a lease in the store)
    before it starts, and a sweep skips runs another live worker holds, coming back to them after
    its pass. It returns once every run is finished or failed here; a run whose worker died is
    taken over when that worker's lease expires and resumes from its checkpoint.
    """
    configs, ids = checked_grid(sweep, base)
    store = store or default_store(base)
    poll = poll_seconds if poll_seconds is not None else max(0.5, min(10.0, base.lease_seconds / 4))
    owner = new_owner()
    results: dict[str, RunRecord] = {}
    pending = list(enumerate(configs, 1))
    announced: set[str] = set()
    while pending:
        waiting = []
        for i, config in pending:
            run_id = ids[i - 1]
            state, record = claim_cell(store, config, run_id, owner, announced, say, f"[{i}/{len(configs)}]")
            if state == "finished":
                results[run_id] = record  # type: ignore[assignment]
                continue
            if state == "busy":
                waiting.append((i, config))
                continue
            say(f"[{i}/{len(configs)}] {run_id}")
            record = run_claimed(config, store, Lease(store, run_id, owner, config.lease_seconds), say)
            if record is None:  # the lease was lost to another worker: it finishes the run
                waiting.append((i, config))
                continue
            say(f"  {record.status}: test {record.metric} = {record.test_metric}, best epoch {record.best_epoch}, "
                f"{record.wall_seconds:.0f} s")
            results[run_id] = record
        pending = waiting
        if pending:
            time.sleep(poll)  # runs in other workers: wait for them to finish or for their leases to expire
    return [results[i] for i in ids if i in results]


def claim_cell(store: ResultStore, config: RunConfig, run_id: str, owner: str, announced: set[str],
               say: Callable[[str], None], tag: str) -> tuple[str, RunRecord | None]:
    """Claim one grid cell for ``owner``: ``("finished", record)``, ``("busy", None)`` (another live worker
    holds it) or ``("claimed", None)`` (run it now). Each skip is announced once per sweep (``announced``);
    ``--restart`` deletes the cell's stored result and checkpoint the first time the sweep meets it."""
    first = run_id not in announced
    if config.restart and first:
        store.delete(run_id)  # --restart: this sweep runs every cell again, once
    claim = store.claim(run_id, owner, config.lease_seconds)
    if claim == "finished":
        if first:
            say(f"{tag} skip (finished) {run_id}")
        announced.add(run_id)
        return "finished", store.get(run_id)
    if claim == "busy":
        if first:
            held = store.lease(run_id)
            say(f"{tag} skip (running in {held.owner if held else 'another worker'}) {run_id}")
            announced.add(run_id)
        return "busy", None
    if config.restart and first:
        shutil.rmtree(Path(config.out_dir) / run_id / "checkpoint", ignore_errors=True)
    announced.add(run_id)
    return "claimed", None


def run_claimed(config: RunConfig, store: ResultStore, lease: Lease, say: Callable[[str], None]) -> RunRecord | None:
    """Run a claimed cell; a failure is recorded (and the lease dropped), a lost lease gives None."""
    try:
        return run_training(dataclasses.replace(config, restart=False), store=store, lease=lease)
    except KeyboardInterrupt:
        raise
    except LeaseLost as e:
        say(f"  {e}")
        return None
    except Exception as e:  # noqa: BLE001 - one broken run must not end a sweep of hundreds
        if disk_problem(e) or isinstance(e, StoreError):  # the disk or the store, not this run: stop, lose nothing
            raise
        say(f"  failed: {type(e).__name__}: {e}")
        if not isinstance(e, LabError):
            say("".join(traceback.format_exception(e)[-3:]).rstrip())
        record = failed_record(config, e)
        store.put(record, owner=lease.owner)
        return record
    finally:
        lease.release()
