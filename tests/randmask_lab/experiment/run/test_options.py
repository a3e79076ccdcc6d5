"""Dataclass -> argparse: docstrings become help, types become parsers, unset options keep defaults."""

from __future__ import annotations

import argparse

import pytest

from randmask_lab.experiment import RunConfig, RunError
from randmask_lab.experiment.run.options import add_dataclass_options, dataclass_from_args, field_docs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_dataclass_options(parser, RunConfig)
    return parser


def test_every_field_is_documented_and_in_the_help():
    docs = field_docs(RunConfig)
    assert set(docs) == set(RunConfig.__dataclass_fields__)
    help_text = " ".join(_parser().format_help().split())
    assert "Masking budget as a fraction of ALL model parameters" in help_text
    assert "(default: 5)" in help_text and "--option KEY=VALUE" in help_text


def test_parsing_types():
    args = _parser().parse_args(["--lr", "1e-2", "--targets", "q_proj", "v_proj", "--option", "r=16",
                                 "--option", "init=random", "--no-progress", "--adam-betas", "0.8", "0.9",
                                 "--mode", "lm"])
    config = dataclass_from_args(RunConfig, args)
    assert config.lr == 1e-2 and config.targets == ["q_proj", "v_proj"] and config.mode == "lm"
    assert config.method_options == {"r": 16, "init": "random"}
    assert config.progress is False and config.adam_betas == (0.8, 0.9)
    assert dataclass_from_args(RunConfig, _parser().parse_args([])) == RunConfig()


def test_a_flag_given_as_a_string_is_refused():
    # From a JSON study spec: "false" is a non-empty string, so it would switch the option on.
    with pytest.raises(RunError, match="--group-by-length must be true or false, got 'false'"):
        RunConfig(group_by_length="false").validate()
    RunConfig(group_by_length=True).validate()
