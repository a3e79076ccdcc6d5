"""The runner on tiny models and real RTE rows: every method, resume after a kill, divergence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from randmask_lab.experiment import ResultStore, RunConfig, RunError, RunInterrupted, run_training
from randmask_lab.methods import METHOD_NAMES, prepare_method

BUDGET = {"randmask": {"ratio": 0.01}, "structured": {"ratio": 0.01}}


def _trainable(record) -> dict[str, torch.Tensor]:
    return load_file(str(Path(record.run_dir) / "trainable" / "trainable.safetensors"))


@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if m != "zeroshot"])
def test_every_method_runs_and_counts_its_trainable_parameters(method, tiny_lm, run_kwargs):
    options = {"model": tiny_lm, "method": method, "lr": 1e-3, "epochs": 1, **BUDGET.get(method, {})}
    config = RunConfig(**{**run_kwargs, **options})
    record = run_training(config)
    assert record.status == "done" and record.test_metric is not None
    fresh = prepare_method(method, tf.AutoModelForCausalLM.from_pretrained(tiny_lm), seed=0, total_steps=3,
                           **BUDGET.get(method, {}))
    assert record.trainable == fresh.report.trainable > 0
    assert sum(t.numel() for t in _trainable(record).values()) == record.trainable
    assert record.total == fresh.report.total
    assert [e["epoch"] for e in record.epochs] == [1] and record.best_epoch == 1


def test_zero_shot_evaluates_the_untouched_model(tiny_lm, run_kwargs):
    zero = run_training(RunConfig(**{**run_kwargs, "model": tiny_lm, "method": "zeroshot"}))
    assert zero.status == "done" and zero.trainable == 0 and zero.test_metric is not None
    assert [e["epoch"] for e in zero.epochs] == [0] and zero.best_epoch == 0
    assert 0 < zero.cpu_seconds  # CPU time of the run itself (wall time counts pauses too)
    # The same numbers as the pre-training evaluation of a run that does train (same data seed).
    trained = run_training(RunConfig(**{**run_kwargs, "model": tiny_lm, "method": "bitfit", "lr": 1e-2,
                                        "epochs": 1, "eval_initial": True}))
    assert trained.epochs[0]["epoch"] == 0 and trained.epochs[0]["val_loss"] == pytest.approx(zero.val_loss)
    assert trained.epochs[0]["val_metric"] == pytest.approx(zero.val_metric)


def test_zero_shot_refuses_head_mode(tiny_bert, run_kwargs):
    with pytest.raises(RunError, match="prompt scoring"):
        run_training(RunConfig(**{**run_kwargs, "model": tiny_bert, "method": "zeroshot"}))


def test_resume_after_kill_matches_an_uninterrupted_run(tiny_bert, run_kwargs, tmp_path):
    # Head mode on BERT: dropout is active, so the RNG state must survive the restart too.
    kwargs = {**run_kwargs, "epochs": 3, "checkpoint_every": 2}
    base = dict(model=tiny_bert, method="randmask", ratio=0.02, lr=3e-2, **kwargs)
    straight = run_training(RunConfig(**{**base, "out_dir": str(tmp_path / "a")}))
    killed = RunConfig(**{**base, "out_dir": str(tmp_path / "b")})
    with pytest.raises(RunInterrupted):
        run_training(killed, stop_after=5)  # 3 steps/epoch: dies mid epoch 2, after the step-4 checkpoint
    state = json.loads((tmp_path / "b" / killed.run_id / "checkpoint" / "state.json").read_text())
    assert state["state"]["global_step"] == 4
    resumed = run_training(killed)
    assert resumed.status == straight.status == "done"
    # The killed attempt's time up to its checkpoint is carried into the record's compute.
    assert resumed.resumed_at == 4 and straight.resumed_at is None
    carried = state["state"]["train_seconds"], state["state"]["cpu_seconds"]
    assert min(carried) > 0
    assert (resumed.carried_seconds, resumed.carried_cpu_seconds) == pytest.approx(carried, abs=0.01)
    assert resumed.compute_seconds == pytest.approx(resumed.wall_seconds + resumed.carried_seconds)
    assert straight.carried_seconds == straight.carried_cpu_seconds == 0.0
    assert straight.compute_cpu_seconds == straight.cpu_seconds
    assert [e["val_loss"] for e in resumed.epochs] == [e["val_loss"] for e in straight.epochs]
    assert resumed.test_metric == straight.test_metric
    a, b = _trainable(straight), _trainable(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = (tmp_path / "b" / killed.run_id / "steps.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in steps[1:]] == list(range(1, 10))  # no duplicated rows


def test_a_run_resumed_under_other_code_names_every_version_it_ran(tiny_lm, run_kwargs, tmp_path, monkeypatch):
    from randmask_lab.experiment.training import train

    version = lambda commit: {"package": "t", "commit": commit * 40, "dirty": False, "sddmm_kernel": "k"}  # noqa: E731
    config = RunConfig(**{**run_kwargs, "model": tiny_lm, "method": "bitfit", "lr": 1e-3, "epochs": 2,
                          "checkpoint_every": 1, "out_dir": str(tmp_path / "a")})
    monkeypatch.setattr(train, "code_version", lambda device: version("a"))
    with pytest.raises(RunInterrupted):
        run_training(config, stop_after=2)
    with pytest.raises(RunInterrupted):  # a second attempt under the same code adds nothing
        run_training(config, stop_after=3)
    monkeypatch.setattr(train, "code_version", lambda device: version("b"))
    record = run_training(config)
    assert record.resumed_at == 5 and record.code_version["commit"] == "b" * 40  # 2 steps, then 3 more
    assert record.earlier_code_versions == [version("a")]
    same = run_training(RunConfig(**{**config.to_dict(), "out_dir": str(tmp_path / "b")}))
    assert same.earlier_code_versions == []


def test_finished_run_is_not_run_again(tiny_lm, run_kwargs):
    config = RunConfig(**{**run_kwargs, "model": tiny_lm, "method": "bitfit", "lr": 1e-3, "epochs": 1})
    first = run_training(config)
    again = run_training(config)
    assert again.created == first.created and again.to_dict() == first.to_dict()


def test_a_diverged_run_is_recorded_as_diverged(tiny_lm, run_kwargs, monkeypatch):
    """A non-finite training loss ends the run as diverged. (An LR above 10 is refused before the run since issue
    28, so the loss is made non-finite directly.)"""
    from randmask_lab.experiment.training import loop

    monkeypatch.setattr(loop.Trainer, "step", lambda self, indices: float("nan"))
    config = RunConfig(model=tiny_lm, method="full", lr=10.0, **run_kwargs)
    record = run_training(config)
    assert record.status == "diverged" and record.test_metric is None
    stored = ResultStore(Path(config.out_dir) / "results.sqlite").get(config.run_id)
    assert stored is not None and stored.status == "diverged"


def test_head_mode_trains_the_head_and_selects_the_best_epoch(tiny_bert, run_kwargs):
    config = RunConfig(model=tiny_bert, method="lora", lr=1e-2, eval_initial=True, **run_kwargs)
    record = run_training(config)
    assert record.status == "done" and record.trainable_report["groups"]["head"] > 0
    assert [e["epoch"] for e in record.epochs] == [0, 1, 2]
    trained = [e for e in record.epochs if e["epoch"] > 0]
    assert record.val_loss == min(e["val_loss"] for e in trained)
    assert (Path(record.run_dir) / "adapter" / "adapter_config.json").is_file()  # peft format


def test_gradient_accumulation_gives_the_same_run(tiny_lm, run_kwargs, tmp_path):
    base = {**run_kwargs, "model": tiny_lm, "method": "randmask", "ratio": 0.02, "lr": 1e-2, "epochs": 1}
    one = run_training(RunConfig(**{**base, "out_dir": str(tmp_path / "a")}))
    two = run_training(RunConfig(**{**base, "grad_accum": 2, "out_dir": str(tmp_path / "b")}))
    a, b = _trainable(one), _trainable(two)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_randmask_run_saves_a_loadable_adapter(tiny_lm, run_kwargs):
    from randmask import load_adapter

    record = run_training(RunConfig(**{**run_kwargs, "model": tiny_lm, "method": "randmask", "ratio": 0.02,
                                       "lr": 1e-2, "epochs": 1}))
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_lm)
    load_adapter(model, Path(record.run_dir) / "adapter")
    values = {n: p for n, p in model.named_parameters() if n.endswith(".values")}
    saved = _trainable(record)
    assert values and all(torch.equal(values[n], saved[n]) for n in values)


def test_group_by_length_batches_similar_prompts(tiny_lm, run_kwargs, monkeypatch):
    import randmask_lab.experiment.parts.data as data

    seen = []

    def spy(order, lengths, step):
        grouped = real_grouping(order, lengths, step)
        seen.append([lengths[i] for i in grouped])
        return grouped

    real_grouping = data.length_grouped_order
    monkeypatch.setattr(data, "length_grouped_order", spy)
    config = RunConfig(model=tiny_lm, method="randmask", ratio=0.02, lr=1e-2, group_by_length=True, **run_kwargs)
    record = run_training(config)
    assert record.status == "done" and record.config["group_by_length"] is True
    assert seen and all(widths == sorted(widths, reverse=True) for widths in seen)  # 12 examples: one mega-batch


def test_max_grad_norm_clips_every_step_and_is_part_of_the_run(tiny_lm, run_kwargs, monkeypatch):
    """The norm the optimizer sees is at most the limit; unset, nothing is clipped and old run ids stand."""
    from randmask_lab.experiment.results.store import protocol_label

    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    common = {**run_kwargs, "model": tiny_lm, "method": "randmask", "ratio": 0.02, "lr": 1e-2, "epochs": 1}
    plain = run_training(RunConfig(**common))
    unclipped, seen[:] = list(seen), []
    limit = min(unclipped) / 2  # below every step's norm: each step is clipped
    clipped = run_training(RunConfig(**common, max_grad_norm=limit))
    assert seen and all(norm == pytest.approx(limit, rel=1e-4) for norm in seen), (limit, seen)
    assert clipped.run_id != plain.run_id and clipped.config["max_grad_norm"] == limit
    assert "max_grad_norm" not in RunConfig(**common).identity()  # absent at its default: earlier ids unchanged
    assert protocol_label(clipped.config) != protocol_label(plain.config)
    assert f"clip {limit:g}" in protocol_label(clipped.config)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(RunError, match="max-grad-norm"):
            RunConfig(**common, max_grad_norm=bad).validate()


def test_options_a_run_cannot_use_are_refused_not_ignored(tiny_lm, run_kwargs):
    """--head-lr on a run with no trainable head, and --val-generate / --max-new-tokens on a classification task,
    trained bit for bit as without them, under a new run id that a report then counted as another seed."""
    with pytest.raises(RunError, match="trains no head parameter .* drop --head-lr"):
        run_training(RunConfig(**{**run_kwargs, "model": tiny_lm, "method": "randmask", "ratio": 0.02,
                                  "head_lr": 0.1}))
    for option in ({"val_generate": True}, {"max_new_tokens": 5}):
        with pytest.raises(RunError, match="is a classification task and generates none"):
            RunConfig(**{**run_kwargs, "model": tiny_lm, **option}).validate()
    RunConfig(**{**run_kwargs, "model": tiny_lm, "task": "squad", "val_generate": True}).validate()
