"""`randmask study`: run a study spec to completion through the runner, exporting as it goes.

The results store is the source of truth: after every run the plan is recomputed from it (the
seeds to run depend on the LR search), and the study file is re-exported, so a killed study loses
at most the run in flight and a second worker on the same store takes the runs this one does not
hold (the runner's leases).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

from randmask_lab.errors import LabError, RunError
from randmask_lab.experiment.parts.budget import check_budgets
from randmask_lab.experiment.results.record import CODE_PATHS, FINISHED, RunRecord, source_version
from randmask_lab.experiment.results.store import Lease, ResultStore, new_owner, store_file
from randmask_lab.experiment.run.config import STORED_NAMES, RunConfig
from randmask_lab.experiment.run.sources import data_fingerprint
from randmask_lab.experiment.run.untrained import without_training_options
from randmask_lab.experiment.sweeps.sweep import run_claimed
from randmask_lab.study.plan import PlannedRun, RunId, StudySpec, needed_runs
from randmask_lab.study.records import export_locked, read_jsonl


def run_config(spec: StudySpec, run: PlannedRun, out_dir: str, execution: dict) -> RunConfig:
    """The RunConfig of one planned run (spec's protocol and common fields + execution options; a zero-shot run
    leaves out the common fields that only shape training)."""
    config = RunConfig(model=spec.model, task=run.task, method=run.method, trainable_ratio=run.ratio, lr=run.lr,
                       seed=run.seed, precision=spec.precision, out_dir=out_dir,
                       **{**spec.common, **spec.protocol[run.task]}, **execution)
    return without_training_options(config)


def planned_run_id(spec: StudySpec, out_dir: str, execution: dict | None = None) -> RunId:
    """planned run -> the run id it gets under this code and data (for ``needed_runs``)."""
    return lambda run: run_config(spec, run, out_dir, execution or {}).run_id


def _as_floats(config: dict) -> dict:
    """``config`` with each whole number in a float field written as a float: JSON has one number type, and a file
    rewritten by a JSON tool (jq writes 0.0 as 0) would otherwise hash to another run id than the run's own."""
    floats = {STORED_NAMES.get(f.name, f.name) for f in dataclasses.fields(RunConfig)
              if str(f.type).startswith("float")}
    return {k: float(v) if k in floats and type(v) is int else v for k, v in config.items()}


def stale_records(records: Sequence[RunRecord]) -> tuple[list[RunRecord], list[str]]:
    """(the records whose run id is not the one their own config gets under this code, on the data they record (a
    mask sampler since changed: ``RunConfig.identity``), the tasks whose data here are not the data their records
    name).

    A study's plan runs a stale record again (``needed_runs`` counts a record by that id), so a table or rule that
    read it would show a result the study has yet to make, and, once the rerun lands, two runs of one LR and seed.
    Where this machine's data differ from a record's (missing, or another copy), its id says nothing of the code, and
    a reader of the study's file still reads the study's results: such a record is kept, and its task named. So is
    a record whose config or data this code cannot read here (``LabError``, ``OSError``): it is not judged."""
    here: dict[tuple[str, str | None], object] = {}  # (task, source) -> the data fingerprint here, read once
    stale, other_data = [], set()
    for r in records:
        try:
            config = RunConfig.from_dict({**_as_floats(r.config), "data_dir": None})  # this machine's data
            if config.run_id == r.run_id:
                continue
            where = (config.task, config.source)
            if where not in here:
                here[where] = data_fingerprint(config.task, None, config.source)
        except (LabError, OSError):  # e.g. a data file unreadable here: not judged
            continue
        if here[where] != r.data.get("fingerprint"):
            other_data.add(config.task)
        else:
            stale.append(r)
    return stale, sorted(other_data)


def with_committed(records: list[RunRecord], committed: list[RunRecord]) -> list[RunRecord]:
    """``records`` plus the finished ``committed`` records whose run id they lack (what ``adopt_records``
    would add), without writing anything: the view ``--plan`` takes on a fresh machine."""
    have = {r.run_id for r in records}
    return records + list(_unheld_finished(committed, have.__contains__))


def _unheld_finished(committed: Iterable[RunRecord], is_held: Callable[[str], bool]) -> Iterator[RunRecord]:
    """The finished ``committed`` records whose run id ``is_held`` does not know, each id once (the
    first, should a damaged file repeat one): the one rule by which a committed study file counts,
    both for ``--plan`` and for a run."""
    taken: set[str] = set()
    for r in committed:
        if r.status in FINISHED and r.run_id not in taken and not is_held(r.run_id):
            taken.add(r.run_id)
            yield r


def adopt_records(store: ResultStore, records: list[RunRecord]) -> int:
    """Put the finished records of a committed study file into ``store`` where it lacks them, so a
    study resumes on a fresh machine from the JSONL alone; return how many were added."""
    added = 0
    for record in _unheld_finished(records, lambda run_id: store.get(run_id) is not None):
        store.put(record)
        added += 1
    return added


def _run_one(config: RunConfig, store: ResultStore, owner: str,
             say: Callable[[str], None]) -> RunRecord | Literal["finished"] | None:
    """Claim and run one cell: its record; "finished" when another worker finished it since the plan was read
    (plan again); None when another worker holds it (or took it over mid-run)."""
    claim = store.claim(config.run_id, owner, config.lease_seconds)
    if claim == "busy":
        return None
    if claim == "finished":
        return "finished"
    return run_claimed(config, store, Lease(store, config.run_id, owner, config.lease_seconds), say)


