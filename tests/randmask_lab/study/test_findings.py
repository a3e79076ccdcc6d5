"""The theory input of `randmask findings` (finding d): the committed summary decides; a crafted one is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.hostile import make_sparse

from randmask_lab.cli import main
from randmask_lab.errors import RunError
from randmask_lab.study.findings import FAILS, HOLDS, MAX_THEORY_BYTES, finding_d, read_theory_summary

COMMITTED = Path(__file__).resolve().parents[3] / "experiments/results/theory/theory_summary.json"


def _summary(tmp_path: Path, body: object) -> Path:
    path = tmp_path / "theory_summary.json"
    path.write_text(json.dumps(body))
    return path


def test_the_committed_summary_is_read_and_decides():
    assert finding_d(read_theory_summary(COMMITTED)).verdict in (HOLDS, FAILS)


def test_a_deviation_past_the_bound_fails(tmp_path):
    path = _summary(tmp_path, {"per_p": {"0.1": {"deviation_max": 2.0, "thm51_bound": 1.0},
                                         "0.5": {"deviation_max": 0.5, "thm51_bound": 1.0}}})
    assert finding_d(read_theory_summary(path)).verdict == FAILS


@pytest.mark.parametrize("body", [
    [], {}, {"per_p": []}, {"per_p": {}}, {"per_p": {"0.1": {"deviation_max": 1.0}}},
    {"per_p": {"0.1": {"deviation_max": "1", "thm51_bound": 2.0}}},
    {"per_p": {"0.1": {"deviation_max": True, "thm51_bound": 2.0}}},
    {"per_p": {"0.1": {"deviation_max": 1e309, "thm51_bound": 2.0}}},
])
def test_a_malformed_summary_is_one_clear_error(tmp_path, body):
    with pytest.raises(RunError, match="theory summary .*randmask theory"):
        read_theory_summary(_summary(tmp_path, body))


def test_an_oversized_summary_is_refused_before_reading(tmp_path):
    path = make_sparse(tmp_path / "theory_summary.json", MAX_THEORY_BYTES + 1)
    with pytest.raises(RunError, match="theory summary"):
        read_theory_summary(path)


def test_the_cli_says_it_in_one_line(tmp_path, capsys):
    records = COMMITTED.parents[1] / "smollm2_study.jsonl"
    code = main(["findings", "--from", str(records), "--theory", str(_summary(tmp_path, {"per_p": 3}))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "per_p" in err
