"""`run_theory` and the `theory` sub-command on a tiny problem."""

import argparse
import json
import re

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


@pytest.mark.parametrize("options, message", [
    (["--sigma", "-1"], "sigma must be >= 0"),
    (["--sigma", "nan"], "sigma must be >= 0"),
    (["--sigma", "inf"], r"sigma must be finite and at most 1e\+100 .*got sigma=inf; use a smaller sigma"),
    (["--sigma", "1e200"], r"sigma must be finite and at most 1e\+100 .*got sigma=1e\+200; use a smaller sigma"),
    (["--delta", "1"], r"delta must be in \(0, 1\)"),
    (["--n", "60"], "fewer than 2n=120"),
    (["--seeds", "-1"], "must be an integer ≥ 0, got -1"),
])
def test_impossible_settings_are_one_line_errors_before_any_work(tmp_path, capsys, options, message):
    from randmask_lab.cli import main

    out = tmp_path / "theory"
    try:
        code = main(["theory", "--out", str(out), "--d", "100", "--p-values", "0.5", *options])
    except SystemExit as exit_:  # argparse's own refusal (a type check): its usage, then one error line, exit 2
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    err = err.splitlines()[-1]
    assert code == 2 and err.startswith("randmask theory: error: "), err
    assert re.search(message, err), err
    assert not out.exists()


def test_an_out_folder_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    from randmask_lab.cli import main

    in_the_way = tmp_path / "results"
    in_the_way.write_text("keep")
    code = main(["theory", "--out", str(in_the_way / "theory"), "--n", "5", "--d", "100", "--p-values", "0.5",
                 "--seeds", "0", "--gd-steps", "10", "--noise-draws", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "a file stands where a folder is needed" in err and str(in_the_way) in err, err
    assert in_the_way.read_text() == "keep"
