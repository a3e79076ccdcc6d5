"""benchmarks/compile_step.py runs end to end and writes its paired ratios (a smoke test, not a timing)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import compile_step  # noqa: E402


def test_it_times_every_variant_and_writes_the_ratios(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "compile.json"
    monkeypatch.setattr(sys, "argv", ["compile_step.py", "--shape", "tiny", "--rounds", "2", "--warmup", "1",
                                      "--backend", "aot_eager", "--device", "cpu", "--json", str(out)])
    compile_step.main()
    results = json.loads(out.read_text())
    assert set(results["ratios"]) == {"randmask 0.1% q/v: compiled / eager", "lora r=8 q/v: compiled / eager",
                                      "eager: randmask / lora", "compiled: randmask / lora"}
    for ratio in results["ratios"].values():
        assert ratio["rounds"] == 2 and ratio["ci95"][0] <= ratio["median"] <= ratio["ci95"][1]
    assert set(results["compile_and_first_step_seconds"]) == set(compile_step.METHODS)
    assert "compiled / eager" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["--device", "nonsense"], "--device nonsense: use cpu, or cuda"),
    (["--backend", "nonsense"], "--backend nonsense: not a torch.compile backend"),
])
def test_a_bad_device_or_backend_is_one_line_before_any_model_is_built(
        args: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["compile_step.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        compile_step.main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
