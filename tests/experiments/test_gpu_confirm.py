"""experiments/gpu_confirm.py: what travels to the GPU is rebuilt and checked before anything runs (the whole path
runs in ``python experiments/gpu_confirm.py --dry-run``, which needs SmolLM2's weights; these tests need none)."""

import hashlib
import importlib.util
import json
import lzma
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "gpu_confirm.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_confirm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def carry(tmp_path: Path) -> Path:
    """A carry as --prepare lays it out, with a small stand-in for the GGUF and the data."""
    gguf = b"GGUF" + bytes(range(256)) * 64
    stream = lzma.compress(gguf)
    carry = tmp_path / "carry"
    (carry / "part1").mkdir(parents=True)
    (carry / "part2" / "wheels").mkdir(parents=True)
    (carry / "part1" / "weights.xz.1").write_bytes(stream[:100])
    (carry / "part2" / "weights.xz.2").write_bytes(stream[100:])
    data = tmp_path / "data" / "glue" / "SST-2"
    data.mkdir(parents=True)
    (data / "dev.tsv").write_text("sentence\tlabel\ngood .\t1\n")
    with tarfile.open(carry / "part2" / "data.tar.xz", "w:xz") as tar:
        tar.add(data, arcname="glue/SST-2")
    (carry / "part2" / "source_manifest.json").write_text("{}")
    expect = {"gguf": "m.gguf", "gguf_package": "llm_fake", "gguf_sha256": hashlib.sha256(gguf).hexdigest(),
              "stream_sha256": hashlib.sha256(stream).hexdigest(),
              "data_sha256": hashlib.sha256((carry / "part2" / "data.tar.xz").read_bytes()).hexdigest(),
              "wheels": {}}
    (carry / "part2" / "expect.json").write_text(json.dumps(expect))
    return carry


def test_the_pieces_join_into_the_checked_package_and_data(carry: Path, tmp_path: Path):
    m = _module()
    m.stash(carry, tmp_path / "stash")
    (carry / "part1" / "weights.xz.1").unlink()  # call 2 carries only part2: the piece comes from the stash
    checks: dict = {}
    env, _ = m.setup(carry, tmp_path / "stash", tmp_path / "work", checks)
    assert all(checks.values()) and len(checks) == 6
    gguf = tmp_path / "work" / "site" / "llm_fake" / "m.gguf"
    assert gguf.read_bytes().startswith(b"GGUF") and (gguf.parent / "__init__.py").is_file()
    assert (Path(env["RANDMASK_DATA_DIR"]) / "glue" / "SST-2" / "dev.tsv").is_file()
    assert env["PYTHONPATH"].split(":")[0] == str(m.ROOT / "src")  # this tree's code first


@pytest.mark.parametrize("tamper, failed", [
    (lambda c: (c / "part2" / "weights.xz.2").write_bytes(b"x" + (c / "part2" / "weights.xz.2").read_bytes()[1:]),
     "the joined weights stream"),
    (lambda c: (c / "part1" / "weights.xz.1").unlink(), "the first piece of the weights is here"),
    (lambda c: (c / "part2" / "data.tar.xz").write_bytes(b"not the data"), "the SST-2 files"),
    (lambda c: (c / "part2" / "expect.json").unlink(), "carry .gpu_confirm/part2"),
])
def test_anything_changed_on_the_way_stops_the_run_before_it_starts(carry, tmp_path, tamper, failed, capsys):
    m = _module()
    tamper(carry)
    out = tmp_path / "out"
    assert m.run(carry, tmp_path / "no-stash", out, m.SPEC, [2, 3], 1, 0.1, 1, None) == 3
    summary = json.loads((out / "gpu_confirm_summary.json").read_text())
    assert failed in summary["error"] and summary["checks"][next(k for k in summary["checks"] if failed in k)] is False
    assert "workers" not in summary and not (out / m.EXPORT_NAME).exists()  # nothing ran


@pytest.mark.parametrize("seen, failed", [
    ({"cuda": False}, "torch sees a GPU"),
    ({"fingerprint": {"weights": "other", "tokenizer": "t"}}, "the converted weights and tokenizer match the CPU's"),
    ({"code": {"commit": "a" * 40, "dirty": True}}, "the code is the manifest's commit, unchanged"),
])
def test_a_machine_that_would_make_other_records_stops_before_any_run(carry, tmp_path, monkeypatch, seen, failed):
    """What the probe finds in the workers' environment: no GPU, other weights, changed code."""
    m = _module()
    expect = json.loads((carry / "part2" / "expect.json").read_text())
    expect.update(commit="a" * 40, fingerprint={"weights": "w", "tokenizer": "t"}, versions_here={})
    (carry / "part2" / "expect.json").write_text(json.dumps(expect))
    good = {"cuda": True, "device": "GPU", "versions": {}, "fingerprint": {"weights": "w", "tokenizer": "t"},
            "source_folder": str(m.ROOT / "src"), "code": {"commit": "a" * 40, "dirty": False}}
    monkeypatch.setattr(m, "probe", lambda env, seconds: {**good, "gguf": str(tmp_path / "work"), **seen})
    monkeypatch.setattr(m.tempfile, "mkdtemp", lambda prefix: str((tmp_path / "work").mkdir() or tmp_path / "work"))
    ran = []
    out = tmp_path / "out"

    def workers(*args):  # as run_workers leaves it: the committed file, copied as the workers' export
        ran.append(args)
        (out / m.EXPORT_NAME).write_text((m.ROOT / m.COMMITTED).read_text())
        return {}

    monkeypatch.setattr(m, "run_workers", workers)
    assert m.run(carry, tmp_path / "no-stash", out, m.SPEC, [2, 3], 1, 1.0, 1, None) == 3
    summary = json.loads((out / "gpu_confirm_summary.json").read_text())
    assert summary["checks"][failed] is False and failed in summary["error"] and not ran
    monkeypatch.setattr(m, "probe", lambda env, seconds: {**good, "gguf": str(tmp_path / "work")})
    assert m.run(carry, tmp_path / "no-stash", out, m.SPEC, [2, 3], 1, 1.0, 1, None) == 0
    assert len(ran) == 1  # every check passed: the workers ran
    assert json.loads((out / "gpu_confirm_summary.json").read_text())["records"]["new"] == 0
    # --allow-cpu (the dry run) passes without a GPU, and the summary says so rather than "torch sees a GPU"
    monkeypatch.setattr(m, "probe", lambda env, seconds: {**good, "cuda": False, "gguf": str(tmp_path / "work")})
    assert m.run(carry, tmp_path / "no-stash", out, m.SPEC, [2, 3], 1, 1.0, 1, None, True) == 0
    checks = json.loads((out / "gpu_confirm_summary.json").read_text())["checks"]
    assert checks.get("torch sees a GPU, or --allow-cpu (it sees none)") is True and "torch sees a GPU" not in checks
