"""`randmask study`, `randmask export`, `randmask merge`, `randmask findings`, and `randmask report --from <jsonl>`."""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from randmask_lab.argtypes import positive_int
from randmask_lab.cli.common import filters, open_store
from randmask_lab.errors import RunError
from randmask_lab.experiment.results.record import RunRecord
from randmask_lab.experiment.results.store import ResultStore, store_file
from randmask_lab.study.cells import StudyCell, study_cells
from randmask_lab.study.findings import MARGIN, findings
from randmask_lab.study.forecast import forecast
from randmask_lab.study.plan import StudySpec, needed_runs, plan_progress, seeds_decided
from randmask_lab.study.power import power_table
from randmask_lab.study.records import export_jsonl, merge_jsonl, read_jsonl
from randmask_lab.study.run import (
    check_one_precision,
    check_spec,
    planned_run_id,
    run_study,
    stale_records,
    with_committed,
)
from randmask_lab.study.tables import study_tables


def _cells(args: argparse.Namespace) -> tuple[dict[str, list[StudyCell]], dict[str, dict], list[str]]:
    """model -> the cells of the ``--from`` file, those whose LR search ``--spec``'s plan has not finished marked;
    model -> the runs ``--spec``'s plan has left per (task, method) cell (``study.plan.plan_progress``; no spec:
    none known); and notes on what ``--spec`` left out: records of other models or precisions (their verdicts
    would read as final under a spec that is not theirs) and seeds beyond the plan (added by hand, they would turn
    an interim verdict final)."""
    records = read_jsonl(args.from_file)
    unfinished: frozenset = frozenset()
    left: dict[str, dict] = {}
    notes: list[str] = []
    progress = None
    if getattr(args, "spec", None):
        spec = StudySpec.from_file(args.spec)
        mine = [r for r in records if spec.holds(r)]
        if not mine:
            raise RunError(f"--spec {args.spec} is a study of {spec.model} at precision {spec.precision}, and no "
                           f"record of {args.from_file} is; give the spec that made this file")
        if len(mine) < len(records):
            others = sorted({f"{r.config.get('model')} at precision {r.config.get('precision', '32')}"
                             for r in records if not spec.holds(r)})
            notes.append(f"note: left out {len(records) - len(mine)} records of {'; '.join(others)}: --spec "
                         f"{args.spec} plans {spec.model} at precision {spec.precision} only")
        mine = _current(mine, notes)
        records, progress = mine, plan_progress(spec, mine)
        unfinished, left[spec.model] = progress.unfinished_searches, progress.runs_left
    grouped: dict[str, list[StudyCell]] = defaultdict(list)
    for key, cell in study_cells(records, unfinished).items():
        grouped[key[0]].append(cell)
        planned = progress.planned_seeds.get((key[2], key[3])) if progress else None
        dropped = cell.keep_seeds(planned) if planned is not None else []
        if dropped:
            notes.append(f"note: left out {key[2]} {key[3]} seed{'s' * (len(dropped) > 1)} "
                         f"{', '.join(map(str, dropped))}: beyond the seeds the spec plans, so no rule reads their "
                         "results at the chosen LR")
    return dict(grouped), left, notes


def _current(records: list[RunRecord], notes: list[str]) -> list[RunRecord]:
    """``records`` less those the spec's plan runs again (``study.run.stale_records``), each named in ``notes``, as
    are the tasks whose data here are not the records' (their ids are not checked)."""
    found, other_data = stale_records(records)
    if other_data:
        notes.append(f"note: the {', '.join(other_data)} data here are not the data the records name (missing or "
                     "another copy), so their run ids are not checked against this code")
    stale = {id(r) for r in found}
    if stale:
        names = sorted(r.run_id for r in found)
        notes.append(f"note: left out {len(names)} record{'s' * (len(names) > 1)} made under other code than the "
                     f"spec's runs get now ({', '.join(names[:3])}{', ...' * (len(names) > 3)}): the study plans "
                     "them again, so no table or rule reads them")
    return [r for r in records if id(r) not in stale]


