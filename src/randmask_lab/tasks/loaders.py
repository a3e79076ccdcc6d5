"""Load a task's original splits (`Pools`) from the data directory, a user path, or the Hub."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from randmask_lab.errors import DataError, DataFormatError, DataNotFoundError

from .hub import HUB_PREFIX, HubUnavailableError, is_hub_source, load_hub_pools
from .paths import Layout, find_in_folder, find_task_files, missing_split
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


@dataclass(frozen=True)
class DataFiles:
    """Where a task's data comes from, before anything is read: local files, or a Hub dataset.

    `train` / `test` are the files of each original split (None: that split is absent and the
    one present is carved three ways); `hub` is the Hub source ("hf[:<id>]") when the data comes
    from there.
    """

    train: tuple[Path, ...] | None = None
    test: tuple[Path, ...] | None = None
    hub: str | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        """Every local file read, train first."""
        return (*(self.train or ()), *(self.test or ()))


def resolve_files(task: str, layout: Layout, data_dir: Source = None, source: Source = None) -> DataFiles:
    """The files (or Hub source) `load_pools` reads for these arguments.

    A split the protocol needs that is missing is a DataNotFoundError naming the file (and
    saying "empty" / "has no labels" where a file is there but unusable), unless the layout
    allows carving every split from the one present (`Layout.single_pool`: BoolQ's and DROP's
    copies here) or the user passed a single file as `source`.
    """
    if is_hub_source(source):
        return DataFiles(hub=str(source))
    if source is not None:
        path = Path(source).expanduser()
        if path.is_file():
            return DataFiles(train=(path,))
        if not path.is_dir():
            raise DataNotFoundError(
                f"source {str(path)!r} for task {task!r} is neither a file nor a folder. Give a "
                f"file or folder in the original format, or '{HUB_PREFIX}' / '{HUB_PREFIX}:<dataset id>' "
                "for the Hugging Face Hub."
            )
        train, test = find_in_folder(task, layout, path)
        folder = path
    else:
        try:
            train, test = find_task_files(task, layout, data_dir)
        except DataNotFoundError:
            if data_dir is not None:  # an explicit folder that lacks the files is the user's error
                raise
            return DataFiles(hub=HUB_PREFIX)  # no local copy at all: the task's default Hub dataset
        folder = (train or test or [Path(".")])[0].parent
    if not layout.single_pool:
        for role, found in (("train", train), ("test", test)):
            if not found:
                raise DataNotFoundError(
                    f"task {task!r} needs its original {'train' if role == 'train' else 'validation'} split: "
                    f"{missing_split(folder, layout, role)}. Restore the file (or point --data-dir / --source at "
                    "a complete copy)."
                )
    return DataFiles(tuple(train) if train else None, tuple(test) if test else None)


def load_pools(
    task: str,
    layout: Layout,
    reader: Reader,
    data_dir: Source = None,
    source: Source = None,
) -> Pools:
    """The task's original train and test sources, before protocol sampling.

    `source` overrides `data_dir`: "hf" / "hf:<id>[:<config>]" loads from the Hub; a folder is
    searched for the task's usual file names; a single file is one pool that the sampler splits
    three ways. Without `source`, the task's files are looked up under the data directory (see
    paths.py for the search order), and the task's default Hub dataset is used when there is no
    local copy at all. A file that holds no examples is a DataError naming it.
    """
    where = resolve_files(task, layout, data_dir, source)
    if where.hub is not None:
        if source is None:
            return _hub_fallback(task, layout, data_dir)
        return load_hub_pools(task, where.hub)
    train = _read_pool(reader, where.train, task) if where.train else None
    test = _read_pool(reader, where.test, task) if where.test else None
    # Files found under the data root are named relative to it (a record then reads the same on every machine);
    # a user's own --source keeps the path it was given.
    folder = layout.folder if source is None else None
    origin = ", ".join(_name(p, folder) for p in where.files)
    if train is not None and test is not None:
        return Pools(train, test, origin=origin, train_origin=_names(where.train, folder),
                     test_origin=_names(where.test, folder))
    # Only one original split exists (BoolQ's validation file, DROP's train file): carve all from it.
    only = where.train or where.test or ()
    return Pools(train if train is not None else test or [], None, origin=origin, train_origin=_names(only, folder))


def _name(path: Path, layout_folder: str | None) -> str:
    """``path`` relative to the data root that holds ``layout_folder`` (e.g. ``glue/SST-2/train.tsv``), else as is."""
    if layout_folder is None:
        return str(path)
    parts, folder = Path(path).parts, Path(layout_folder).parts
    for start in range(len(parts) - len(folder), -1, -1):
        if parts[start:start + len(folder)] == folder:
            return "/".join(parts[start:])
    return str(path)


def _names(paths: Sequence[Path] | None, layout_folder: str | None = None) -> str:
    return " + ".join(_name(p, layout_folder) for p in paths or ())


def _read_pool(reader: Reader, paths: Sequence[Path], task: str) -> list[Example]:
    """Read one split's files; a file without a single example is a DataError naming it."""
    out = []
    for path in paths:
        rows = read_file(reader, path, task)
        if not rows:
            raise DataError(f"{path} holds no {task} examples (the file is empty or has only a header); restore "
                            "the original file")
        out += rows
    return out


def _hub_fallback(task: str, layout: Layout, data_dir: Source) -> Pools:
    """No local copy of the task's files: load the task's default Hub dataset through the same
    converters, or fail naming both fixes (local files, or `datasets` plus a network)."""
    logger.warning("no local files for task %r; loading its default Hugging Face Hub dataset", task)
    try:
        return load_hub_pools(task, HUB_PREFIX)
    except HubUnavailableError as hub:
        try:
            find_task_files(task, layout, data_dir)
        except DataNotFoundError as missing:
            raise DataNotFoundError(f"{missing} The Hub fallback failed too: {hub}") from None
        raise
