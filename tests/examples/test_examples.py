"""Every example in examples/ runs end to end on a tiny model and real task data (a few steps each)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import free_port
from tests.randmask_lab.experiment.tiny import make_tiny_lm

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SMALL = ["--max-steps", "2", "--n-train", "8", "--n-test", "4"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_lm(tmp_path_factory.mktemp("tiny_lm")))


def _run(script: str, *args: str, launcher: tuple[str, ...] = ()) -> str:
    """stdout of ``python [launcher] examples/script args``; the test fails with its stderr's tail on an error."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": os.pathsep.join([str(EXAMPLES.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, *launcher, str(EXAMPLES / script), *args], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_plain_loop_then_load_and_merge(tiny, tmp_path):
    out = _run("plain_loop.py", "--model", tiny, *SMALL, "--out", str(tmp_path / "adapter"))
    assert "test accuracy after 2 steps" in out and (tmp_path / "adapter" / "adapter_config.json").is_file()
    out = _run("load_and_merge.py", "--model", tiny, "--adapter", str(tmp_path / "adapter"),
               "--merged", str(tmp_path / "merged"))
    assert "bit for bit: True" in out and (tmp_path / "merged" / "config.json").is_file()


def test_peft_trainer(tiny, tmp_path):
    out = _run("peft_trainer.py", "--model", tiny, *SMALL, "--out", str(tmp_path / "peft"))
    assert "reloaded from" in out and (tmp_path / "peft" / "adapter_config.json").is_file()


def test_trl_sft(tiny, tmp_path):
    pytest.importorskip("trl")
    out = _run("trl_sft.py", "--model", tiny, *SMALL[:4], "--out", str(tmp_path / "sft"))  # no --n-test: no eval
    assert "adapter saved" in out and (tmp_path / "sft" / "adapter_config.json").is_file()


def test_qlora_fsdp2_on_two_processes(tiny, tmp_path):
    """torchrun with 2 CPU processes (gloo): an NF4 base sharded with FSDP2, the adapter written by rank 0."""
    pytest.importorskip("torchao")
    torchrun = ("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()))
    out = _run("qlora_fsdp2.py", "--model", tiny, *SMALL, "--out", str(tmp_path / "qlora"), launcher=torchrun)
    assert "test accuracy after 2 steps" in out and (tmp_path / "qlora" / "adapter_config.json").is_file()
