"""config_path's count: stops, modules, and returns to a module the path had already left."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import config_path  # noqa: E402


def test_summary_counts_returns_to_a_module_already_left():
    stops = [("a", "f"), ("a", "g"), ("b", "h"), ("a", "i"), ("c", "j"), ("b", "k"), ("b", "l")]
    result = config_path.summary(stops)
    assert result["stops"] == 7 and result["modules"] == 3
    assert result["returns"] == 2  # a -> b -> a (back to a), then c -> b (back to b)
    assert result["visits"] == {"a": 2, "b": 2, "c": 1}


def test_module_names_come_from_the_source_tree():
    src = config_path.SRC
    train = src / "randmask_lab" / "experiment" / "training" / "train.py"
    assert config_path._module_of(str(train)) == "randmask_lab.experiment.training.train"
    assert config_path._module_of(str(src / "randmask_lab" / "cli" / "__init__.py")) == "randmask_lab.cli"
    assert config_path._module_of("/usr/lib/python3/json/__init__.py") is None
