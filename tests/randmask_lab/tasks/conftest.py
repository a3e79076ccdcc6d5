"""Shared fixtures: the real data files (../shared/data), each task's pools loaded once."""

from __future__ import annotations

from functools import cache

import pytest

from randmask_lab.tasks import DataNotFoundError, Pools, get_task
from randmask_lab.tasks.paths import candidate_data_dirs


@cache
def _pools(name: str) -> Pools:
    return get_task(name).load()


@pytest.fixture
def pools():
    """`pools(name)` -> the task's loaded original splits (cached for the session)."""
    try:
        _pools("cb")
    except DataNotFoundError as e:  # the shared data is not on this machine
        pytest.skip(f"real data not found: {e}")
    return _pools


@pytest.fixture
def data_root():
    """The shared data directory these tests read (default resolution)."""
    dirs, _ = candidate_data_dirs()
    for d in dirs:
        if (d / "superglue").is_dir():
            return d
    pytest.skip("real data not found")
