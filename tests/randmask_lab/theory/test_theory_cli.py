"""`run_theory` and the `theory` sub-command on a tiny problem."""

import argparse
import json

import pytest

from randmask_lab.theory.cli import FIGURES, register, run_theory

TINY = dict(n=5, d=100, p_values=(0.2, 1.0), seeds=(0, 1), gd_steps=300, noise_draws=20, verbose=False)


def test_run_theory_writes_three_pngs_and_json(tmp_path):
    summary = run_theory(tmp_path, **TINY)
    for name in FIGURES.values():
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "theory_summary.json").read_text())
    assert saved["per_p"].keys() == {"0.2", "1"}
    row = saved["per_p"]["0.2"]
    for key in (
        "eig_ratio",
        "thm51_bound",
        "lr_measured_mean",
        "lr_theory_mean",
        "sq_norm_mc_mean",
        "sq_norm_bound_mean",
    ):
        assert key in row
    assert row["bound_holds_all"] and row["gd_diverged_at_1.1_all"] and row["gd_converged_at_0.9_all"]
    assert summary["per_p"] == saved["per_p"]


def test_run_theory_rejects_bad_p(tmp_path):
    with pytest.raises(ValueError, match=r"p=1\.5"):
        run_theory(tmp_path, **{**TINY, "p_values": (0.5, 1.5)})


def _parser():
    parser = argparse.ArgumentParser(prog="randmask")
    register(parser.add_subparsers(dest="command"))
    return parser


def test_subcommand_runs(tmp_path, capsys):
    args = _parser().parse_args(
        [
            "theory",
            "--out",
            str(tmp_path),
            "--n",
            "5",
            "--d",
            "100",
            "--p-values",
            "0.2",
            "1",
            "--seeds",
            "0",
            "--gd-steps",
            "300",
            "--noise-draws",
            "20",
        ]
    )
    assert args.func(args) == 0
    assert "ratio mean" in capsys.readouterr().out
    assert (tmp_path / "theory_summary.json").exists()


def test_subcommand_rejects_bad_p(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["theory", "--p-values", "0"])
    assert "(0, 1]" in capsys.readouterr().err
