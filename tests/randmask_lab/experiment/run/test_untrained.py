"""A run that trains nothing (zeroshot) refuses the options that only shape training; sweeps and studies leave
their common training options out of its config, so their zero-shot run ids stay what they were."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import DATA_DIR as DATA
from tests.randmask_lab.methods.tiny import build

from randmask_lab.cli import main
from randmask_lab.errors import RunError
from randmask_lab.experiment.results.record import RunRecord
from randmask_lab.experiment.run.config import RunConfig
from randmask_lab.experiment.run.untrained import TRAINING_ONLY, UNTRAINED_METHODS, without_training_options
from randmask_lab.experiment.sweeps.sweep import SweepConfig, sweep_configs
from randmask_lab.methods import METHOD_NAMES, prepare_method
from randmask_lab.study.plan import CellSpec, StudySpec, needed_runs
from randmask_lab.study.run import run_config

GIVEN = {"lr": 0.5, "head_lr": 0.1, "grad_accum": 2, "weight_decay": 0.1, "adam_betas": (0.8, 0.9),
         "adam_eps": 1e-6, "schedule": "cosine", "warmup_steps": 3, "max_steps": 2, "select_by": "val_metric",
         "eval_initial": True, "mask_seed": 3, "order_seed": 4, "targets": ["q_proj"], "head_modules": ["score"],
         "method_options": {"r": 4}}


# The identity fields a zero-shot run reads or that place its row (the protocol's): every other identity field must
# be in TRAINING_ONLY, so a field added to RunConfig fails here until someone says which it is.
ZEROSHOT_READS = {"model", "task", "method", "trainable_ratio", "density", "epochs", "batch_size", "group_by_length",
                  "max_grad_norm", "seed", "data_seed", "n_train", "n_val", "n_test", "mode", "max_length",
                  "max_new_tokens", "val_generate", "precision", "world_size", "quantize", "source"}


def test_every_training_only_field_is_tried_here() -> None:
    assert set(GIVEN) == set(TRAINING_ONLY)


def test_every_identity_field_is_read_by_zeroshot_or_training_only() -> None:
    import dataclasses

    from randmask_lab.experiment.run.config import field_role

    identity = {f.name for f in dataclasses.fields(RunConfig) if field_role(f) == "identity"}
    assert identity == ZEROSHOT_READS | set(TRAINING_ONLY) and not ZEROSHOT_READS & set(TRAINING_ONLY)


@pytest.mark.parametrize("name", sorted(GIVEN))
def test_zeroshot_refuses_a_training_option_in_one_line(name: str) -> None:
    # Without the check each was accepted, made another run id, and changed nothing the run computed.
    flag = "--" + name.replace("_", "-")
    with pytest.raises(RunError, match=rf"^{flag} shapes training, and --method zeroshot trains nothing .* Drop it$"):
        RunConfig(method="zeroshot", **{name: GIVEN[name]}).validate()


def test_zeroshot_takes_the_protocol_and_the_defaults() -> None:
    RunConfig(method="zeroshot", lr=1e-3, epochs=3, batch_size=4, max_grad_norm=1.0, group_by_length=True,
              n_train=64).validate()
    RunConfig(method="lora", weight_decay=0.1, lr=0.5, schedule="cosine").validate()  # a method that trains


def test_the_cli_refuses_it_before_any_run(capsys) -> None:
    assert main(["train", "--method", "zeroshot", "--weight-decay", "0.1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--weight-decay shapes training" in err


def test_a_sweep_gives_its_training_options_to_the_methods_that_train_only() -> None:
    base = RunConfig(weight_decay=0.1, schedule="linear", lr=3e-3, max_grad_norm=1.0)
    sweep = SweepConfig(models=["m"], tasks=["rte"], methods=["zeroshot", "lora"], lrs=[1e-3], seeds=[0])
    zero, lora = sweep_configs(sweep, base)
    assert (zero.weight_decay, zero.schedule, zero.lr, zero.max_grad_norm) == (0.0, "constant", 1e-3, 1.0)
    assert (lora.weight_decay, lora.schedule, lora.max_grad_norm) == (0.1, "linear", 1.0)
    zero.validate()
    assert without_training_options(lora) is lora


def test_a_study_spec_with_training_options_in_common_plans_and_finds_its_zeroshot_runs() -> None:
    protocol = {"sst2": {"n_train": 64, "n_val": 32, "n_test": 64, "epochs": 2}}
    spec = StudySpec("t", "tiny", "32", protocol, [CellSpec("zeroshot", seeds=(0,))],
                     common={"weight_decay": 0.1, "batch_size": 8, "mode": "lm"})
    (planned,) = needed_runs(spec, [])
    config = run_config(spec, planned, "runs", {})
    config.validate()
    assert config.weight_decay == 0.0
    record = RunRecord("z", config.to_dict(), "done", "accuracy", val_loss=0.5, test_metric=0.5)
    assert needed_runs(spec, [record]) == []  # without the plan's match: the run is planned again for ever


def test_committed_zeroshot_records_keep_their_run_ids() -> None:
    study = Path(__file__).resolve().parents[4] / "experiments" / "results" / "smollm2_study.jsonl"
    rows = [row for row in map(json.loads, study.read_text().splitlines()) if row["config"]["method"] == "zeroshot"]
    assert rows
    for row in rows[::5]:
        config = RunConfig.from_dict({**row["config"], "data_dir": str(DATA)})
        config.validate()
        assert without_training_options(config).run_id == row["run_id"]


def _reestimated(common: dict) -> tuple[int, object]:
    """Run a study of LoRA against zero-shot to its end on made-up results: (records, its seed re-estimate)."""
    from randmask_lab.study.plan import seeds_decided
    from randmask_lab.study.reestimate import Reestimate

    protocol = {"sst2": {"n_train": 64, "n_val": 32, "n_test": 64, "epochs": 2}}
    spec = StudySpec("t", "tiny", "32", protocol, [CellSpec("zeroshot"), CellSpec("lora", lrs=(1e-3,))],
                     common={**common, "batch_size": 8, "mode": "lm"},
                     reestimate=Reestimate(compare=(("lora", "zeroshot"),), max_seeds=10, half_width=0.01))
    records: list[RunRecord] = []
    while todo := needed_runs(spec, records):
        for run in todo:
            test = 0.8 + 0.05 * (run.seed % 2) if run.method == "lora" else 0.5 + 0.01 * run.seed
            records.append(RunRecord(f"{run.method}-{run.seed}", run_config(spec, run, "runs", {}).to_dict(), "done",
                                     "accuracy", val_loss=0.5, test_metric=test))
    return len(records), seeds_decided(spec, records)


def test_a_training_option_in_common_leaves_the_seed_reestimate_as_it_is() -> None:
    # Without the match the zero-shot records never entered the re-estimate's pilot: it decided "no more seeds" (3,
    # 9 runs) where the same results without the unused option gave 10 seeds (23 runs).
    plain = _reestimated({})
    assert plain[1].seeds == 10 and _reestimated({"weight_decay": 0.1}) == plain


@pytest.mark.parametrize("argv, named", [(["--weight-decay", "0.1"], "--weight-decay shapes training"),
                                         (["--lrs", "0.1"], "--lrs sets the LRs")])
def test_a_sweep_of_zeroshot_only_refuses_the_training_options_it_would_ignore(argv, named, capsys) -> None:
    # Beside a method that trains, the options are that method's; a sweep of zero-shot alone honours them nowhere.
    assert main(["sweep", "--methods", "zeroshot", "--tasks", "rte", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_the_untrained_methods_are_those_whose_prepared_model_trains_nothing(method: str) -> None:
    """UNTRAINED_METHODS is written out (run/ decides before a model exists); the methods' own ``trains`` is the
    truth it mirrors, so a method that trains nothing (or stops doing so) fails here until the list follows."""
    budget = {"ratio": 0.02} if method in ("randmask", "structured") else {}
    prepared = prepare_method(method, build("opt"), seed=0, total_steps=4, **budget)
    assert prepared.trains == (method not in UNTRAINED_METHODS)
    assert prepared.trains == any(p.requires_grad for p in prepared.model.parameters())
