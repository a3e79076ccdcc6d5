"""Run identity: every config field is classified; the id covers max_steps, precision and the data read."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from tests.conftest import DATA_DIR as DATA

from randmask_lab.experiment import RunConfig, run_training
from randmask_lab.experiment.compute.distributed import DistContext
from randmask_lab.experiment.run.config import EXECUTION, IDENTITY, ROLE, field_role


def test_every_field_has_a_role():
    roles = {f.name: field_role(f) for f in dataclasses.fields(RunConfig)}
    assert set(roles.values()) == {"identity", "execution"}
    assert roles["max_steps"] == roles["precision"] == roles["source"] == "identity"
    assert roles["data_dir"] == roles["out_dir"] == roles["threads"] == "execution"


def test_an_unclassified_field_fails():
    @dataclasses.dataclass
    class Extended(RunConfig):
        new_option: int = 3

    with pytest.raises(ValueError, match="'new_option' has no role"):
        Extended().identity()
    assert IDENTITY[ROLE] == "identity" and EXECUTION[ROLE] == "execution"


def test_the_id_changes_with_what_the_run_computes():
    base = RunConfig(task="rte")
    changed = [dataclasses.replace(base, max_steps=1), dataclasses.replace(base, precision="bf16-true"),
               dataclasses.replace(base, lr=2e-3), dataclasses.replace(base, method_options={"x": 1}),
               dataclasses.replace(base, group_by_length=True)]
    assert len({base.run_id, *(c.run_id for c in changed)}) == 6
    assert "group_by_length" not in base.identity()  # added later: absent at its default, old ids stand
    same = [dataclasses.replace(base, out_dir="elsewhere", threads=1, progress=False, restart=True,
                                checkpoint_every=5, lease_seconds=5)]
    assert {c.run_id for c in same} == {base.run_id}


def test_the_id_follows_the_data_content_not_its_folder(tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(DATA / "superglue" / "RTE", copy / "superglue" / "RTE")
    base = RunConfig(task="rte", data_dir=str(DATA))
    moved = dataclasses.replace(base, data_dir=str(copy))
    assert moved.run_id == base.run_id  # the same bytes elsewhere: the same run
    with open(copy / "superglue" / "RTE" / "train.jsonl", "a") as f:
        f.write('{"premise": "p", "hypothesis": "h", "label": "entailment", "idx": 99999}\n')
    assert moved.run_id != base.run_id  # an edited file: another run
    data = moved.identity()["data"]
    assert data["train"][0]["file"] == "superglue/RTE/train.jsonl" and len(data["train"][0]["sha256"]) == 64


def test_the_id_follows_a_local_model_folders_files(tmp_path, monkeypatch):
    """Found by a hostile pass: `--model tiny` run from two folders (two different models at one relative path)
    got one run id, and the second run was handed the first one's record."""
    from tests.randmask_lab.experiment.tiny import make_tiny_lm

    for name, seed in (("a", 0), ("b", 1)):
        make_tiny_lm(tmp_path / name / "tiny", seed=seed)
    ids = []
    for name in ("a", "b"):
        monkeypatch.chdir(tmp_path / name)
        ids.append(RunConfig(model="tiny", task="rte", data_dir=str(DATA)).run_id)
    assert ids[0] != ids[1]
    files = RunConfig(model="tiny", task="rte", data_dir=str(DATA)).identity()["model_files"]
    assert "config.json" in {f["file"] for f in files} and all(len(f["sha256"]) == 64 for f in files)
    with open(tmp_path / "b" / "tiny" / "config.json", "a") as f:
        f.write("\n")  # an edited file at the same path: another run
    assert RunConfig(model="tiny", task="rte", data_dir=str(DATA)).run_id != ids[1]
    assert "model_files" not in RunConfig(model="smollm2-135m", task="rte", data_dir=str(DATA)).identity()  # zoo name


