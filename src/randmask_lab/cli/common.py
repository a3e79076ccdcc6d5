"""What the verbs share: who prints under torchrun, the results store a verb reads, the store options."""

from __future__ import annotations

import argparse
import os

from randmask_lab.errors import RunError, StoreError
from randmask_lab.experiment.results.store import ResultStore, store_file
from randmask_lab.experiment.run.config import LEGACY_DTYPES


def reports() -> bool:
    """True on the process that prints: rank 0 under torchrun / accelerate launch, or a lone process."""
    return int(os.environ.get("RANK", "0")) == 0


def say(text: str) -> None:
    """Print ``text`` on the process that reports (see ``reports``)."""
    if reports():
        print(text)


def no_dtype(args: argparse.Namespace) -> None:
    """--dtype was removed: a one-line error naming its --precision equivalent."""
    if getattr(args, "dtype", None):
        raise RunError(f"--dtype was replaced by --precision: use --precision {LEGACY_DTYPES[args.dtype]} "
                       "(float32 -> 32, bfloat16 -> bf16-true, float16 -> 16-mixed)")


def open_store(args: argparse.Namespace, made_by: str = "`randmask train`/`sweep`") -> ResultStore:
    """The existing results store named by --store / --out-dir (StoreError when there is none)."""
    path = store_file(args.store, args.out_dir)
    if not path.is_file():
        raise StoreError(f"no results store at {path}; run {made_by} first or pass --store")
    return ResultStore(path)


def filters(args: argparse.Namespace) -> dict[str, str]:
    """The --task / --model / --method filters that were given."""
    return {k: v for k, v in (("task", args.task), ("model", args.model), ("method", args.method)) if v}


def store_options(parser: argparse.ArgumentParser, with_filters: bool) -> None:
    """--out-dir / --store naming an existing results store, and (``with_filters``) --task / --model / --method."""
    parser.add_argument("--out-dir", default="runs", help="folder holding results.sqlite (default: runs)")
    parser.add_argument("--store", help="results store file (default: <out-dir>/results.sqlite)")
    if with_filters:
        parser.add_argument("--task", help="only this task")
        parser.add_argument("--model", help="only this model")
        parser.add_argument("--method", help="only this method")
