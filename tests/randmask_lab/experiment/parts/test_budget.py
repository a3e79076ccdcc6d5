"""A masking budget a cell's model cannot take stops a sweep, `randmask study` and --plan before anything runs: the
confirm spec first asked SmolLM2 for 5%, which its 576x192 v projections cap at 4.93%, and every such run failed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from randmask_lab.errors import RunError
from randmask_lab.experiment.parts.budget import budget_problem, check_budgets
from randmask_lab.experiment.run.config import RunConfig

PROTOCOL = {"n_train": 8, "n_val": 4, "n_test": 4, "epochs": 1}


@pytest.fixture(scope="module")
def smollm2_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M's config alone (its shapes; no weights, no tokenizer): all the check reads."""
    import transformers as tf

    folder = tmp_path_factory.mktemp("smollm2-shapes")
    tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                   tie_word_embeddings=True).save_pretrained(folder)
    return folder


def _config(model: Path | str, **kw) -> RunConfig:
    return RunConfig(**{"model": str(model), "task": "sst2", "method": "randmask", "mode": "lm", **PROTOCOL, **kw})


def test_the_even_spread_is_capped_by_the_smallest_target(smollm2_shapes: Path) -> None:
    assert budget_problem(_config(smollm2_shapes, trainable_ratio=4.9e-2)) is None
    problem = budget_problem(_config(smollm2_shapes, trainable_ratio=5e-2))
    assert problem is not None and "smallest target has 110,592" in problem and "at most 0.0493" in problem
    assert "zero trainable entries" in budget_problem(_config(smollm2_shapes, trainable_ratio=1e-10))
    structured = budget_problem(_config(smollm2_shapes, method="structured", trainable_ratio=5e-2))
    assert structured is not None and structured.startswith("sst2 structured ratio 0.05")


def test_what_has_no_budget_to_check_passes(smollm2_shapes: Path, tmp_path: Path) -> None:
    assert budget_problem(_config(smollm2_shapes, method="lora", trainable_ratio=None)) is None
    assert budget_problem(_config(smollm2_shapes, trainable_ratio=None, density=0.5)) is None
    # A model that cannot be found: the run itself says so, in its own words.
    assert budget_problem(_config(tmp_path / "no-such-model", trainable_ratio=5e-2)) is None


def test_check_budgets_names_every_cell_that_cannot_run(smollm2_shapes: Path) -> None:
    configs = [_config(smollm2_shapes, trainable_ratio=r, lr=lr) for r in (5e-2, 1e-3, 0.2) for lr in (1e-3, 1e-2)]
    with pytest.raises(RunError, match=r"^2 cells cannot run: sst2 randmask ratio 0.05: .*; sst2 "
                                       r"randmask ratio 0.2: .*\. Change those ratios$"):
        check_budgets(configs)
    check_budgets(configs[2:4])


def test_study_and_its_plan_refuse_the_spec_before_anything_runs(smollm2_shapes: Path, tmp_path: Path, capsys
                                                                 ) -> None:
    from randmask_lab.cli import main

    study = {"name": "capped", "model": str(smollm2_shapes), "precision": "32", "seeds": [0],
             "common": {"batch_size": 4, "mode": "lm"}, "protocol": {"sst2": PROTOCOL},
             "cells": [{"method": "randmask", "ratio": 5e-2, "lrs": [1e-3]}]}
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps(study))
    out = tmp_path / "runs"
    for extra in (["--plan"], []):
        assert main(["study", str(spec), "--out-dir", str(out), *extra]) == 2
        assert "1 cell cannot run: sst2 randmask ratio 0.05" in capsys.readouterr().err
    assert not out.exists()  # no store, no run folder: nothing ran


def test_the_committed_confirm_spec_fits_smollm2(smollm2_shapes: Path) -> None:
    """Every masking ratio of experiments/smollm2_confirm.json fits SmolLM2's shapes."""
    spec = json.loads((Path(__file__).resolve().parents[4] / "experiments" / "smollm2_confirm.json").read_text())
    ratios = sorted({c["ratio"] for c in spec["cells"] if "ratio" in c})
    check_budgets(_config(smollm2_shapes, method=m, trainable_ratio=r) for r in ratios for m in ("randmask",
                                                                                                  "structured"))
