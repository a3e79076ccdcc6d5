"""The step benchmark: the floor stops where adapted variants must, targets are read right, a quick run works."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import step_benchmark  # noqa: E402
from bench_models import FLOOR_TARGETS, batch_ids, build_base, make_step, make_variant  # noqa: E402


def _leaves(loss) -> int:
    """AccumulateGrad nodes reachable from the loss: the tensors the backward ends at."""
    seen, stack, leaves = set(), [loss.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaves += type(node).__name__ == "AccumulateGrad"
        stack.extend(n for n, _ in node.next_functions)
    return leaves


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16-true"])
def test_floor_backward_ends_at_layer0_projections(precision):
    import torch

    model = make_variant("floor", build_base(quick=True, precision=precision))
    ids = batch_ids(model, quick=True)
    make_step("floor", model, ids, precision)  # installs the hooks
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        loss = model(input_ids=ids, labels=ids).loss
    assert _leaves(loss) == len(FLOOR_TARGETS)  # nothing upstream of layer 0's q/k/v is differentiated


def _row(variant, ratio, peak, share, precision="fp32", per_entry=8.0):
    return {"variant": variant, "precision": precision, "ratio_to_floor": ratio, "ratio_ci_low": ratio - 0.01,
            "ratio_ci_high": ratio + 0.01, "peak_rss_total_mb": peak, "sddmm_share": share,
            "optimizer_bytes_per_trained_entry": per_entry}


def test_check_targets():
    rows = [_row("floor", 1.0, 1000, None, per_entry=None), _row("lora r=8 all-linear", 1.10, 1100, None),
            _row("shira r=8 all-linear", 1.04, 1000, None),
            _row("randmask 1% all-linear", 1.045, 1031, 0.06), _row("randmask 0.1% q/v", 1.021, 1029, 0.01)]
    got = {t["target"]: t["holds"] for t in step_benchmark.check_targets(rows)}
    assert got == {
        "randmask 1% all-linear <= 1.05x floor": True,
        "randmask 1% all-linear below lora r=8 all-linear": True,
        "randmask 1% all-linear below shira r=8 all-linear": False,
        "randmask 1% all-linear optimizer state 8 B/entry": True,
        "randmask 1% all-linear peak memory <= floor + 3%": False,
        "randmask 1% all-linear weight gradient <= 5% of the step": False,
        "randmask 0.1% q/v <= 1.02x floor": False,
        "randmask 0.1% q/v optimizer state 8 B/entry": True,
        "randmask 0.1% q/v peak memory <= floor + 3%": True,
        "randmask 0.1% q/v weight gradient <= 2% of the step": True,
    }


def test_quick_run_writes_json_with_cis(tmp_path, capsys):
    from randmask_lab.machine import cpu_kind, describe

    # --max-minutes 0: stop after the first 3 rounds although --rounds asks for 5, and say so.
    args = ["--quick", "--precision", "bf16-true", "--rounds", "5", "--max-minutes", "0", "--warmup", "0",
            "--threads", "1", "--no-memory", "--json", str(tmp_path / "bench_{cpu}.json")]
    assert step_benchmark.main(args) == 0
    out = tmp_path / f"bench_{cpu_kind().lower().replace('/', '-')}.json"  # {cpu}: this CPU's kind
    payload = json.loads(out.read_text())
    machine = payload["settings"]["machine"]  # the CPU every timing here was made on
    assert machine["cpu_kind"] == cpu_kind() and {"cpu_model", "cpu_capability", "cpu_bf16_native"} <= set(machine)
    rows = {r["variant"]: r for r in payload["rows"]}
    assert "full" not in rows and len(rows) == 9  # bf16-true: no full fine-tuning (it has no frozen base)
    floor = rows["floor"]
    assert floor["ratio_to_floor"] == floor["ratio_ci_low"] == floor["ratio_ci_high"] == 1.0
    for r in rows.values():
        assert r["precision"] == "bf16-true" and r["rounds"] == 3 and r["time_capped"]
        assert r["ratio_ci_low"] <= r["ratio_to_floor"] <= r["ratio_ci_high"]
    assert rows["randmask 0.1% q/v"]["optimizer_bytes_per_trained_entry"] == 8.0
    assert payload["mask_draw_ms_80x5120sq_p1e-3"] > 0
    printed = capsys.readouterr().out
    assert "| randmask 1% all-linear |" in printed
    assert f"### bf16-true (on {describe()})" in printed  # the table names its CPU


def test_precisions_fit_the_cpu():
    from bench_machine import choose_precisions

    known = ("fp32", "bf16-mixed", "bf16-true")
    assert choose_precisions(known, None, bf16_ok=True) == (list(known), [], None)
    run, skipped, note = choose_precisions(known, None, bf16_ok=False)  # an AVX2-only CPU: fp32, and says why
    assert run == ["fp32"] and skipped == ["bf16-mixed", "bf16-true"]
    assert note.startswith("skipping bf16-mixed, bf16-true: this CPU has no native bf16")
    assert "--precision bf16-mixed,bf16-true runs them anyway" in note
    run, skipped, note = choose_precisions(known, "fp32,bf16-true", bf16_ok=False)  # asked by name: run, warned
    assert run == ["fp32", "bf16-true"] and skipped == [] and note.startswith("warning: timing bf16-true")
    assert choose_precisions(known, "bf16-mixed", bf16_ok=True) == (["bf16-mixed"], [], None)


@pytest.mark.parametrize("native_bf16", [False, True])
def test_default_run_skips_bf16_where_it_is_not_native(tmp_path, capsys, monkeypatch, native_bf16):
    """make bench on either CPU: fp32 only without native bf16 (said so), all three with it; one time budget."""
    monkeypatch.setattr(step_benchmark, "bf16_native", lambda device: native_bf16)
    monkeypatch.setattr(step_benchmark, "PRECISIONS", ("fp32", "bf16-mixed", "bf16-true"))
    seen = []

    def fake_timing(precision, quick, min_rounds, max_rounds, warmup, ci_target, log, max_minutes, only,
                    quantize="none", clock=None):
        seen.append((precision, max_minutes))
        return [{**_row("floor", 1.0, 1000, None, precision=precision, per_entry=None), "trainable": 0,
                 "ratio_to_lora": 1.0, "adapter_bytes": 0}]

    monkeypatch.setattr(step_benchmark, "time_precision", fake_timing)
    monkeypatch.setattr(step_benchmark, "time_masks", lambda: 1.0)
    args = ["--quick", "--no-memory", "--budget-minutes", "30", "--json", str(tmp_path / "b.json")]
    assert step_benchmark.main(args) == 0
    printed = capsys.readouterr().out
    settings = json.loads((tmp_path / "b.json").read_text())["settings"]
    assert settings["command"] == "python benchmarks/step_benchmark.py " + shlex.join(args)  # what printed it
    if native_bf16:
        assert seen == [("fp32", 10.0), ("bf16-mixed", 10.0), ("bf16-true", 10.0)]
        assert "skipping" not in printed and settings["skipped_precisions"] == []
    else:
        assert seen == [("fp32", 30.0)]
        assert "skipping bf16-mixed, bf16-true: this CPU has no native bf16" in printed
        assert "not timed here: bf16-mixed, bf16-true" in printed
        assert settings["skipped_precisions"] == ["bf16-mixed", "bf16-true"]


def test_merge_results(tmp_path):
    import merge_results

    rows = [_row("floor", 1.0, 1000, None, per_entry=None), _row("randmask 0.1% q/v", 1.01, 1010, 0.01)]
    for name, precision in (("a", "fp32"), ("b", "bf16-mixed")):
        payload = {"settings": {"precision": precision}, "mask_draw_ms_80x5120sq_p1e-3": 70.0,
                   "rows": [{**r, "precision": precision} for r in rows], "targets": []}
        (tmp_path / f"{name}.json").write_text(json.dumps(payload))
    merge_results.main([str(tmp_path / "out.json"), str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    merged = json.loads((tmp_path / "out.json").read_text())
    assert [r["precision"] for r in merged["rows"]] == ["fp32", "fp32", "bf16-mixed", "bf16-mixed"]
    assert {t["precision"] for t in merged["targets"]} == {"fp32", "bf16-mixed"}
    with pytest.raises(SystemExit, match="overlap"):
        merge_results.main([str(tmp_path / "out.json"), str(tmp_path / "a.json"), str(tmp_path / "a.json")])
    with pytest.raises(SystemExit, match="out.json is not one step-benchmark run"):  # a merged file is not an input
        merge_results.main([str(tmp_path / "again.json"), str(tmp_path / "out.json"), str(tmp_path / "b.json")])
    for name, kind in (("a", "AVX2/no-bf16"), ("b", "AVX512/bf16")):  # two kinds of CPU: one table cannot hold both
        payload = json.loads((tmp_path / f"{name}.json").read_text())
        payload["settings"]["machine"] = {"cpu_kind": kind}
        (tmp_path / f"{name}.json").write_text(json.dumps(payload))
    with pytest.raises(SystemExit, match=r"different kinds of CPU \(AVX2/no-bf16, AVX512/bf16\)"):
        merge_results.main([str(tmp_path / "out.json"), str(tmp_path / "a.json"), str(tmp_path / "b.json")])


def test_cpu_time_needs_one_thread_and_reaches_the_timing(tmp_path, monkeypatch):
    """--cpu-time times one thread's CPU time (a busy machine inflates it less); with 2 threads it would miss
    the other thread's work, so it is refused."""
    with pytest.raises(SystemExit):
        step_benchmark.main(["--quick", "--cpu-time", "--threads", "2"])
    clocks = []

    def fake_timing(precision, *args, clock=None, **kwargs):
        clocks.append(clock)
        return [{**_row("floor", 1.0, 1000, None, precision=precision, per_entry=None), "trainable": 0,
                 "ratio_to_lora": 1.0, "adapter_bytes": 0}]

    monkeypatch.setattr(step_benchmark, "time_precision", fake_timing)
    monkeypatch.setattr(step_benchmark, "time_masks", lambda: 1.0)
    before = torch.get_num_threads()
    try:
        assert step_benchmark.main(["--quick", "--no-memory", "--precision", "fp32", "--cpu-time", "--threads", "1",
                                    "--json", str(tmp_path / "c.json")]) == 0
    finally:
        torch.set_num_threads(before)
    assert clocks == [time.thread_time]
    assert json.loads((tmp_path / "c.json").read_text())["settings"]["clock"] == "thread CPU time"
