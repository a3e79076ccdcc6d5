"""Study tests run whatever state the developer's checkout is in: the dirty-tree refusal of `randmask study`
(tested on its own in test_run.py) is given a clean code version here."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _committed_code(monkeypatch: pytest.MonkeyPatch) -> None:
    from randmask_lab.study import run

    monkeypatch.setattr(run, "source_version", lambda: {"package": "test", "commit": "0" * 40, "dirty": False})
