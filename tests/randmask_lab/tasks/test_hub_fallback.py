"""No local copy of the data: the task's Hub dataset is loaded through the same loader.

The "Hub" here is a dataset the test makes and saves with `datasets` (``save_to_disk``), so no
network is needed; the loader reads such a folder exactly where it would call ``load_dataset``.
"""

import sys
from pathlib import Path

import pytest

from randmask_lab.tasks import HUB_DEFAULTS, DataNotFoundError, load_task_splits
from randmask_lab.tasks.hub import HubSpec

datasets = pytest.importorskip("datasets")


def _save_sst2(folder: Path, n_train: int = 40, n_val: int = 20) -> Path:
    def rows(n: int, offset: int) -> dict:
        return {"sentence": [f"a {'good' if i % 2 else 'bad'} film number {i + offset}" for i in range(n)],
                "label": [i % 2 for i in range(n)], "idx": list(range(n))}

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows(n_train, 0)),
                               "validation": datasets.Dataset.from_dict(rows(n_val, 1000))})
    dd.save_to_disk(str(folder))
    return folder


@pytest.fixture
def no_local_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv("RANDMASK_DATA_DIR", str(empty))
    return empty


def test_missing_local_files_fall_back_to_the_hub_dataset(tmp_path: Path, no_local_data: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    saved = _save_sst2(tmp_path / "glue-sst2")
    monkeypatch.setitem(HUB_DEFAULTS, "sst2", HubSpec(str(saved), None))
    splits = load_task_splits("sst2", data_seed=0, n_train=16, n_val=8, n_test=10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 8, 10)
    assert splits.origin.startswith("hf:")
    assert all("film number" in ex.fields["sentence"] for ex in splits.train)
    assert all(int(ex.fields["sentence"].rsplit(" ", 1)[1]) >= 1000 for ex in splits.test)  # test comes from validation


def test_explicit_data_dir_without_files_does_not_fall_back(tmp_path: Path, no_local_data: Path) -> None:
    with pytest.raises(DataNotFoundError, match="No data files for task 'sst2'"):
        load_task_splits("sst2", data_seed=0, n_train=4, n_val=2, n_test=2, data_dir=str(no_local_data))


def test_no_data_and_no_hub_names_both_fixes(no_local_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataNotFoundError) as err:
        load_task_splits("sst2", data_seed=0, n_train=4, n_val=2, n_test=2)
    message = str(err.value)
    assert "--data-dir" in message and "RANDMASK_DATA_DIR" in message  # local files
    assert "datasets" in message and "network" in message  # or the Hub
