"""Data is what it says: a missing or empty split is an error naming the file; decode errors name file and line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tests.conftest import DATA_DIR

from randmask_lab.errors import DataError, DataFormatError, DataNotFoundError
from randmask_lab.tasks import get_task


def _sst2(tmp_path: Path) -> Path:
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("sentence\tlabel\nit is good\t1\nit is bad\t0\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    return folder


def test_a_missing_train_split_names_the_file(tmp_path):
    folder = _sst2(tmp_path)
    (folder / "train.tsv").unlink()
    with pytest.raises(DataNotFoundError, match=r"needs its original train split: .*glue/SST-2/train.tsv not found"):
        get_task("sst2").load(data_dir=tmp_path)


def test_an_empty_train_split_names_the_file(tmp_path):
    folder = _sst2(tmp_path)
    (folder / "train.tsv").write_text("")
    with pytest.raises(DataNotFoundError, match=r"train.tsv is empty"):
        get_task("sst2").load(data_dir=tmp_path)
    (folder / "train.tsv").write_text("sentence\tlabel\n")  # a header and no rows
    with pytest.raises(DataError, match=r"train.tsv holds no sst2 examples"):
        get_task("sst2").load(data_dir=tmp_path)


def test_a_missing_validation_split_names_the_file(tmp_path):
    shutil.copytree(DATA_DIR / "superglue" / "RTE", tmp_path / "superglue" / "RTE")
    (tmp_path / "superglue" / "RTE" / "val.jsonl").unlink()
    with pytest.raises(DataNotFoundError, match=r"validation split: .*RTE/val.jsonl not found"):
        get_task("rte").load(data_dir=tmp_path)


def test_single_split_tasks_still_carve_and_say_so():
    pools = get_task("boolq").load(data_dir=DATA_DIR)  # BoolQ here ships only val.jsonl: declared single_pool
    assert pools.test is None and pools.train_origin.endswith("val.jsonl")


def test_invalid_utf8_names_file_and_line(tmp_path):
    folder = _sst2(tmp_path)
    (folder / "train.tsv").write_bytes(b"sentence\tlabel\nok\t1\nbad \xff\xfe byte\t0\n")
    with pytest.raises(DataFormatError, match=r"train.tsv:3: not UTF-8"):
        get_task("sst2").load(data_dir=tmp_path)
    (folder / "dev.tsv").write_bytes(b"sentence\t\xfflabel\n")  # the header read that checks for labels
    (folder / "train.tsv").write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(DataFormatError, match=r"dev.tsv:1: not UTF-8"):
        get_task("sst2").load(data_dir=tmp_path)


def test_invalid_utf8_in_jsonl_and_json(tmp_path):
    rte = tmp_path / "rte.jsonl"
    rte.write_bytes(b'{"premise": "p", "hypothesis": "h", "label": "entailment", "idx": 0}\n{"premise": "\xff"}\n')
    with pytest.raises(DataFormatError, match=r"rte.jsonl:2: not UTF-8"):
        get_task("rte").load(source=rte)
    squad = tmp_path / "squad.json"
    squad.write_bytes(b'{"data": [\n\n"\xff"]}')
    with pytest.raises(DataFormatError, match=r"squad.json:3: not UTF-8"):
        get_task("squad").load(source=squad)
