"""The `randmask` command: bad input ends with exit code 2 and one line; a tiny train + report works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from experiment.tiny import make_tiny_lm

from randmask_lab.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_lm(tmp_path_factory.mktemp("cli_tiny")))


def _fails(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_unknown_names_list_the_known_ones(capsys, tmp_path):
    out = ["--out-dir", str(tmp_path)]
    assert "known tasks: sst2, rte" in _fails(capsys, "train", "--task", "nope", *out)
    assert "known methods: randmask, structured, full" in _fails(capsys, "train", "--method", "nope", *out)
    err = _fails(capsys, "train", "--model", "no-such-model", "--task", "rte", *out)
    assert "unknown model 'no-such-model'" in err and "smollm2-135m" in err and "minilm-l6" in err


def test_missing_data_says_where_it_looked(capsys, tmp_path, tiny):
    err = _fails(capsys, "train", "--model", tiny, "--task", "rte", "--data-dir", str(tmp_path / "none"),
                 "--out-dir", str(tmp_path))
    assert str(tmp_path / "none" / "superglue" / "RTE") in err and "--data-dir" in err
    assert "RANDMASK_DATA_DIR" in err


def test_impossible_budgets_and_targets(capsys, tmp_path, tiny):
    common = ["train", "--model", tiny, "--task", "rte", "--out-dir", str(tmp_path), "--n-train", "4"]
    assert "zero trainable entries" in _fails(capsys, *common, "--ratio", "1e-8")
    assert "matches no module" in _fails(capsys, *common, "--targets", "no_such_proj")
    assert "matches no module" in _fails(capsys, *common, "--method", "lora", "--targets", "no_such_proj")
    assert "--ratio/--density apply to randmask" in _fails(capsys, *common, "--method", "lora", "--ratio", "1e-3")
    assert "has no classification-head mode" in _fails(capsys, *common, "--task", "squad", "--mode", "head")


def test_report_without_a_store(capsys, tmp_path):
    assert "no results store" in _fails(capsys, "report", "--out-dir", str(tmp_path))


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "copa (multiple_choice)" in out and "adalora" in out and "gemma3-270m" in out


def test_train_then_report(capsys, tmp_path, tiny):
    argv = ["--model", tiny, "--task", "rte", "--method", "randmask", "--ratio", "0.02", "--lr", "1e-2",
            "--n-train", "8", "--n-val", "4", "--n-test", "4", "--epochs", "1", "--max-length", "64",
            "--out-dir", str(tmp_path), "--no-progress"]
    assert main(["train", *argv]) == 0
    assert capsys.readouterr().out.startswith("done: rte test accuracy = ")
    assert main(["report", "--out-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| randmask 2e-02 |" in table and "| RTE |" in table
    png = tmp_path / "curves.png"
    assert main(["curves", "--out-dir", str(tmp_path), "--task", "rte", "--out", str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("randmask 2e-02 lr 0.01 s0: 1: 0.") and png.is_file()
    assert "no finished runs" in _fails(capsys, "curves", "--out-dir", str(tmp_path), "--task", "cb")


def test_sweep_runs_the_grid_and_prints_the_table(capsys, tmp_path, tiny):
    argv = ["sweep", "--models", tiny, "--tasks", "rte", "--methods", "bitfit", "randmask", "--ratios", "0.02",
            "--lrs", "1e-3", "1e-2", "--seeds", "0", "--n-train", "8", "--n-val", "4", "--n-test", "4",
            "--epochs", "1", "--max-length", "64", "--out-dir", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("] ") >= 4 and "| bitfit |" in out and "| randmask 2e-02 |" in out
    assert main(["report", "--out-dir", str(tmp_path), "--best-runs"]) == 0
    best = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [b[:2] for b in best] == [["rte", "bitfit"], ["rte", "randmask_2e-02"]]
    assert all(b[2] in ("0.001", "0.01") and (tmp_path / Path(b[3]).name / "config.json").is_file() for b in best)
    assert all(b[4] == "0" for b in best)  # the seed column
    # calibrate-lr pairs a suggestion (made at factor 1) with the cell of the same task, method and budget.
    chosen = float(best[1][2])
    for name, ratio in (("match", 0.02), ("other", 0.5)):
        (tmp_path / "suggest" / name).mkdir(parents=True)
        (tmp_path / "suggest" / name / "suggest_lr.json").write_text(json.dumps(
            {"adam_lr": 4e-3, "calibration": 2.0, "lambda_max": 1.5,
             "run": {"task": "rte", "method": "randmask", "ratio": ratio}}))
    assert main(["calibrate-lr", str(tmp_path / "suggest"), "--task", "rte", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"| randmask 2e-02 | 1.5 | 0.002 | {chosen:g} | {chosen / 2e-3:.3g} |" in out and "5e-01" not in out
    assert f"factor (geometric mean of best / suggested): {chosen / 2e-3:.3g}; spread: x1 " in out
    assert main(argv) == 0  # resumed: everything skipped
    assert capsys.readouterr().out.count("skip (finished)") == 4
    # Under torchrun every rank runs the grid; only rank 0 prints (here: a finished grid, seen from rank 1).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RANK", "1")
        assert main(argv) == 0
    assert capsys.readouterr().out == ""


def test_a_verb_whose_package_is_missing_names_it(capsys, tmp_path, monkeypatch):
    """`randmask theory` without matplotlib: one line naming the package and the extra, exit 2."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.delitem(sys.modules, "randmask_lab.theory.plots", raising=False)
    err = _fails(capsys, "theory", "--out", str(tmp_path), "--n", "4", "--d", "16", "--p-values", "0.5",
                 "--seeds", "0", "--gd-steps", "10", "--noise-draws", "2")
    assert "'matplotlib'" in err and "randmask[lab]" in err


def test_every_verb_is_registered():
    from randmask_lab.cli import build_parser

    verbs = set(build_parser()._subparsers._group_actions[0].choices)
    assert {"train", "sweep", "report", "main", "list", "theory", "hessian", "distance", "suggest-lr", "figure4",
            "curves", "calibrate-lr"} <= verbs


def test_only_the_known_dependency_noise_is_quieted(caplog):
    import logging

    from randmask_lab.cli import main

    assert main(["list"]) == 0 and main(["list"]) == 0  # twice: the filters are added once
    torchao, pytree = logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")
    bnb_cpu = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(torchao.filters) == 1 and len(pytree.filters) == 1 and len(bnb_cpu.filters) == 1
    caplog.clear()
    torchao.warning("Failed to load /venv/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load")
    torchao.warning("Failed to load /venv/torchao/_C_cutlass_90a.abi3.so: Could not load this library")
    pytree.warning("<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile")
    torchao.warning("Failed to load /venv/torchao/_C_int4.so: Could not load")  # a kernel it might use: shown
    pytree.warning("some other pytree warning")
    bnb_cpu.warning("Failed to load CPU gemm_4bit_forward from kernels-community: Kernel repository could not verify "
                    "publisher trust status. Please make sure you already `pip install kernels`")
    bnb_cpu.warning("another bitsandbytes CPU warning")
    err = caplog.text
    assert "mxfp8" not in err and "cutlass" not in err and "KernelPreference" not in err and "gemm_4bit" not in err
    assert "_C_int4.so" in err and "some other pytree warning" in err and "another bitsandbytes" in err
