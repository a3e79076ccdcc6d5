"""benchmarks/compile_mixed.py runs end to end and writes its paired ratios and frame counts (a smoke test, not a
timing)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import compile_mixed  # noqa: E402


def test_it_times_every_variant_and_counts_the_frames(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    out = tmp_path / "mixed.json"
    monkeypatch.setattr(sys, "argv", ["compile_mixed.py", "--shape", "tiny", "--adapters", "3", "--batch", "6",
                                      "--tokens", "2", "--rounds", "2", "--warmup", "1", "--lora-mixes", "3",
                                      "--backend", "aot_eager", "--json", str(out)])
    compile_mixed.main()
    (run,) = json.loads(out.read_text())["runs"]
    assert set(run["ratios"]) == set(compile_mixed.PAIRS)
    for ratio in run["ratios"].values():
        assert ratio["rounds"] == 2 and ratio["ci95"][0] <= ratio["median"] <= ratio["ci95"][1]
    assert run["max_abs_logit_error"] < 1e-4  # the compiled mixed batch computes what eager does
    # 4 mixes of names (a check and 3 timed): randmask compiles at most once more (the first mix finds an adapter
    # live in the weights), never once per mix; PEFT LoRA compiles once per new list of names.
    assert run["frames"]["randmask compiled"] <= 2 and run["frames"]["plain compiled"] == 1
    assert run["lora_frames"] == 3


def test_a_bad_backend_is_one_line_before_any_model_is_built(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["compile_mixed.py", "--backend", "nonsense"])
    with pytest.raises(SystemExit) as exit_info:
        compile_mixed.main()
    assert exit_info.value.code == 2 and "--backend nonsense: not a torch.compile backend" in capsys.readouterr().err