def report_from(args: argparse.Namespace) -> int:
    """Print the study tables of a JSONL file; with --figures, write its PNGs too."""
    by_model, left, notes = _cells(args)
    for note in notes:
        print(note, file=sys.stderr)
    # ``left``: the runs --spec's plan has left per cell, so the tables mark those cells interim
    print(study_tables({cell.key: cell for cells in by_model.values() for cell in cells}, left))
    if getattr(args, "figures", None):
        # matplotlib: only when figures are asked for
        from randmask_lab.study.figures import plot_lr_curves, plot_sparsity_curve, plot_structured_vs_random

        for model, cells in by_model.items():
            slug = model.replace("/", "_")
            chosen = [c for c in cells if not c.search_unfinished]  # the search curves show every LR tried
            written = [plot_lr_curves(cells, Path(args.figures) / f"{slug}_lr_curves.png", model),
                       plot_structured_vs_random(chosen, Path(args.figures) / f"{slug}_structured.png", model),
                       plot_sparsity_curve(chosen, Path(args.figures) / f"{slug}_sparsity.png", model)]
            for path in filter(None, written):
                print(f"wrote {path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    store = open_store(args)
    n = export_jsonl(store.records(**filters(args)), args.out)
    print(f"wrote {n} records to {args.out}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    records = merge_jsonl(args.files)
    n = export_jsonl(records, args.out)
    print(f"wrote {n} records to {args.out} (from {len(args.files)} files)")
    return 0


NO_SPEC_NOTE = ("note: no --spec, so every cell is read as finished. A study still running reads as final here: pass "
                "the spec that made the file (--spec study.json) and what its plan has left reads as interim.")


def _cmd_findings(args: argparse.Namespace) -> int:
    by_model, left, notes = _cells(args)
    if not args.spec:  # the records do not name their spec, so the reader has to be told what was not checked
        print(NO_SPEC_NOTE)
    for note in notes:
        print(note)
    for model, cells in sorted(by_model.items()):
        print(f"## {model}")
        for verdict in findings(cells, args.analysis or (), args.theory, left.get(model)):
            print(verdict.text())
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    if args.power_from and not args.plan:  # it only feeds the plan's power calculation
        raise RunError("--power-from is read by --plan only (its power calculation); add --plan, or drop it")
    spec = StudySpec.from_file(args.spec).only_stages(args.stages)
    if args.plan:
        check_spec(spec, args.out_dir)
        path = store_file(None, args.out_dir)
        records = ResultStore(path).records() if path.is_file() else []
        if args.export and Path(args.export).exists():  # what a run would adopt (a folder: refused, as a run does)
            committed = read_jsonl(args.export)
            check_one_precision(spec, committed, args.export)
            records = with_committed(records, committed)
        needs = needed_runs(spec, records, planned_run_id(spec, args.out_dir))
        for n in needs:
            print(f"{n.task}\t{n.method}\t{n.ratio or ''}\tlr={n.lr:g}\tseed={n.seed}")
        print(forecast(spec, needs, records).text())
        _print_reestimate(spec, records)
        _print_power(spec, records, args.power_from)
        return 0
    execution = {"threads": args.threads, "progress": args.progress}
    if args.lease_seconds is not None:
        execution["lease_seconds"] = args.lease_seconds
    run_study(spec, args.out_dir, export=args.export, max_runs=args.max_runs, execution=execution,
              allow_dirty=args.allow_dirty)
    return 0


def _print_reestimate(spec: StudySpec, records: list) -> None:
    """The spec's seed re-estimation: what it decided, or what it waits for."""
    rule = spec.reestimate
    if rule is None:
        return
    decided = seeds_decided(spec, records)
    if decided is not None:
        print(decided.text())
        return
    named = sorted(rule.labels)
    most = sum(max(0, rule.max_seeds - len(spec.cell_seeds(cell))) for _, cell in spec.reestimated_cells())
    print(f"seeds: re-estimated once {', '.join(named)} have their planned seeds on every task (from their spread "
          f"alone: a 95% half-width of at most {100 * rule.half_width:g} point{'s' * (rule.half_width != 0.01)}, at "
          f"most {rule.max_seeds} seeds: up to {most} further runs)")


def _print_power(spec, records: list, power_from: str | None) -> None:
    """The power calculation of ``--plan``: seeds each comparison needs, from measured per-seed spreads."""
    source = read_jsonl(power_from) if power_from else [r for r in records if spec.holds(r)]
    rows = power_table(list(study_cells(source).values()), MARGIN, tasks=set(spec.protocol))  # the average it decides
    where = power_from or "this study's finished runs"
    if not rows:
        print(f"power: no comparison has 2+ paired seeds in {where} yet (give --power-from <an earlier study.jsonl>)")
        return
    print(f"power (per-seed spreads measured in {where}, on this study's tasks {', '.join(spec.protocol)}; a planning "
          "figure, re-read as seeds come in):")
    for row in rows:
        print(f"  {row.text(MARGIN)}")


SPEC_HELP = ("the study spec that made the --from file: cells whose LR search its plan has not finished are shown as "
             "the best so far and left out of the findings (records alone cannot tell them from chosen LRs); a "
             "finding whose cells still have planned runs reads INCONCLUSIVE, interim (read once the seeds are in)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``study``, ``export``, ``merge`` and ``findings`` verbs."""
    std = sub.add_parser("study", help="run a study spec (LR search on one seed, grid-edge extension, then the "
                                       "other seeds at the chosen LR), resumable, exporting as it goes")
    std.add_argument("spec", help="the study spec (JSON), e.g. experiments/smollm2_study.json")
    std.add_argument("--out-dir", default="runs/study", help="run folders and results.sqlite (default: runs/study)")
    std.add_argument("--export", help="re-write this JSONL study file after every run")
    std.add_argument("--max-runs", type=positive_int, help="stop after this many runs (the next call goes on)")
    std.add_argument("--threads", type=positive_int, help="torch CPU threads per run")
    std.add_argument("--lease-seconds", type=float, help="a run's lease expires this long after its last "
                     "heartbeat (default 60); raise it when workers may be paused (kill -STOP)")
    std.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False, help="progress bars")
    std.add_argument("--plan", action="store_true", help="print the runs planned next, the compute left and the "
                     "seeds each comparison needs, and exit (counting the finished records of --export, as a run "
                     "would)")
    std.add_argument("--power-from", help="with --plan: the study file (JSONL) whose per-seed spreads the power "
                     "calculation reads (default: this study's own finished runs)")
    std.add_argument("--stages", type=int, nargs="+", help="only the cells of these stages (the spec's "
                     "\"stage\" fields): lets two machines split a study without running one cell twice")
    std.add_argument("--allow-dirty", action="store_true", help="run even when the code has uncommitted changes "
                     "(its records then cannot be traced to a commit)")
    std.set_defaults(func=_cmd_study)

    exp = sub.add_parser("export", help="write every record of a results store to a JSONL study file")
    exp.add_argument("--out", required=True, help="the JSONL file to write (e.g. experiments/results/<study>.jsonl)")
    exp.add_argument("--out-dir", default="runs", help="folder holding results.sqlite (default: runs)")
    exp.add_argument("--store", help="results store file (default: <out-dir>/results.sqlite)")
    for name in ("task", "model", "method"):
        exp.add_argument(f"--{name}", help=f"only this {name}")
    exp.set_defaults(func=_cmd_export)

    mrg = sub.add_parser("merge", help="join study files (a GPU session's export and the CPU workers') into one, "
                                       "each run once")
    mrg.add_argument("files", nargs="+", help="the JSONL study files to join (the same run in two must be the same "
                     "record, or finished in one and failed in the other)")
    mrg.add_argument("--out", required=True, help="the JSONL file to write (may be one of the inputs)")
    mrg.set_defaults(func=_cmd_merge)

    fnd = sub.add_parser("findings", help="HOLDS / DOES NOT HOLD / INCONCLUSIVE for each of the paper's findings")
    fnd.add_argument("--from", dest="from_file", required=True, help="a JSONL study file (randmask export)")
    fnd.add_argument("--analysis", nargs="*", help="folders holding hessian.json / distance.json outputs (finding c)")
    fnd.add_argument("--theory", help="theory_summary.json written by `randmask theory` (finding d)")
    fnd.add_argument("--spec", help=SPEC_HELP)
    fnd.set_defaults(func=_cmd_findings)
