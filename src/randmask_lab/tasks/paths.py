"""Where task data lives: data-directory resolution and each task's file layout.

Resolution order: an explicit `data_dir` argument, else the `RANDMASK_DATA_DIR` environment
variable, else `../shared/data` relative to the current directory and to the repository root.
An explicit choice (argument or variable) is used alone: silently falling back to another copy
would hide a wrong path, so a missing file there is an error.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from randmask_lab.errors import DataNotFoundError

ENV_VAR = "RANDMASK_DATA_DIR"
DEFAULT_RELATIVE = Path("..") / "shared" / "data"


@dataclass(frozen=True)
class Layout:
    """A task's files in the original distribution, relative to its folder.

    `train` and `test` list alternatives in order of preference; each alternative is a tuple of
    files that are read and concatenated (SQuAD's dev set comes in two halves). `accept`, if set,
    must approve a file before it is used (GLUE's own test.tsv has no labels, so SST-2 then falls
    back to dev.tsv).
    """

    folder: str
    train: tuple[tuple[str, ...], ...]
    test: tuple[tuple[str, ...], ...]
    accept: Callable[[Path], bool] | None = None
    single_pool: bool = False
    """True: when only one split's files are present, every split may be carved from it (the sampler
    records it). False: a missing split is an error naming its file."""


def repo_root(start: Path | None = None) -> Path | None:
    """The nearest folder at or above `start` (default: this package) holding pyproject.toml."""
    here = (start or Path(__file__)).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    return None


def candidate_data_dirs(data_dir: str | os.PathLike[str] | None = None) -> tuple[list[Path], str]:
    """The data directories to search, in order, and a word on where they came from."""
    if data_dir is not None:
        return [Path(data_dir).expanduser()], "the data_dir argument (--data-dir)"
    env = os.environ.get(ENV_VAR)
    if env:
        return [Path(env).expanduser()], f"the {ENV_VAR} environment variable"
    dirs = [Path.cwd() / DEFAULT_RELATIVE]
    root = repo_root()
    if root is not None:
        dirs.append(root / DEFAULT_RELATIVE)
    unique: list[Path] = []
    for d in dirs:  # cwd may be the repo root: do not list the same folder twice
        if all(d.resolve() != u.resolve() for u in unique):
            unique.append(d)
    return unique, "the defaults (../shared/data from the current directory and the repository root)"


def _first_present(folder: Path, layout: Layout, role: str) -> list[Path] | None:
    for files in getattr(layout, role):
        paths = [folder / f for f in files]
        if all(p.is_file() and (layout.accept is None or layout.accept(p)) for p in paths):
            return paths
    return None


def missing_split(folder: Path, layout: Layout, role: str) -> str:
    """Why ``role``'s files ("train"/"test") are unusable in ``folder``: missing, empty, or rejected."""
    reasons = []
    for files in getattr(layout, role):
        for name in files:
            path = folder / name
            if not path.is_file():
                reasons.append(f"{path} not found")
            elif path.stat().st_size == 0:
                reasons.append(f"{path} is empty")
            elif layout.accept is not None and not layout.accept(path):
                reasons.append(f"{path} has no labels")
    return "; ".join(reasons)


def find_task_files(
    task: str, layout: Layout, data_dir: str | os.PathLike[str] | None = None
) -> tuple[list[Path] | None, list[Path] | None]:
    """Locate `(train_files, test_files)` for a task; either may be None, but not both.

    Raises DataNotFoundError naming every folder searched and how to point elsewhere.
    """
    dirs, why = candidate_data_dirs(data_dir)
    looked: list[Path] = []
    for base in dirs:
        folder = base / layout.folder
        looked.append(folder)
        train, test = _first_present(folder, layout, "train"), _first_present(folder, layout, "test")
        if train or test:
            return train, test
    wanted = " or ".join(", ".join(a) for a in layout.train + layout.test)
    raise DataNotFoundError(
        f"No data files for task {task!r} (expected {wanted}). Looked in (from {why}):\n"
        + "".join(f"  - {p}\n" for p in looked)
        + f"Point elsewhere with data_dir= / --data-dir (the folder holding {layout.folder}/), "
        f"the {ENV_VAR} environment variable, source= (a file or a task folder in the original "
        "format), or source='hf' for the Hugging Face Hub."
    )


def find_in_folder(
    task: str, layout: Layout, folder: Path
) -> tuple[list[Path] | None, list[Path] | None]:
    """Locate a task's files inside a user-given task folder (the files themselves, no subfolder)."""
    train, test = _first_present(folder, layout, "train"), _first_present(folder, layout, "test")
    if train or test:
        return train, test
    wanted = " or ".join(", ".join(a) for a in layout.train + layout.test)
    raise DataNotFoundError(
        f"Folder {folder} has none of the files for task {task!r} (expected {wanted}). "
        "Pass the folder that holds them, or a single file to split three ways."
    )
