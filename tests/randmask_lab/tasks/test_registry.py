"""Registry, data-directory resolution, user paths, Hub ids, and bad input."""

from __future__ import annotations

import json

import pytest

from randmask_lab.errors import DataError
from randmask_lab.tasks import (
    ENV_VAR,
    TASK_NAMES,
    DataFormatError,
    DataNotFoundError,
    get_task,
    load_task_splits,
)
from randmask_lab.tasks import paths as paths_mod
from randmask_lab.tasks.hub import CONVERTERS, HUB_DEFAULTS, parse_hub_source

SPEC = {  # name: (kind, loss, metric)
    "sst2": ("classification", "candidates", "accuracy"), "rte": ("classification", "candidates", "accuracy"),
    "cb": ("classification", "candidates", "accuracy"), "boolq": ("classification", "candidates", "accuracy"),
    "wsc": ("classification", "candidates", "accuracy"), "wic": ("classification", "candidates", "accuracy"),
    "multirc": ("classification", "candidates", "accuracy"), "copa": ("multiple_choice", "lm", "accuracy"),
    "record": ("multiple_choice", "lm", "accuracy"), "squad": ("generation", "lm", "f1"),
    "drop": ("generation", "lm", "f1"),
}


def _cb_rows(n):
    return "".join(json.dumps({"premise": f"p{i}", "hypothesis": f"h{i}", "idx": i,
                               "label": ["entailment", "contradiction", "neutral"][i % 3]}) + "\n"
                   for i in range(n))


def test_registry_table():
    assert TASK_NAMES == tuple(SPEC)
    for name, (kind, loss, metric) in SPEC.items():
        t = get_task(name)
        assert (t.kind, t.loss, t.metric) == (kind, loss, metric)
    assert get_task("SST-2") is get_task("sst2")


def test_unknown_task_lists_known_tasks():
    with pytest.raises(ValueError, match="unknown task 'mnli'.*sst2, rte, cb"):
        get_task("mnli")


def test_missing_data_dir_says_where_it_looked(tmp_path):
    where = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as e:
        load_task_splits("rte", 0, data_dir=where)
    msg = str(e.value)
    assert str(where / "superglue" / "RTE") in msg and "--data-dir" in msg and ENV_VAR in msg
    assert "train.jsonl" in msg


def test_env_var_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(DataNotFoundError, match=f"{ENV_VAR} environment variable"):
        get_task("cb").load()
    (tmp_path / "superglue" / "CB").mkdir(parents=True)
    (tmp_path / "superglue" / "CB" / "train.jsonl").write_text(_cb_rows(30))
    (tmp_path / "superglue" / "CB" / "val.jsonl").write_text(_cb_rows(6))
    s = load_task_splits("cb", 0, n_train=10, n_val=5, n_test=100)
    assert (len(s.train), len(s.val), len(s.test)) == (10, 5, 6)


def test_defaults_list_cwd_and_repo_root(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths_mod, "repo_root", lambda start=None: tmp_path / "repo")
    with pytest.raises(DataNotFoundError) as e:
        get_task("copa").load()
    msg = str(e.value)
    assert str(tmp_path / ".." / "shared" / "data" / "superglue" / "COPA") in msg
    assert str(tmp_path / "repo" / ".." / "shared" / "data" / "superglue" / "COPA") in msg


def test_default_finds_shared_data_from_repo_root(pools, monkeypatch, tmp_path):
    if not (paths_mod.repo_root() / ".." / "shared" / "data").is_dir():  # data found via RANDMASK_DATA_DIR only
        pytest.skip("this checkout has no ../shared/data beside it: the default has nothing to find")
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)  # cwd has no ../shared/data: the repository root's is found
    assert len(get_task("cb").load().train) == 250


