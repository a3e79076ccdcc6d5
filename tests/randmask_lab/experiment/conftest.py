"""Fixtures of the runner tests: tiny model folders (see tiny.py) and options for seconds-long runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from .tiny import make_tiny_bert, make_tiny_lm


@pytest.fixture(autouse=True)
def _quiet_transformers() -> None:
    import transformers as tf

    tf.logging.set_verbosity_error()


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_lm(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_bert(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture
def run_kwargs(tmp_path: Path) -> dict:
    """RunConfig options for a seconds-long run on real RTE data."""
    return dict(task="rte", n_train=12, n_val=6, n_test=6, epochs=2, batch_size=4, max_length=96,
                out_dir=str(tmp_path / "runs"), progress=False, eval_batch_size=8, threads=1)
