"""`randmask main` on a tiny encoder: every entry runs, the table picks LRs by validation loss."""

from __future__ import annotations

from randmask_lab.experiment.sweeps import main_job
from randmask_lab.experiment.sweeps.main_job import Protocol, comparison_table, run_main_job


def test_main_job_prints_a_comparison_table(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setattr(main_job, "MODEL", tiny_bert)
    monkeypatch.setattr(main_job, "REDUCED", Protocol(n_train=8, n_val=4, n_test=8, epochs=1, seeds=(0,)))
    monkeypatch.setattr(main_job, "ENTRIES", (("lora", None, (1e-3, 1e-2)), ("randmask", 1e-2, (1e-2,))))
    lines: list[str] = []
    table = run_main_job(out_dir=str(tmp_path), progress=False, say=lines.append)
    assert table.splitlines()[0].startswith("| Method | Trainable (method) | SST-2 test acc. | Best LR |")
    rows = table.splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| lora", "| randmask 1e-02"]
    assert "*" in rows[0] and rows[0].count("e-0") >= 3  # both LRs listed, one chosen
    assert any(line.startswith("Protocol: 8 train / 4 val") for line in lines)
    again: list[str] = []
    assert run_main_job(out_dir=str(tmp_path), progress=False, say=again.append) == table  # resumed: same table
    assert comparison_table([]) .count("\n") == 1