def test_source_single_file_is_carved_three_ways(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text(_cb_rows(40))
    s = load_task_splits("cb", 1, n_train=20, n_val=10, n_test=10, source=f)
    ids = [{e.uid for e in x} for x in (s.train, s.val, s.test)]
    assert [len(x) for x in ids] == [20, 10, 10] and not (ids[0] & ids[1] | ids[0] & ids[2])


def test_source_folder_and_data_dir_root(tmp_path, data_root):
    (tmp_path / "train.jsonl").write_text(_cb_rows(12))
    (tmp_path / "val.jsonl").write_text(_cb_rows(4))
    pools = get_task("cb").load(source=tmp_path)
    assert (len(pools.train), len(pools.test)) == (12, 4)
    assert len(get_task("rte").load(data_dir=data_root).train) == 2490


def test_sst2_stock_glue_folder_uses_dev_when_test_is_unlabelled(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    (tmp_path / "test.tsv").write_text("index\tsentence\n0\tunknown\n")
    pools = get_task("sst2").load(source=tmp_path)
    assert [e.fields["sentence"] for e in pools.test] == ["fine"]


def test_bad_inputs(tmp_path):
    with pytest.raises(DataNotFoundError, match="neither a file nor a folder.*'hf'"):
        get_task("rte").load(source=tmp_path / "missing.jsonl")
    with pytest.raises(DataNotFoundError, match="has none of the files"):
        get_task("rte").load(source=tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"premise": "p", "hypothesis": "h", "label": "maybe"}) + "\n")
    with pytest.raises(DataFormatError, match="not one of"):
        get_task("rte").read(bad)
    bad.write_text(json.dumps({"text": "no passage here"}) + "\n")
    with pytest.raises(DataFormatError, match="not in the original multirc format|lacks field"):
        get_task("multirc").read(bad)
    bad.write_text("not json\n")
    with pytest.raises(DataFormatError, match="not a JSON line"):
        get_task("cb").read(bad)


def test_hub_without_datasets_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match=r"needs the `datasets` package \(pip install 'randmask\[lab\]'\)"):
        load_task_splits("rte", 0, source="hf")


def test_hub_ids_parse():
    assert parse_hub_source("cb", "hf") == HUB_DEFAULTS["cb"]
    spec = parse_hub_source("cb", "hf:me/my_cb:v2")
    assert (spec.path, spec.config, spec.test_split) == ("me/my_cb", "v2", "validation")
    assert set(HUB_DEFAULTS) == set(CONVERTERS) == set(TASK_NAMES)


def test_hub_rows_convert_like_files(pools):
    # HF super_glue/multirc flattens the nesting; the file reader must give the same example.
    ex = pools("multirc").train[0]
    row = {"paragraph": ex.fields["paragraph"], "question": ex.fields["question"],
           "answer": ex.fields["answer"], "label": 0, "idx": {"paragraph": 0, "question": 0, "answer": 0}}
    assert CONVERTERS["multirc"](row, "train", 0) == ex
    rte = pools("rte").test[0]
    row = {**rte.fields, "label": 1, "idx": 0}
    assert CONVERTERS["rte"](row, "val", 0) == rte
    assert CONVERTERS["rte"]({**row, "label": -1}, "test", 0) is None  # unlabelled test rows
    assert CONVERTERS["cb"]({"premise": "p", "hypothesis": "h", "label": "neutral"}, "t", 0).label == 2
    drop = CONVERTERS["drop"]({"query_id": "q", "section_id": "s", "passage": "P", "question": "Q",
                               "answers_spans": {"spans": ["a", "b"], "types": ["span", "span"]}}, "train", 0)
    assert drop.answers == ("a", "b") and drop.group == "s"


def test_hub_path_with_a_stub_datasets_module(monkeypatch):
    import sys
    import types

    rows = {"train": [{"premise": f"p{i}", "hypothesis": "h", "label": i % 2, "idx": i} for i in range(20)],
            "validation": [{"premise": "v", "hypothesis": "h", "label": 0, "idx": 0}]}
    calls = []

    def load_dataset(path, config, split):
        calls.append((path, config, split))
        if path == "broken/id":
            raise ConnectionError("no network")
        return rows[split]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    s = load_task_splits("rte", 0, n_train=10, n_val=5, source="hf")
    assert (len(s.train), len(s.val), len(s.test)) == (10, 5, 1)
    assert calls[0][:2] == ("aps/super_glue", "rte") and s.origin == "hf:aps/super_glue:rte"
    with pytest.raises(DataError, match="Could not load 'broken/id'.*no network"):
        load_task_splits("rte", 0, source="hf:broken/id")
