"""precision_step's summary: per-round speed-ups over fp32, reprinted from a saved run without timing."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import precision_step  # noqa: E402


def test_resummarize_recomputes_paired_speedups_from_saved_times(tmp_path):
    base = [5.0, 5.4, 5.2, 5.6, 5.1]
    fast = [2.5, 2.6, 2.7, 2.6, 2.4]
    saved = {"meta": {"command": "x", "model": "m", "task": "rte", "batch": 8, "threads": 2},
             "rows": [{"attention": "default"}, {"attention": "folded"}],
             "times": {"32/auto": base, "bf16-true/auto": fast}}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(saved))
    _, rows = precision_step.resummarize(path)
    assert [r["attention"] for r in rows] == ["default", "folded"]
    assert rows[0]["speedup_vs_32"] == 1.0 and rows[0]["ci95"] == [1.0, 1.0]
    ratios = [b / t for b, t in zip(base, fast)]
    assert rows[1]["speedup_vs_32"] == round(statistics.median(ratios), 3)
    low, high = rows[1]["ci95"]  # rounded to 3 decimals
    assert min(ratios) - 5e-4 <= low <= rows[1]["speedup_vs_32"] <= high <= max(ratios) + 5e-4
    assert rows[1]["median_s"] == round(statistics.median(fast), 4) and rows[1]["rounds"] == 5


def test_summarize_of_a_missing_or_foreign_file_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import pytest

    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"meta": {}}')
    for path in (tmp_path / "missing.json", foreign):
        monkeypatch.setattr(sys, "argv", ["precision_step.py", "--summarize", str(path)])
        with pytest.raises(SystemExit) as exit_info:
            precision_step.main()
        assert exit_info.value.code == 2
        assert "not a saved precision_step run" in capsys.readouterr().err


def test_build_gives_the_runner_s_trainer(tmp_path):
    import torch
    import transformers
    from tests.randmask_lab.experiment.tiny import make_tiny_lm

    transformers.logging.set_verbosity_error()
    model = make_tiny_lm(tmp_path / "lm")
    trainer, batch, kernel = precision_step.build("32", "auto", str(model), "rte", 2, tmp_path, max_length=64)
    assert kernel == "default" and batch == [0, 1] and trainer.plan.name == "32"
    before = {k: v.clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    assert torch.isfinite(torch.tensor(trainer.step(batch)))
    assert any(not torch.equal(v, dict(trainer.model.named_parameters())[k]) for k, v in before.items())
