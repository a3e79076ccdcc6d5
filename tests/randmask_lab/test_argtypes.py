from __future__ import annotations

import argparse

import pytest

from randmask_lab.argtypes import non_negative_int, positive_float, positive_int


def test_positive_int() -> None:
    assert positive_int("3") == 3
    for bad in ("0", "-1", "1.5", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="positive integer"):
            positive_int(bad)


def test_non_negative_int() -> None:
    assert non_negative_int("0") == 0 and non_negative_int("7") == 7
    for bad in ("-1", "2.0", "abc"):
        with pytest.raises(argparse.ArgumentTypeError, match="integer ≥ 0"):
            non_negative_int(bad)


def test_positive_float() -> None:
    assert positive_float("1e-3") == 1e-3 and positive_float("2") == 2.0
    for bad in ("0", "-1e-3", "nan", "inf", "-inf", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="positive number|finite number > 0"):
            positive_float(bad)


def test_analysis_tolerances_and_factors_are_checked_by_the_parser() -> None:
    """--tol nan never converged (the run went on to --max-iter) and --calibration nan wrote "lr ~ nan"."""
    from randmask_lab.cli import build_parser

    parser = build_parser()
    for argv in (["hessian", "--tol", "nan"], ["hessian", "--tol", "0"], ["suggest-lr", "--calibration", "nan"],
                 ["suggest-lr", "--calibration", "-1"], ["hessian", "--power-seed", "-3"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    assert parser.parse_args(["suggest-lr", "--tol", "1e-4", "--calibration", "0.5"]).calibration == 0.5


def test_type_and_bounds_problems_of_a_run_config() -> None:
    """Issue 28: values from a JSON spec or the command line that used to pass or end in a traceback."""
    from randmask_lab.argtypes import bounds_problem, type_problem
    from randmask_lab.experiment.run.config import RunConfig

    assert type_problem(RunConfig()) is None and bounds_problem(RunConfig()) is None
    for kwargs, message in [({"epochs": "5"}, "--epochs must be an integer, got '5'"),
                            ({"seed": 1e30}, "--seed must be an integer, got 1e+30"),
                            ({"group_by_length": "false"}, "--group-by-length must be true or false"),
                            ({"targets": ["q_proj", 3]}, "--targets must be"),
                            ({"lr": "0.1"}, "--lr must be a number")]:
        assert message in (type_problem(RunConfig(**kwargs)) or ""), kwargs
    for kwargs, message in [({"lr": float("inf")}, "--lr must be a finite number"),
                            ({"lr": 1e308}, "--lr must be at most 10"),
                            ({"head_lr": 11.0}, "--head-lr must be at most"),
                            ({"seed": 10**23}, "--seed must be at most 2**63 - 1"),
                            ({"mask_seed": 2**63}, "--mask-seed must be at most"),
                            ({"lease_seconds": 0.05}, "--lease-seconds must be between 1 and 604800"),
                            ({"lease_seconds": float("inf")}, "--lease-seconds must be a finite number"),
                            ({"weight_decay": float("inf")}, "--weight-decay must be a finite number")]:
        assert message in (bounds_problem(RunConfig(**kwargs)) or ""), kwargs
    assert bounds_problem(RunConfig(lr=10.0, lease_seconds=3600.0, seed=2**63 - 1)) is None