def test_max_steps_is_not_handed_back_as_the_full_run(tiny_lm, run_kwargs):
    config = RunConfig(**{**run_kwargs, "model": tiny_lm, "epochs": 1})
    short = run_training(dataclasses.replace(config, max_steps=1))
    full = run_training(config)
    assert short.run_id != full.run_id
    assert sum(1 for _ in open(Path(full.run_dir) / "steps.csv")) == 1 + 3  # header + 3 steps, not the 1-step run


def test_the_record_says_where_each_split_came_from(tiny_lm, run_kwargs):
    record = run_training(RunConfig(**{**run_kwargs, "model": tiny_lm, "epochs": 1, "max_steps": 1}))
    data = record.data
    assert data["train"]["from"].endswith("train.jsonl") and data["train"]["rows"] == 12
    assert data["val"]["pool"] == "train" and data["test"]["from"].endswith("val.jsonl")
    assert data["test"]["pool"] == "test" and data["test"]["rows"] == 6
    (train,) = data["fingerprint"]["train"]
    assert train["file"] == "superglue/RTE/train.jsonl" and train["size"] > 0


def test_config_json_of_an_older_version_still_loads():
    old = {k: v for k, v in RunConfig(task="rte").to_dict().items() if k not in ("precision", "restart")}
    config = RunConfig.from_dict({**old, "dtype": "bfloat16", "resume": False})
    assert config.precision == "bf16-true" and config.restart is True


def test_the_id_covers_a_changed_mask_sampler(monkeypatch):
    import randmask

    structured = RunConfig(task="rte", method="structured", ratio=1e-4)
    random = RunConfig(task="rte", method="randmask", ratio=1e-4)
    assert structured.identity()["mask_kind_version"] == randmask.MASK_KIND_VERSIONS["structured"] == 2
    assert "mask_kind_version" not in random.identity()  # version 1: ids from before the field stay valid
    before = structured.run_id
    monkeypatch.setitem(randmask.MASK_KIND_VERSIONS, "structured", 3)
    assert structured.run_id != before


@pytest.mark.parametrize("name", ["smollm2_study.jsonl", "smollm2_confirm.jsonl"])
def test_committed_study_records_keep_their_run_ids(name):
    # A change to the identity would orphan every committed record: the study would run them all again.
    study = Path(__file__).resolve().parents[4] / "experiments" / "results" / name
    rows = [json.loads(line) for line in study.read_text().splitlines()[:40:7]]
    for row in rows:
        config = RunConfig.from_dict({**row["config"], "data_dir": str(DATA)})
        assert config.run_id == row["run_id"]


def test_records_name_data_files_relative_to_the_data_root(tiny_lm, run_kwargs):
    record = run_training(RunConfig(**{**run_kwargs, "model": tiny_lm, "epochs": 1}))
    for split in ("train", "val", "test"):
        origin = record.data[split]["from"]
        assert not origin.startswith("/") and origin.startswith(("superglue/", "glue/")), origin


def test_the_processes_a_run_spans_are_part_of_its_id(monkeypatch, tiny_lm, run_kwargs):
    """Each process takes --batch-size examples a step: the same options on 2 processes are another run."""
    from randmask_lab.errors import RunError

    one = RunConfig(task="rte")
    assert one.world_size == 1 and "world_size" not in one.identity()  # absent at 1: every older id stands
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc-per-node 2 sets it
    two = RunConfig(task="rte")
    assert two.world_size == 2 and two.identity()["world_size"] == 2 and two.run_id != one.run_id
    assert RunConfig.from_dict(two.to_dict()).world_size == 2  # a stored config keeps its own
    with pytest.raises(RunError, match="world_size.*runs on 1: launch it with torchrun --nproc-per-node 2"):
        run_training(RunConfig(**{**run_kwargs, "model": tiny_lm}), ctx=DistContext())
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(RunError, match="WORLD_SIZE='two' is not a number of processes"):
        RunConfig(task="rte")
