"""Shared fixtures of the methods tests."""

from pathlib import Path

import pytest
import transformers as tf


@pytest.fixture(autouse=True)
def _quiet_transformers() -> None:
    tf.logging.set_verbosity_error()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Silence peft's use of a transformers API deprecated for v6 (noise, not a signal)."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning"))
