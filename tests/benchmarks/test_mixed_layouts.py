"""benchmarks/mixed_layouts.py runs end to end and writes each layout's ratio and the layout picked (a smoke test,
not a timing)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import mixed_layouts  # noqa: E402
from randmask import mixed  # noqa: E402


def test_it_times_every_layout_and_names_the_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    out = tmp_path / "layouts.json"
    monkeypatch.setattr(mixed, "GATHERED_MAX_ELEMENTS", 2000)  # the second length lies above it
    monkeypatch.setattr(sys, "argv", ["mixed_layouts.py", "--dim", "64", "--adapters", "3", "--rows", "6",
                                      "--ratio", "0.05", "--tokens", "1", "8", "--rounds", "2", "--warmup", "1",
                                      "--threads", "1", "--json", str(out)])
    mixed_layouts.main()
    result = json.loads(out.read_text())
    assert result["width"] > 0 and result["gathered_max_elements"] == 2000
    assert [(r["tokens"], r["elements"], r["default"]) for r in result["runs"]] == [
        (1, 6 * result["width"], "gathered"), (8, 48 * result["width"], "per group")]
    for run in result["runs"]:
        assert set(run["ratios"]) == set(mixed_layouts.VARIANTS)
        for ratio in run["ratios"].values():
            assert ratio["rounds"] == 2 and ratio["ci95"][0] <= ratio["median"] <= ratio["ci95"][1]
    assert mixed.GATHERED_MAX_ELEMENTS == 2000  # each forced layout put the limit back


def test_a_ratio_of_one_or_more_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["mixed_layouts.py", "--ratio", "1.5"])
    with pytest.raises(SystemExit) as exit_info:
        mixed_layouts.main()
    assert exit_info.value.code == 2
    assert "--ratio 1.5: the share of kept entries must be below 1" in capsys.readouterr().err


def test_compiled_it_times_both_traced_layouts_and_puts_the_limit_back(tmp_path: Path) -> None:
    out = tmp_path / "layouts.json"
    limit = mixed.TRACED_GATHERED_MAX_ELEMENTS
    mixed_layouts.main(["--dim", "64", "--adapters", "3", "--rows", "6", "--ratio", "0.05", "--tokens", "2",
                        "--rounds", "2", "--warmup", "1", "--threads", "1", "--compiled", "--backend", "aot_eager",
                        "--json", str(out)])  # aot_eager: no C++ build
    result = json.loads(out.read_text())
    assert result["compiled"] == "aot_eager" and result["command"].endswith(f"--json {out}")
    (run,) = result["runs"]
    assert set(run["ratios"]) == set(mixed_layouts.VARIANTS + mixed_layouts.COMPILED)
    assert mixed.TRACED_GATHERED_MAX_ELEMENTS == limit


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda"], "--device cuda: this torch sees no CUDA device"),
    (["--compiled", "--backend", "nosuch"], "--backend 'nosuch' is not a torch.compile backend")])
def test_a_missing_device_or_backend_is_one_line(argv, message, monkeypatch, capsys) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU, and on any machine
    with pytest.raises(SystemExit) as exit_info:
        mixed_layouts.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
