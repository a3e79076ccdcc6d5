"""One save/load path for trainable weights (atomic, shape-checked); the method protocol the loop calls."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch
import transformers as tf

from randmask_lab.experiment.training import loop, train
from randmask_lab.methods import METHOD_NAMES, prepare_method
from randmask_lab.methods.trainable import TrainableMismatchError, load_trainable, read_tensors, write_tensors


def test_a_wrong_shape_never_broadcasts(tiny_lm_model):
    prepared = prepare_method("randmask", tiny_lm_model, ratio=0.02, seed=0)
    (name, param), *_ = [(n, p) for n, p in prepared.model.named_parameters() if p.requires_grad]
    before = param.detach().clone()
    with pytest.raises(TrainableMismatchError, match=f"shape mismatch for '{name}'.*saved \\(1,\\)"):
        load_trainable(prepared.model, {name: torch.ones(1)}, source="x.safetensors")
    assert torch.equal(param, before)  # nothing was copied
    with pytest.raises(TrainableMismatchError, match="no parameter in this model"):
        load_trainable(prepared.model, {"nope": torch.ones(1)})


def test_prepared_save_load_round_trip_is_atomic(tiny_lm_model, tmp_path):
    prepared = prepare_method("lora", tiny_lm_model, seed=0)
    with torch.no_grad():
        for p in prepared.trainable_parameters():
            p.add_(0.5)
    prepared.save(tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["method.json", "trainable.safetensors"]  # no temps
    saved = prepared.trainable_state_dict()
    with torch.no_grad():
        for p in prepared.trainable_parameters():
            p.zero_()
    prepared.load(tmp_path / "t")
    assert all(torch.equal(saved[n], t) for n, t in prepared.trainable_state_dict().items())
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="bad.safetensors is not a readable safetensors file"):
        read_tensors(tmp_path / "bad.safetensors", 1 << 20)
    write_tensors(tmp_path / "x.safetensors", {"a": torch.ones(2)})
    assert torch.equal(read_tensors(tmp_path / "x.safetensors", 1 << 20)["a"], torch.ones(2))


def test_adalora_brings_its_loss_term_hook_and_state(tiny_lm_model):
    prepared = prepare_method("adalora", tiny_lm_model, seed=0, total_steps=10)
    assert prepared.loss_terms() is not None and prepared.on_step is not None
    tensors, meta = prepared.method_state()
    assert "rank_pattern" in meta
    prepared.restore_method_state(tensors, meta)
    plain = prepare_method("lora", tf.AutoModelForCausalLM.from_config(tiny_lm_model.config), seed=0)
    assert plain.loss_terms() is None and plain.method_state() == ({}, {})


def test_the_loop_never_branches_on_a_method_name():
    """No comparison or membership test in the loop or the run against a method name ("adalora", ...)."""
    for module in (loop, train):
        tested = set()
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.Compare):
                for part in ast.walk(node):
                    if isinstance(part, ast.Constant) and isinstance(part.value, str):
                        tested.add(part.value)
        assert not tested & set(METHOD_NAMES), (module.__name__, tested & set(METHOD_NAMES))


@pytest.fixture
def tiny_lm_model():
    from tests.conftest import tiny_model

    return tiny_model("llama")


def test_a_file_missing_some_trainable_tensors_is_refused(tiny_lm_model):
    """Issue 28: a resumed run (or `randmask distance`) must not keep some parameters at their initial values."""
    prepared = prepare_method("randmask", tiny_lm_model, ratio=0.02, seed=0)
    saved = prepared.trainable_state_dict()
    first = next(iter(saved))
    with pytest.raises(TrainableMismatchError, match=f"lacks 1 of the model's trainable parameters .*{first}"):
        load_trainable(prepared.model, {k: v for k, v in saved.items() if k != first}, source="t.safetensors")


def _dicts() -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=gen)
    return {"empty": {},
            "dtypes": {"f32": torch.randn(3, 4, generator=gen), "f16": torch.randn(5, generator=gen).half(),
                       "bf16": torch.randn(2, 3, generator=gen).bfloat16(),
                       "f64": torch.randn(7, generator=gen).double(), "i64": torch.arange(9),
                       "i8": torch.arange(-3, 3, dtype=torch.int8), "bool": torch.tensor([True, False])},
            "odd shapes": {"none": torch.empty(0), "rows": torch.zeros(0, 5), "scalar": torch.tensor(3.5),
                           "step": torch.tensor(7)},
            "views": {"t": base.t(), "strided": base[:, ::2], "expanded": torch.ones(1, 4).expand(3, 4),
                      "param": torch.nn.Parameter(base.clone())}}


@pytest.mark.parametrize("case", list(_dicts()))
def test_write_tensors_writes_what_safetensors_save_builds(case, tmp_path):
    """Streamed to the disk, byte for byte the blob ``safetensors.torch.save`` builds; the returned SHA-256 is the
    file's; the permissions are a plain open's; no temp file is left beside it."""
    import hashlib
    import os
    import stat

    from safetensors.torch import save

    tensors = _dicts()[case]
    path = tmp_path / "sub" / "x.safetensors"
    digest = write_tensors(path, tensors)
    blob = path.read_bytes()
    assert blob == save({k: v.detach().contiguous() for k, v in tensors.items()})
    assert digest == hashlib.sha256(blob).hexdigest()
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]


def test_write_tensors_never_holds_the_whole_file(tmp_path):
    """A save's peak is the tensors plus a small buffer, not the tensors plus a copy of the whole file (the Python
    allocations traced: the old ``safetensors.torch.save`` blob was one, of the file's size). Older safetensors (0.4
    at least) copied each tensor to bytes in ``save_file`` itself: checked from 0.8, the version measured."""
    import tracemalloc

    import safetensors

    if tuple(int(x) for x in safetensors.__version__.split(".")[:2]) < (0, 8):
        pytest.skip(f"safetensors {safetensors.__version__} copies each tensor to bytes in save_file")

    tensors = {"a": torch.ones(2 << 20), "b": torch.zeros(2 << 20)}  # 16 MiB of fp32
    tracemalloc.start()
    try:
        write_tensors(tmp_path / "x.safetensors", tensors)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MiB held while writing 16 MiB"


def test_a_failed_write_is_an_oserror_and_keeps_the_old_file(tmp_path, monkeypatch):
    """A write the file system refuses (here: past a file-size limit, EFBIG) is the OSError Python's own writes
    raise, which ``disk_problem`` turns into a fix, not safetensors' own error; an interrupted save leaves the old
    file whole at its name. Neither leaves a temp file."""
    resource = pytest.importorskip("resource")
    import signal
    from signal import SIGXFSZ

    import randmask_lab.methods.trainable as trainable
    from randmask_lab.fs import disk_problem

    path = tmp_path / "x.safetensors"
    write_tensors(path, {"old": torch.ones(3)})
    old, limits, handler = path.read_bytes(), resource.getrlimit(resource.RLIMIT_FSIZE), signal.getsignal(SIGXFSZ)
    signal.signal(SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process at the limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limits[1]))
    try:
        with pytest.raises(OSError) as caught:
            write_tensors(path, {"new": torch.zeros(1 << 19)})  # 2 MiB
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(SIGXFSZ, handler)
    assert "no space left" in disk_problem(caught.value) and str(path) in disk_problem(caught.value)

    def killed(tmp, max_bytes):  # the new file written, not yet moved onto the old one
        raise KeyboardInterrupt

    monkeypatch.setattr(trainable, "_sha256_of", killed)
    with pytest.raises(KeyboardInterrupt):
        write_tensors(path, {"new": torch.zeros(4)})
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
