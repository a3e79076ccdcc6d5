"""The verbs that run training: ``randmask train``, ``randmask sweep``, ``randmask main``."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone

from randmask_lab.cli.common import no_dtype, reports, say
from randmask_lab.experiment.results.report import report_tables
from randmask_lab.experiment.run.config import RunConfig
from randmask_lab.experiment.run.options import add_dataclass_options, dataclass_from_args
from randmask_lab.experiment.sweeps.executors import ExecutorConfig, run_grid
from randmask_lab.experiment.sweeps.main_job import run_main_job
from randmask_lab.experiment.sweeps.sweep import SweepConfig
from randmask_lab.experiment.training.train import run_training

LEGACY_DTYPE_CHOICES = ["float32", "bfloat16", "float16"]


def _cmd_train(args: argparse.Namespace) -> int:
    no_dtype(args)
    config = dataclass_from_args(RunConfig, args)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record = run_training(config)
    if not reports():
        return 0
    if record.created < started:
        print(f"(finished earlier, on {record.created}: shown from the results store; --restart runs it again)")
    metric = "n/a" if record.test_metric is None else f"{100 * record.test_metric:.2f}"
    print(f"{record.status}: {config.task} test {record.metric} = {metric} (best epoch {record.best_epoch} "
          f"by {config.select_by}); {record.trainable:,} trainable of {record.total:,}; "
          f"{record.wall_seconds:.0f} s; run folder {record.run_dir}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    no_dtype(args)
    sweep = dataclass_from_args(SweepConfig, args)
    base = dataclass_from_args(RunConfig, args)
    records = run_grid(dataclass_from_args(ExecutorConfig, args), sweep, base, say=say)  # --executor local / ray
    say(report_tables(records, base.select_by))
    failed = sum(r.status == "failed" for r in records)
    if failed and reports():
        print(f"{failed} run(s) failed; run the same command again to retry them.", file=sys.stderr)
    return 1 if failed else 0


def _cmd_main(args: argparse.Namespace) -> int:
    run_main_job(full_protocol=args.full_protocol, out_dir=args.out_dir, data_dir=args.data_dir,
                 threads=args.threads, progress=args.progress, say=say)
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    """``randmask train``: one run, every RunConfig field an option."""
    train = sub.add_parser("train", help="fine-tune one model on one task with one method; report the test metric",
                           description=RunConfig.__doc__)
    add_dataclass_options(train, RunConfig)
    train.add_argument("--dtype", choices=LEGACY_DTYPE_CHOICES, help=argparse.SUPPRESS)
    train.set_defaults(func=_cmd_train)


def add_sweep(sub: argparse._SubParsersAction) -> None:
    """``randmask sweep``: a grid of runs, on the local or the Ray executor."""
    sweep = sub.add_parser("sweep", help="run a grid (lr x ratio x seed x method x task), skipping finished runs",
                           description=SweepConfig.__doc__)
    add_dataclass_options(sweep, SweepConfig)
    add_dataclass_options(sweep, RunConfig, skip=("model", "task", "method", "trainable_ratio", "density", "lr", "seed",
                                                  "data_seed", "mask_seed", "order_seed"))
    add_dataclass_options(sweep, ExecutorConfig)  # --executor, --cpus-per-run, --gpus-per-run, --ray-address
    sweep.add_argument("--dtype", choices=LEGACY_DTYPE_CHOICES, help=argparse.SUPPRESS)
    sweep.set_defaults(func=_cmd_sweep)


def add_main(sub: argparse._SubParsersAction) -> None:
    """``randmask main``: the default comparison."""
    main = sub.add_parser("main", help="the default comparison (about 15 min on 2 CPU cores): MiniLM-L6 on SST-2, "
                                       "randmask at 3 budgets vs LoRA vs full fine-tuning")
    main.add_argument("--full-protocol", action="store_true",
                      help="the paper's protocol (1000/500/1000 examples, 5 epochs, 3 seeds): hours on a CPU")
    main.add_argument("--out-dir", default="runs/main", help="where runs and results.sqlite go")
    main.add_argument("--data-dir", help="folder holding glue/SST-2 (default: $RANDMASK_DATA_DIR or ../shared/data)")
    main.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    main.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    main.set_defaults(func=_cmd_main)
