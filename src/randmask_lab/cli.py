"""``randmask <verb>``: train, sweep, report, main, list (+ theory and analysis when installed).

Bad input (unknown task/model/method, missing data, impossible budgets) ends with exit code 2 and
a one-line message; set RANDMASK_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from randmask import MaskingError, __version__
from randmask_lab.errors import LabError, MissingPackageError, RunError, StoreError
from randmask_lab.fs import disk_problem

if TYPE_CHECKING:
    from randmask_lab.experiment.store import ResultStore

USER_ERRORS: tuple[type[BaseException], ...] = (MaskingError, LabError)
"""Printed as one line with exit code 2; every other exception is internal and keeps its traceback."""

# The lab's optional packages, for a verb whose import fails: a one-line error naming the package.
OPTIONAL_PACKAGES = {"transformers", "peft", "datasets", "matplotlib", "tqdm", "gguf", "ray", "accelerate"}


def _reports() -> bool:
    """True on the process that prints: rank 0 under torchrun / accelerate launch, or a lone process."""
    return int(os.environ.get("RANK", "0")) == 0


def _say(text: str) -> None:
    if _reports():
        print(text)


def _cmd_train(args: argparse.Namespace) -> int:
    from randmask_lab.experiment.config import RunConfig
    from randmask_lab.experiment.options import dataclass_from_args
    from randmask_lab.experiment.train import run_training

    _no_dtype(args)
    config = dataclass_from_args(RunConfig, args)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record = run_training(config)
    if not _reports():
        return 0
    if record.created < started:
        print(f"(finished earlier, on {record.created}: shown from the results store; --restart runs it again)")
    metric = "n/a" if record.test_metric is None else f"{100 * record.test_metric:.2f}"
    print(f"{record.status}: {config.task} test {record.metric} = {metric} (best epoch {record.best_epoch} "
          f"by {config.select_by}); {record.trainable:,} trainable of {record.total:,}; "
          f"{record.wall_seconds:.0f} s; run folder {record.run_dir}")
    return 0


def _no_dtype(args: argparse.Namespace) -> None:
    """--dtype was removed: a one-line error naming its --precision equivalent."""
    if getattr(args, "dtype", None):
        from randmask_lab.experiment.config import LEGACY_DTYPES

        raise RunError(f"--dtype was replaced by --precision: use --precision {LEGACY_DTYPES[args.dtype]} "
                       "(float32 -> 32, bfloat16 -> bf16-true, float16 -> 16-mixed)")


def _cmd_sweep(args: argparse.Namespace) -> int:
    from randmask_lab.experiment.config import RunConfig
    from randmask_lab.experiment.executors import ExecutorConfig, run_grid
    from randmask_lab.experiment.options import dataclass_from_args
    from randmask_lab.experiment.report import report_tables
    from randmask_lab.experiment.sweep import SweepConfig

    _no_dtype(args)
    sweep = dataclass_from_args(SweepConfig, args)
    base = dataclass_from_args(RunConfig, args)
    records = run_grid(dataclass_from_args(ExecutorConfig, args), sweep, base, say=_say)  # --executor local / ray
    _say(report_tables(records, base.select_by))
    failed = sum(r.status == "failed" for r in records)
    if failed and _reports():
        print(f"{failed} run(s) failed; run the same command again to retry them.", file=sys.stderr)
    return 1 if failed else 0


def open_store(args: argparse.Namespace, made_by: str = "`randmask train`/`sweep`") -> ResultStore:
    """The existing results store named by --store / --out-dir (StoreError when there is none)."""
    from randmask_lab.experiment.store import ResultStore, store_file

    path = store_file(args.store, args.out_dir)
    if not path.is_file():
        raise StoreError(f"no results store at {path}; run {made_by} first or pass --store")
    return ResultStore(path)


def _filters(args: argparse.Namespace) -> dict[str, str]:
    """The --task / --model / --method filters that were given."""
    return {k: v for k, v in (("task", args.task), ("model", args.model), ("method", args.method)) if v}


def _report_option_conflicts(args: argparse.Namespace) -> str | None:
    """The first given option that the chosen report mode would ignore, as an error message; or None."""
    if args.from_file:
        store_only = [("--best-runs", args.best_runs), ("--all-seeds", args.all_seeds),
                      ("--select val_metric", args.select != "val_loss"), ("--store", args.store),
                      *((f"--{k}", v) for k, v in _filters(args).items())]
        for flag, given in store_only:
            if given:
                return f"{flag} applies to a results store, not to --from (a study file's tables show every cell)"
        return None
    if args.figures:
        return "--figures needs --from <study.jsonl>; for a store, export it first (randmask export)"
    if args.all_seeds and not args.best_runs:
        return "--all-seeds only changes --best-runs; add --best-runs"
    return None


def _cmd_report(args: argparse.Namespace) -> int:
    from randmask_lab.experiment.report import report

    conflict = _report_option_conflicts(args)
    if conflict:
        raise RunError(conflict)
    if args.from_file:  # a committed study file: no store needed
        from randmask_lab.study.cli import report_from

        return report_from(args)
    store, where = open_store(args), _filters(args)
    if args.best_runs:
        from randmask_lab.experiment.report import best_runs, method_label

        for r in best_runs(store.records(**where), args.select, args.all_seeds):
            print("\t".join([r.config["task"], method_label(r.config).replace(" ", "_"), f"{r.config['lr']:g}",
                             r.run_dir or "", str(r.config["seed"])]))
        return 0
    print(report(store, args.select, **where))
    return 0


def _cmd_curves(args: argparse.Namespace) -> int:
    from randmask_lab.analysis.curves import write_curves

    png, curves = write_curves(open_store(args), args.out, **_filters(args))
    for label, points in curves.items():
        print(f"{label}: " + ", ".join(f"{e}: {m:.4f}" for e, m, _ in points if m is not None))
    print(f"wrote {png}")
    return 0


def _cmd_calibrate_lr(args: argparse.Namespace) -> int:
    from randmask_lab.analysis.calibrate_lr import calibration_pairs, calibration_report

    store = open_store(args, made_by="`randmask sweep`")
    print(calibration_report(calibration_pairs(args.folders, store, args.task)))
    return 0


def _cmd_main(args: argparse.Namespace) -> int:
    from randmask_lab.experiment.main_job import run_main_job

    run_main_job(full_protocol=args.full_protocol, out_dir=args.out_dir, data_dir=args.data_dir,
                 threads=args.threads, progress=args.progress, say=_say)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from randmask_lab.methods import METHOD_NAMES
    from randmask_lab.tasks import TASKS
    from randmask_lab.zoo import model_names

    print("tasks:   " + ", ".join(f"{n} ({t.kind}{', head mode' if t.has_head_mode else ''})"
                                  for n, t in TASKS.items()))
    print("methods: " + ", ".join(METHOD_NAMES))
    print("models:  " + ", ".join(model_names()) + ", or a local model folder / Hub id")
    return 0


def _store_options(parser: argparse.ArgumentParser, filters: bool) -> None:
    """--out-dir / --store naming an existing results store, and (``filters``) --task / --model / --method."""
    parser.add_argument("--out-dir", default="runs", help="folder holding results.sqlite (default: runs)")
    parser.add_argument("--store", help="results store file (default: <out-dir>/results.sqlite)")
    if filters:
        parser.add_argument("--task", help="only this task")
        parser.add_argument("--model", help="only this model")
        parser.add_argument("--method", help="only this method")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``randmask`` command."""
    from randmask_lab.experiment.config import RunConfig
    from randmask_lab.experiment.executors import ExecutorConfig
    from randmask_lab.experiment.options import add_dataclass_options
    from randmask_lab.experiment.sweep import SweepConfig

    parser = argparse.ArgumentParser(prog="randmask", description="Random Masking fine-tuning experiments.")
    parser.add_argument("--version", action="version", version=f"randmask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    train = sub.add_parser("train", help="fine-tune one model on one task with one method; report the test metric",
                           description=RunConfig.__doc__)
    add_dataclass_options(train, RunConfig)
    train.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help=argparse.SUPPRESS)
    train.set_defaults(func=_cmd_train)

    sweep = sub.add_parser("sweep", help="run a grid (lr x ratio x seed x method x task), skipping finished runs",
                           description=SweepConfig.__doc__)
    add_dataclass_options(sweep, SweepConfig)
    add_dataclass_options(sweep, RunConfig, skip=("model", "task", "method", "ratio", "density", "lr", "seed",
                                                  "data_seed", "mask_seed", "order_seed"))
    add_dataclass_options(sweep, ExecutorConfig)  # --executor, --cpus-per-run, --gpus-per-run, --ray-address
    sweep.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help=argparse.SUPPRESS)
    sweep.set_defaults(func=_cmd_sweep)

    rep = sub.add_parser("report", help="print the best-LR table per method/budget/task (Markdown)")
    _store_options(rep, filters=True)
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
    rep.set_defaults(func=_cmd_report)

    cur = sub.add_parser("curves", help="plot validation score per epoch of stored runs (longer-training study)")
    _store_options(cur, filters=True)
    cur.add_argument("--out", default="runs/curves.png", help="PNG to write (default: runs/curves.png)")
    cur.set_defaults(func=_cmd_curves)

    cal = sub.add_parser("calibrate-lr", help="fit suggest-lr's Adam factor to the best LRs of a sweep")
    cal.add_argument("folders", nargs="+", help="folders holding suggest_lr.json files (made with --calibration 1)")
    cal.add_argument("--task", required=True, help="the task of the suggestions and the sweep")
    _store_options(cal, filters=False)
    cal.set_defaults(func=_cmd_calibrate_lr)

    main = sub.add_parser("main", help="the default comparison (about 15 min on 2 CPU cores): MiniLM-L6 on SST-2, "
                                       "randmask at 3 budgets vs LoRA vs full fine-tuning")
    main.add_argument("--full-protocol", action="store_true",
                      help="the paper's protocol (1000/500/1000 examples, 5 epochs, 3 seeds): hours on a CPU")
    main.add_argument("--out-dir", default="runs/main", help="where runs and results.sqlite go")
    main.add_argument("--data-dir", help="folder holding glue/SST-2 (default: $RANDMASK_DATA_DIR or ../shared/data)")
    main.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    main.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    main.set_defaults(func=_cmd_main)

    lst = sub.add_parser("list", help="known tasks, methods and models")
    lst.set_defaults(func=_cmd_list)

    for module in ("randmask_lab.theory.cli", "randmask_lab.analysis.cli", "randmask_lab.study.cli"):
        # Their heavy imports happen when a verb runs; a missing package is then a one-line error.
        importlib.import_module(module).register(sub)
    return parser


def _quiet_transformers() -> None:
    """No per-file loading bars or load reports: a run prints its own progress."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # peft 0.21 calls a transformers 5 method that warns of its own deprecation on every LoRA run.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*", category=FutureWarning)


def _one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``randmask`` command; returns the exit code."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    _quiet_transformers()
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        try:
            return int(args.func(args) or 0)
        except ModuleNotFoundError as e:
            package = (e.name or "").split(".")[0]
            if package not in OPTIONAL_PACKAGES:
                raise
            raise MissingPackageError(f"`randmask {args.command}` needs the package {package!r}, which is not "
                                      f"installed: pip install 'randmask[lab]' (or pip install {package})") from e
    except (*USER_ERRORS, OSError) as e:
        # A full disk or a read-only folder is the user's to fix (randmask_lab.fs); any other OSError is internal.
        message = str(e) if isinstance(e, USER_ERRORS) else disk_problem(e)
        if message is None or os.environ.get("RANDMASK_DEBUG"):
            raise
        print(f"randmask {args.command}: error: {_one_line(message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
