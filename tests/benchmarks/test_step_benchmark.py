"""The step benchmark: the floor stops where adapted variants must, targets are read right, a quick run works."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

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
    out = tmp_path / "bench.json"
    # --max-minutes 0: stop after the first 3 rounds although --rounds asks for 5, and say so.
    args = ["--quick", "--precision", "bf16-true", "--rounds", "5", "--max-minutes", "0", "--warmup", "0",
            "--threads", "1", "--no-memory", "--json", str(out)]
    assert step_benchmark.main(args) == 0
    payload = json.loads(out.read_text())
    rows = {r["variant"]: r for r in payload["rows"]}
    assert "full" not in rows and len(rows) == 9  # bf16-true: no full fine-tuning (it has no frozen base)
    floor = rows["floor"]
    assert floor["ratio_to_floor"] == floor["ratio_ci_low"] == floor["ratio_ci_high"] == 1.0
    for r in rows.values():
        assert r["precision"] == "bf16-true" and r["rounds"] == 3 and r["time_capped"]
        assert r["ratio_ci_low"] <= r["ratio_to_floor"] <= r["ratio_ci_high"]
    assert rows["randmask 0.1% q/v"]["optimizer_bytes_per_trained_entry"] == 8.0
    assert payload["mask_draw_ms_80x5120sq_p1e-3"] > 0
    assert "| randmask 1% all-linear |" in capsys.readouterr().out


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
