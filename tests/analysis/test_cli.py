"""The analysis sub-commands: parsing, and the command logic with an injected tiny model."""

from __future__ import annotations

import argparse
import json
import sys

import pytest
from tests.conftest import tiny_inputs, tiny_model  # tests/conftest.py (tests/ is on sys.path under pytest)

from randmask import MaskingConfig, apply_masking
from randmask.analysis.cli import register, run_distance, run_hessian, run_suggest_lr


@pytest.fixture
def model_and_batches():
    model = apply_masking(tiny_model("opt"), MaskingConfig(density=0.2, seed=0))
    return model, [tiny_inputs("opt", batch=1, seq=8)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="randmask")
    register(parser.add_subparsers(dest="verb", required=True))
    return parser


@pytest.mark.filterwarnings("ignore:power iteration did not reach:RuntimeWarning")
def test_run_hessian_writes_json_and_png(model_and_batches, tmp_path):
    model, batches = model_and_batches
    summary = run_hessian(model, batches, tmp_path, max_iter=3, top_k=2)
    data = json.loads((tmp_path / "hessian.json").read_text())
    assert data["lambda_max"] == summary["lambda_max"] and len(data["trace"]) == data["iterations"] <= 3
    assert len(data["top_k"]) == 2 and data["n_trainable"] > 0
    assert (tmp_path / "power_trace.png").is_file()


def test_run_distance_writes_json(model_and_batches, tmp_path):
    model, _ = model_and_batches
    data = run_distance(model, tmp_path)
    assert json.loads((tmp_path / "distance.json").read_text())["total"] == data["total"] == 0.0
    with pytest.raises(ValueError, match="--reference"):
        run_distance(tiny_model("opt"), tmp_path)


@pytest.mark.filterwarnings("ignore:power iteration did not reach:RuntimeWarning")
def test_run_suggest_lr_writes_json(model_and_batches, tmp_path):
    model, batches = model_and_batches
    run_suggest_lr(model, batches, tmp_path, max_iter=3)
    data = json.loads((tmp_path / "suggest_lr.json").read_text())
    assert data["adam_lr_low"] < data["adam_lr"] < data["adam_lr_high"]


def test_subcommands_parse():
    args = _parser().parse_args(["suggest-lr", "--task", "sst2", "--calibration", "3", "--out", "x"])
    assert args.command == "suggest-lr" and args.calibration == 3.0 and args.task == "sst2"
    assert _parser().parse_args(["hessian", "--top-k", "4"]).top_k == 4
    assert _parser().parse_args(["distance", "--reference", "w.safetensors"]).reference.name == "w.safetensors"


def test_handler_uses_the_experiment_hook(model_and_batches, tmp_path, monkeypatch):
    import types

    hook = types.ModuleType("randmask.experiment")
    hook.build_model_and_batches = lambda args: model_and_batches
    monkeypatch.setitem(sys.modules, "randmask.experiment", hook)
    args = _parser().parse_args(["distance", "--out", str(tmp_path)])
    assert args.func(args) == 0 and (tmp_path / "distance.json").is_file()


def test_missing_experiment_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "randmask.experiment", None)  # import fails like a missing module
    args = _parser().parse_args(["hessian"])
    with pytest.raises(SystemExit, match="build_model_and_batches"):
        args.func(args)
