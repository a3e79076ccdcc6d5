"""Load a task's original splits (`Pools`) from the data directory, a user path, or the Hub."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from randmask_lab.errors import DataFormatError, DataNotFoundError

from .hub import HUB_PREFIX, HubUnavailableError, is_hub_source, load_hub_pools
from .paths import Layout, find_in_folder, find_task_files
from .types import Example, Pools

logger = logging.getLogger("randmask_lab")

Reader = Callable[[Path], list[Example]]
Source = str | os.PathLike[str] | None


def read_file(reader: Reader, path: Path, task: str = "") -> list[Example]:
    """Parse one file; a structural mismatch becomes a DataFormatError naming the file."""
    try:
        return reader(path)
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        # Readers index nested JSON directly; any of these means the file has another layout.
        raise DataFormatError(
            f"{path} is not in the original {task or 'task'} format ({type(e).__name__}: {e})"
        ) from e
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path} is not UTF-8 text: {e}") from e


def read_files(reader: Reader, paths: Sequence[Path], task: str = "") -> list[Example]:
    """Read and concatenate files of one format (e.g. SQuAD's two dev halves)."""
    return [ex for p in paths for ex in read_file(reader, p, task)]


def load_pools(
    task: str,
    layout: Layout,
    reader: Reader,
    data_dir: Source = None,
    source: Source = None,
) -> Pools:
    """The task's original train and test sources, before protocol sampling.

    `source` overrides `data_dir`: "hf" / "hf:<id>[:<config>]" loads from the Hub; a folder is
    searched for the task's usual file names (train + validation, or only one of them); a single
    file is one pool that the sampler splits three ways. Without `source`, the task's files are
    looked up under the data directory (see paths.py for the search order).
    """
    if is_hub_source(source):
        return load_hub_pools(task, str(source))
    if source is not None:
        path = Path(source).expanduser()
        if path.is_file():
            return Pools(read_file(reader, path, task), None, origin=str(path))
        if not path.is_dir():
            raise DataNotFoundError(
                f"source {str(path)!r} for task {task!r} is neither a file nor a folder. Give a "
                f"file or folder in the original format, or '{HUB_PREFIX}' / '{HUB_PREFIX}:<dataset id>' "
                "for the Hugging Face Hub."
            )
        train, test = find_in_folder(task, layout, path)
    else:
        try:
            train, test = find_task_files(task, layout, data_dir)
        except DataNotFoundError as missing:
            if data_dir is not None:  # an explicit folder that lacks the files is the user's error
                raise
            return _hub_fallback(task, missing)
    origin = ", ".join(str(p) for p in (train or []) + (test or []))
    if train and test:
        return Pools(read_files(reader, train, task), read_files(reader, test, task), origin=origin)
    # Only one original split exists (BoolQ's validation file, DROP's train file): carve all from it.
    only = train or test or []  # find_* raise when neither exists
    return Pools(read_files(reader, only, task), None, origin=origin)


def _hub_fallback(task: str, missing: DataNotFoundError) -> Pools:
    """No local copy of the task's files: load the task's default Hub dataset through the same
    converters, or fail naming both fixes (local files, or `datasets` plus a network)."""
    logger.warning("no local files for task %r; loading its default Hugging Face Hub dataset", task)
    try:
        return load_hub_pools(task, HUB_PREFIX)
    except HubUnavailableError as hub:
        raise DataNotFoundError(
            f"{missing} The Hub fallback failed too: {hub}"
        ) from None