def check_provenance(allow_dirty: bool) -> dict:
    """The code version a study's runs will record; a RunError when the code has uncommitted changes (the runs
    could not be traced to a commit) unless ``allow_dirty``."""
    version = source_version()
    if version.get("dirty") and not allow_dirty:
        raise RunError(f"the code has uncommitted changes ({' '.join(CODE_PATHS)} differ from commit "
                       f"{str(version.get('commit'))[:12]}): a study's records must name the exact code that made "
                       "them; commit (or stash) first, or pass --allow-dirty to run anyway")
    return version


def check_one_precision(spec: StudySpec, records: Iterable[RunRecord], source: str | Path) -> None:
    """A RunError when ``records`` (a committed study file) hold runs of this study's model in another precision
    than the spec's: one study keeps one precision, so its cells compare like with like."""
    others = sorted({str(r.config.get("precision", "32")) for r in records if r.config.get("model") == spec.model}
                    - {spec.precision})
    if others:
        raise RunError(f"{source} holds {spec.model} runs in precision {', '.join(others)} and the spec says "
                       f"{spec.precision}: a study keeps one precision; export to a new file, or set the spec's "
                       f"precision to {others[0]}")


def validate_spec(spec: StudySpec, out_dir: str, execution: dict | None = None) -> list[RunConfig]:
    """The first-round runs' configs, each validated: a RunError on a bad option or protocol value of any of
    them, one error before anything runs (or is planned), not a failed record per run. Loads no model."""
    configs = [run_config(spec, need, out_dir, execution or {}) for need in needed_runs(spec, [])]
    for config in configs:
        config.validate()
    return configs


def check_spec(spec: StudySpec, out_dir: str, execution: dict | None = None) -> None:
    """``validate_spec``, then a RunError when a masking cell asks for a budget its model cannot take
    (``budget.check_budgets``, on a weightless copy of the model): before anything runs or is planned."""
    check_budgets(validate_spec(spec, out_dir, execution))


def run_study(spec: StudySpec, out_dir: str, export: str | Path | None = None, max_runs: int | None = None,
              execution: dict | None = None, say: Callable[[str], None] = print, wait_seconds: float = 30.0,
              allow_dirty: bool = False) -> int:
    """Run what the plan needs until nothing is left (or ``max_runs``); return how many ran here.

    A run that fails here is recorded as failed and not retried by this call (run the command
    again to retry it), so one broken cell cannot loop forever. Refuses uncommitted code (unless
    ``allow_dirty``), a committed study file in another precision, and a masking budget a cell's model cannot take.
    """
    store = _open_store(spec, out_dir, export, execution, say, allow_dirty)
    lock = store.path.with_name(store.path.name + ".export-lock")  # beside the store the workers share

    def export_now() -> None:
        if export:
            export_locked(store.records, export, lock)

    owner, ran, failed, finished_seen = new_owner(), 0, set(), set()
    run_id = planned_run_id(spec, out_dir, execution)
    while max_runs is None or ran < max_runs:
        needs = [n for n in needed_runs(spec, store.records(), run_id) if run_id(n) not in failed]
        if not needs:
            say(f"study {spec.name}: nothing left to run ({len(store)} records; {len(failed)} failed here)")
            export_now()
            break
        progressed = False
        for need in needs:
            config = run_config(spec, need, out_dir, execution or {})
            record = _run_one(config, store, owner, say)
            if record is None:
                continue  # another worker runs it
            if record == "finished":  # not run here, so neither said nor counted (--max-runs counts runs made)
                if config.run_id in finished_seen:  # planned again after a re-plan: its record never counts
                    raise RunError(f"study {spec.name}: run {config.run_id} is finished in the store, yet the plan "
                                   "still needs it: its record does not match the spec's cell (a field the spec "
                                   "leaves to a default, or another store). Fix the spec; nothing more is run.")
                finished_seen.add(config.run_id)
                progressed = True
                break  # another worker's record may change the plan (an LR search ended): re-plan
            ran, progressed = ran + 1, True
            if record.status == "failed":
                failed.add(config.run_id)
            say(f"{record.status}: {need.task} {need.method} {need.ratio or ''} lr={need.lr:g} seed={need.seed} "
                f"test={record.test_metric}")
            export_now()
            break  # re-plan: the LR search decides which runs come next
        if not progressed:
            say(f"every planned run is held by another worker; waiting {wait_seconds:.0f} s")
            time.sleep(wait_seconds)
    return ran


def _open_store(spec: StudySpec, out_dir: str, export: str | Path | None, execution: dict | None,
                say: Callable[[str], None], allow_dirty: bool) -> ResultStore:
    """The checks before any run, then the study's store with the committed file's finished records taken in."""
    check_spec(spec, out_dir, execution)
    version = check_provenance(allow_dirty)
    # exists(), not is_file(): a folder or device named as the study file is refused here, before any run, not
    # after an hour of training when the first export fails (read_jsonl refuses anything but a regular file)
    committed = read_jsonl(export) if export and Path(export).exists() else []
    check_one_precision(spec, committed, export or "")
    say(f"study {spec.name}: code {version.get('package')} at commit {version.get('commit')}"
        f"{' (uncommitted changes: --allow-dirty)' if version.get('dirty') else ''}")
    store = ResultStore(store_file(None, out_dir))
    if committed:
        adopted = adopt_records(store, committed)
        if adopted:
            say(f"study {spec.name}: took {adopted} finished records from {export} into the store")
    return store
