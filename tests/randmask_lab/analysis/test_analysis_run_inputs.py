"""What the analysis commands measure when given a run or adapter folder: its own config, its training examples,
finite weights; and the one-line errors of the commands (hessian, distance, suggest-lr, activations)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.conftest import tiny_model  # tests/conftest.py (tests/ is on sys.path under pytest)
from tests.randmask_lab.experiment.tiny import make_tiny_lm

from randmask import MaskingConfig, apply_masking, masked_layers
from randmask_lab.analysis.cli import register
from randmask_lab.analysis.runs import run_distance
from randmask_lab.errors import RunError
from randmask_lab.experiment import RunConfig, build_model_and_batches, describe_analysis_run, run_training


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, Path]:
    """(tiny model folder, the folder of a seconds-long randmask run on RTE: 12 training, 6 validation examples)."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    tiny = str(make_tiny_lm(tmp_path_factory.mktemp("tiny_llama")))
    out = tmp_path_factory.mktemp("runs")
    record = run_training(RunConfig(model=tiny, task="rte", method="randmask", trainable_ratio=0.02, lr=1e-2,
                                    n_train=12, n_val=6, n_test=6, epochs=1, batch_size=4, max_length=96,
                                    out_dir=str(out), progress=False, eval_batch_size=8, threads=1))
    return tiny, Path(record.run_dir)


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="randmask")
    register(parser.add_subparsers(dest="verb", required=True))
    return parser.parse_args([str(a) for a in argv])


@pytest.mark.parametrize(("option", "value", "recorded"), [
    ("--task", "sst2", "'rte'"), ("--method", "lora", "'randmask'"), ("--trainable-ratio", "0.5", "0.02"),
    ("--seed", "7", "0"), ("--model", "smollm2-135m", "tiny_llama")])
def test_options_that_contradict_the_run_folder_are_refused(trained, option, value, recorded):
    """Bug: the run's config.json silently overrode them, measuring (and recording) something else."""
    _, run = trained
    with pytest.raises(RunError, match=f"{option} {value} contradicts --adapter .* which has .*{recorded}"):
        describe_analysis_run(_parse("hessian", "--adapter", run, option, value))


def test_options_equal_to_the_run_folders_or_absent_are_fine(trained):
    tiny, run = trained
    same = describe_analysis_run(_parse("hessian", "--adapter", run, "--model", tiny, "--task", "rte", "--method",
                                        "randmask", "--trainable-ratio", "0.02", "--seed", "0"))
    assert same == describe_analysis_run(_parse("hessian", "--adapter", run))
    assert (same["task"], same["method"], same["ratio"], same["seed"]) == ("rte", "randmask", 0.02, 0)


def test_a_bare_adapter_folder_is_described_by_its_own_config(trained, tmp_path):
    """Bug: the record took the CLI defaults (ratio 0.001) or --method full for an adapter trained at 0.02."""
    tiny, run = trained
    shutil.copytree(run / "adapter", tmp_path / "alone")  # as randmask.save_adapter writes it
    base = ("hessian", "--adapter", tmp_path / "alone", "--model", tiny, "--task", "rte")
    meta = describe_analysis_run(_parse(*base))
    assert (meta["method"], meta["ratio"], meta["density"], meta["seed"]) == ("randmask", 0.02, None, 0)
    with pytest.raises(RunError, match="--method full contradicts .* which has method 'randmask'"):
        describe_analysis_run(_parse(*base, "--method", "full"))
    with pytest.raises(RunError, match="--trainable-ratio 0.001 contradicts .* which has trainable_ratio 0.02"):
        describe_analysis_run(_parse(*base, "--trainable-ratio", "0.001"))


def test_the_batches_are_the_runs_training_examples_only(trained):
    """Bug: n_train = num_batches x batch_size re-drew the split, so 16 examples took in the run's validation ones;
    now the batches come from the run's 12 training examples, and asking for more is refused."""
    _, run = trained
    model, batches, _ = build_model_and_batches(_parse("hessian", "--adapter", run, "--num-batches", "3",
                                                       "--batch-size", "4"))
    assert [len(b) for b in batches] == [4, 4, 4]
    with pytest.raises(RunError, match=r"= 16 examples, but the run has 12 training examples; ask for at most 12"):
        build_model_and_batches(_parse("hessian", "--adapter", run, "--num-batches", "4", "--batch-size", "4"))


def test_a_run_with_non_finite_weights_is_refused_naming_the_file(trained, tmp_path):
    """Bug: an inf in trainable.safetensors gave a FloatingPointError traceback (hessian), "Infinity" in
    distance.json, nan tables (activations)."""
    _, run = trained
    shutil.copytree(run, tmp_path / "run")
    file = tmp_path / "run" / "trainable" / "trainable.safetensors"
    tensors = load_file(str(file))
    next(iter(tensors.values()))[0] = float("inf")
    save_file(tensors, str(file))
    with pytest.raises(RunError, match=r"trainable.safetensors holds non-finite values .*retrain it"):
        build_model_and_batches(_parse("distance", "--adapter", tmp_path / "run"))


def test_distance_json_stays_strict_json(tmp_path):
    """Bug: a non-finite distance was written as "total": Infinity, which no strict reader accepts."""
    model = apply_masking(tiny_model("opt"), MaskingConfig(density=0.2, seed=0))
    with torch.no_grad():
        next(iter(masked_layers(model).values())).adapters["default"].values[0] = float("inf")
    with pytest.raises(ValueError, match="distance.json would hold non-finite numbers"):
        run_distance(model, tmp_path)
    assert not (tmp_path / "distance.json").exists()


@pytest.mark.parametrize("command", ["hessian", "suggest-lr"])
def test_zeroshot_has_nothing_to_measure(trained, tmp_path, command):
    """Bug: a ValueError traceback ("has no trainable parameters")."""
    tiny, _ = trained
    args = _parse(command, "--model", tiny, "--task", "rte", "--method", "zeroshot", "--num-batches", "1",
                  "--batch-size", "2", "--out", tmp_path)
    with pytest.raises(RunError, match="--method zeroshot trains no parameters, so there is nothing to measure"):
        args.func(args)


@pytest.mark.parametrize("command", ["hessian", "suggest-lr"])
def test_measuring_errors_are_one_line_run_errors(tmp_path, monkeypatch, command):
    """Bug: the handlers caught nothing, so the measuring code's ValueErrors were tracebacks."""
    model = apply_masking(tiny_model("opt"), MaskingConfig(density=0.2, seed=0))
    hook = types.ModuleType("randmask_lab.experiment")
    hook.build_model_and_batches = lambda args: (model, [], None)  # no batches: a ValueError in the HVP
    hook.describe_analysis_run = lambda args: {"method": "randmask"}
    monkeypatch.setitem(sys.modules, "randmask_lab.experiment", hook)
    args = _parse(command, "--out", tmp_path)
    with pytest.raises(RunError, match=f"{command}: no batches"):
        args.func(args)


def test_distance_takes_no_batch_options(capsys):
    """distance reads no batches: --num-batches / --batch-size would be accepted and ignored."""
    with pytest.raises(SystemExit):
        _parse("distance", "--num-batches", "3")
    assert "unrecognized arguments: --num-batches 3" in capsys.readouterr().err
    assert json.dumps(vars(_parse("distance")), default=str)  # its built-in one-example batch
