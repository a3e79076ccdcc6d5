"""Every user error of `randmask train/sweep/report` is one line with exit code 2 (the issue-9 probes)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch
from experiment.tiny import make_tiny_lm
from tests.conftest import REPO_ROOT

from randmask_lab.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_lm(tmp_path_factory.mktemp("cli_errors_tiny")))


def _fails(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _small(tiny: str, tmp_path: Path) -> list[str]:
    return ["--model", tiny, "--task", "rte", "--out-dir", str(tmp_path / "runs"), "--n-train", "8", "--n-val", "4",
            "--n-test", "4", "--epochs", "1", "--batch-size", "4", "--max-length", "96", "--no-progress"]


@pytest.mark.parametrize(("options", "message"), [
    (["--n-train", "-5"], "--n-train must be >= 1, got -5"),
    (["--n-val", "0"], "--n-val must be >= 1"),
    (["--head-lr", "-1"], "--head-lr must be > 0"),
    (["--warmup-steps", "-5"], "--warmup-steps must be >= 0"),
    (["--adam-betas", "2", "2"], "--adam-betas must be two numbers in [0, 1)"),
    (["--adam-eps", "-1"], "--adam-eps must be > 0"),
    (["--lr", "nan"], "--lr must be > 0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--lease-seconds", "0"], "--lease-seconds must be > 0"),
    (["--method", "lora", "--option", "r=abc"], "option r='abc' of 'lora' must be a int"),
    (["--method", "lora", "--option", "dropout=-1"], "option dropout=-1.0 of 'lora' must be >= 0"),
    (["--method", "lora", "--option", "rank=8"], "unknown option(s) ['rank']"),
    (["--device", "bogus"], "--device 'bogus' is not a device name"),
    (["--dtype", "float16"], "--dtype was replaced by --precision: use --precision 16-mixed"),
])
def test_bad_options(capsys, tmp_path, tiny, options, message):
    assert message in _fails(capsys, "train", *_small(tiny, tmp_path), *options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(capsys, tmp_path, tiny):
    assert "no CUDA GPU is available" in _fails(capsys, "train", *_small(tiny, tmp_path), "--device", "cuda")


def test_invalid_utf8_in_a_data_file(capsys, tmp_path, tiny):
    bad = tmp_path / "rte.jsonl"
    bad.write_bytes(b'{"premise": "p", "hypothesis": "h", "label": "entailment", "idx": 0}\n{"premise": "\xff"}\n')
    assert "rte.jsonl:2: not UTF-8" in _fails(capsys, "train", *_small(tiny, tmp_path), "--source", str(bad))


def test_an_empty_train_split_is_an_error(capsys, tmp_path, tiny):
    folder = tmp_path / "data" / "glue" / "SST-2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("")
    (folder / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    err = _fails(capsys, "train", *_small(tiny, tmp_path), "--task", "sst2", "--data-dir", str(tmp_path / "data"))
    assert "train.tsv is empty" in err


def test_a_damaged_checkpoint_names_the_fix(capsys, tmp_path, tiny):
    args = ["train", *_small(tiny, tmp_path), "--max-steps", "1"]
    assert main(args) == 0
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    (run_dir / "checkpoint").mkdir()
    (run_dir / "checkpoint" / "state.json").write_text('{"run_id": "x", "fi')  # truncated by a crash
    args[args.index("--max-steps") + 1] = "1"
    assert main([*args, "--restart"]) == 0  # --restart discards it (and the finished record)
    capsys.readouterr()
    (run_dir / "checkpoint").mkdir()
    (run_dir / "checkpoint" / "state.json").write_text('{"run_id": "x", "fi')
    from randmask_lab.experiment.results.store import ResultStore

    ResultStore(tmp_path / "runs" / "results.sqlite").delete(run_dir.name)  # the run is unfinished again
    err = _fails(capsys, *args)
    assert "checkpoint" in err and "is damaged" in err and "--restart" in err


def test_a_corrupt_or_foreign_store_names_the_file(capsys, tmp_path, tiny):
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    err = _fails(capsys, "report", "--store", str(garbage))
    assert str(garbage) in err and "damaged or not a SQLite file" in err
    assert str(garbage) in _fails(capsys, "train", *_small(tiny, tmp_path), "--store", str(garbage))
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE customers (name TEXT)")
    assert "not a randmask results store" in _fails(capsys, "report", "--store", str(foreign))


@pytest.mark.parametrize(("options", "message"), [
    (["--all-seeds"], "--all-seeds only changes --best-runs; add --best-runs"),
    (["--figures", "figs"], "--figures needs --from"),
    (["--from", "s.jsonl", "--best-runs"], "--best-runs applies to a results store, not to --from"),
    (["--from", "s.jsonl", "--task", "rte"], "--task applies to a results store"),
    (["--from", "s.jsonl", "--select", "val_metric"], "--select val_metric applies to a results store"),
])
def test_report_options_that_would_be_ignored(capsys, tmp_path, options, message):
    """An option the chosen report mode ignores is an error, checked before any file is read."""
    assert message in _fails(capsys, "report", "--out-dir", str(tmp_path), *options)


def test_study_power_from_without_plan_is_refused(capsys, tmp_path):
    """Found by a hostile pass: it was silently ignored and the study ran."""
    spec = str(REPO_ROOT / "experiments" / "smollm2_confirm.json")
    assert "--power-from is read by --plan only" in _fails(
        capsys, "study", spec, "--out-dir", str(tmp_path), "--power-from", "x.jsonl")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("options", "message"), [
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr", "1e308"], "--lr must be at most 10"),
    (["--seed", str(10**23)], "--seed must be at most 2**63 - 1"),
    (["--lease-seconds", "0.05"], "--lease-seconds must be between 1 and 604800"),
    (["--lease-seconds", "inf"], "--lease-seconds must be a finite number"),
])
def test_careless_numbers_are_refused_before_the_run(capsys, tmp_path, tiny, options, message):
    """Issue 28: they used to run (--lr inf recorded as diverged), overflow in torch, or crash the lease thread."""
    assert message in _fails(capsys, "train", *_small(tiny, tmp_path), *options)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("options", "message"), [
    (["--method", "lora", "--option", "r=100000000"], "option r=100000000 of 'lora' must be between 1 and 16"),
    (["--method", "adalora", "--option", "init_r=100000"], "option init_r=100000 of 'adalora' must be between 1"),
    (["--method", "adalora", "--option", "init_r=8", "--option", "target_r=12"], "target_r=12 of 'adalora'"),
    (["--method", "adapter", "--option", "width=10000000"], "option width=10000000 of 'adapter' must be between"),
    (["--method", "prefix", "--option", "num_virtual_tokens=100000000"], "num_virtual_tokens=100000000 of 'prefix'"),
])
def test_size_options_are_bounded_by_the_model(capsys, tmp_path, tiny, options, message):
    """Issue 28: --option r=100000000 attempted a 153 GB allocation on SmolLM2."""
    assert message in _fails(capsys, "train", *_small(tiny, tmp_path), *options)


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """`randmask report --from ... | head` used to end in a BrokenPipeError traceback."""
    import subprocess
    import sys

    study = Path(__file__).resolve().parents[2] / "experiments" / "results" / "smollm2_study.jsonl"
    child = subprocess.Popen([sys.executable, "-m", "randmask_lab.cli", "report", "--from", str(study)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # before the command prints: its first write finds no reader
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 141 and "Traceback" not in err and "Exception ignored" not in err, err
