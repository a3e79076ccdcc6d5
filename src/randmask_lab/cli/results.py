"""The verbs that read results: ``randmask report``, ``curves``, ``calibrate-lr``, and ``list``."""

from __future__ import annotations

import argparse

from randmask_lab.analysis.calibrate_lr import calibration_pairs, calibration_report
from randmask_lab.cli.common import filters, open_store, store_options
from randmask_lab.cli.study import SPEC_HELP, report_from
from randmask_lab.errors import RunError
from randmask_lab.experiment.results.report import labelled_best_runs, report
from randmask_lab.methods import METHOD_NAMES
from randmask_lab.tasks import TASKS
from randmask_lab.zoo import model_names


def _report_option_conflicts(args: argparse.Namespace) -> str | None:
    """The first given option that the chosen report mode would ignore, as an error message; or None."""
    if args.from_file:
        store_only = [("--best-runs", args.best_runs), ("--all-seeds", args.all_seeds),
                      ("--select val_metric", args.select != "val_loss"), ("--store", args.store),
                      *((f"--{k}", v) for k, v in filters(args).items())]
        for flag, given in store_only:
            if given:
                return f"{flag} applies to a results store, not to --from (a study file's tables show every cell)"
        return None
    for flag, given in (("--figures", args.figures), ("--spec", args.spec)):
        if given:
            return f"{flag} needs --from <study.jsonl>; for a store, export it first (randmask export)"
    if args.all_seeds and not args.best_runs:
        return "--all-seeds only changes --best-runs; add --best-runs"
    return None


def _cmd_report(args: argparse.Namespace) -> int:
    conflict = _report_option_conflicts(args)
    if conflict:
        raise RunError(conflict)
    if args.from_file:  # a committed study file: no store needed
        return report_from(args)
    store, where = open_store(args), filters(args)
    if args.best_runs:
        # the label names settings that split a cell
        for r, label in labelled_best_runs(store.records(**where), args.select, args.all_seeds):
            print("\t".join([r.config["task"], label.replace(" ", "_"), f"{r.config['lr']:g}",
                             r.run_dir or "", str(r.config["seed"])]))
        return 0
    print(report(store, args.select, **where))
    return 0


def _cmd_curves(args: argparse.Namespace) -> int:
    from randmask_lab.analysis.curves import write_curves  # matplotlib: only when a plot is drawn

    png, curves = write_curves(open_store(args), args.out, **filters(args))
    for label, points in curves.items():
        print(f"{label}: " + ", ".join(f"{e}: {m:.4f}" for e, m, _ in points if m is not None))
    print(f"wrote {png}")
    return 0


def _cmd_calibrate_lr(args: argparse.Namespace) -> int:
    store = open_store(args, made_by="`randmask sweep`")
    print(calibration_report(calibration_pairs(args.folders, store, args.task)))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    print("tasks:   " + ", ".join(f"{n} ({t.kind}{', head mode' if t.has_head_mode else ''})"
                                  for n, t in TASKS.items()))
    print("methods: " + ", ".join(METHOD_NAMES))
    print("models:  " + ", ".join(model_names()) + ", or a local model folder / Hub id")
    return 0


def add_report(sub: argparse._SubParsersAction) -> None:
    """``randmask report``: the best-LR table of a store, or a study file's tables (--from)."""
    rep = sub.add_parser("report", help="print the best-LR table per method/budget/task (Markdown)")
    store_options(rep, with_filters=True)
    rep.add_argument("--select", choices=["val_loss", "val_metric"], default="val_loss",
                     help="choose each cell's LR by mean validation loss (default) or validation metric")
    rep.add_argument("--best-runs", action="store_true",
                     help="instead of the table, one tab-separated line per cell: task, method_budget, chosen LR, "
                     "run folder (to feed the analysis commands' --adapter), seed")
    rep.add_argument("--all-seeds", action="store_true",
                     help="with --best-runs: a line for every seed at the chosen LR, not only the first")
    rep.add_argument("--from", dest="from_file", help="a JSONL study file (randmask export) instead of a store: "
                     "tables with 95%% intervals over seeds and paired differences")
    rep.add_argument("--figures", help="with --from: also write the study's PNGs into this folder")
    rep.add_argument("--spec", help="with --from: " + SPEC_HELP)
    rep.set_defaults(func=_cmd_report)


def add_curves(sub: argparse._SubParsersAction) -> None:
    """``randmask curves``: validation score per epoch."""
    cur = sub.add_parser("curves", help="plot validation score per epoch of stored runs (longer-training study)")
    store_options(cur, with_filters=True)
    cur.add_argument("--out", default="runs/curves.png", help="PNG to write (default: runs/curves.png)")
    cur.set_defaults(func=_cmd_curves)


def add_calibrate_lr(sub: argparse._SubParsersAction) -> None:
    """``randmask calibrate-lr``: suggest-lr's Adam factor from a sweep."""
    cal = sub.add_parser("calibrate-lr", help="fit suggest-lr's Adam factor to the best LRs of a sweep")
    cal.add_argument("folders", nargs="+", help="folders holding suggest_lr.json files (made with --calibration 1)")
    cal.add_argument("--task", required=True, help="the task of the suggestions and the sweep")
    store_options(cal, with_filters=False)
    cal.set_defaults(func=_cmd_calibrate_lr)


def add_list(sub: argparse._SubParsersAction) -> None:
    """``randmask list``: known tasks, methods and models."""
    lst = sub.add_parser("list", help="known tasks, methods and models")
    lst.set_defaults(func=_cmd_list)
