"""Checkpoints: optimizer state survives the safetensors round trip; no pickles; old files pruned."""

from __future__ import annotations

import pytest
import torch

from randmask_lab.errors import RunError
from randmask_lab.experiment.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
from randmask_lab.methods import PreparedModel, TrainableReport


def _model_and_optimizer(seed: int) -> tuple[PreparedModel, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].bias.requires_grad_(False)
    prepared = PreparedModel(model, TrainableReport("full", 0, 0))
    return prepared, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _train(prepared, optimizer, steps: int) -> None:
    model = prepared.model
    for _ in range(steps):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_round_trip_restores_model_optimizer_and_rng(tmp_path):
    model, opt = _model_and_optimizer(0)
    _train(model, opt, 3)
    state = TrainState(epoch=1, global_step=3, history=[{"epoch": 1, "val_loss": 0.5}], best_epoch=1)
    best = {"0.weight": torch.ones(3, 4)}
    save_checkpoint(tmp_path, state, model, opt, best, "run-a")
    _train(model, opt, 2)
    expected = [p.detach().clone() for p in model.model.parameters()]

    model2, opt2 = _model_and_optimizer(0)  # the same base model (frozen weights come from it)...
    _train(model2, opt2, 1)  # ...with other trainable values, moments and RNG state
    loaded_state, loaded_best = load_checkpoint(tmp_path, model2, opt2, "run-a")
    assert loaded_state == state and torch.equal(loaded_best["0.weight"], best["0.weight"])
    _train(model2, opt2, 2)  # same RNG stream for the inputs, same Adam moments
    for a, b in zip(expected, model2.model.parameters(), strict=True):
        assert torch.equal(a, b)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best-epoch1.safetensors", "method-00000003.safetensors", "optimizer-00000003.safetensors",
                     "state.json", "trainable-00000003.safetensors"]


def test_a_new_checkpoint_replaces_the_old_files(tmp_path):
    model, opt = _model_and_optimizer(0)
    save_checkpoint(tmp_path, TrainState(global_step=1), model, opt, None, "r")
    save_checkpoint(tmp_path, TrainState(global_step=2), model, opt, None, "r")
    assert not list(tmp_path.glob("*00000001*")) and list(tmp_path.glob("*00000002*"))
    assert load_checkpoint(tmp_path / "missing", model, opt, "r") is None


def test_a_best_file_a_killed_attempt_left_is_written_again_not_reused(tmp_path):
    # A killed attempt wrote best-epoch2 and died before state.json; the next attempt resumed the checkpoint before it
    # and reached other values at epoch 2 (another machine or commit). Reusing the file by its name alone kept the
    # killed attempt's tensors as the best.
    from safetensors.torch import save_file

    model, opt = _model_and_optimizer(0)
    save_checkpoint(tmp_path, TrainState(epoch=1, global_step=2, best_epoch=1), model, opt,
                    {"0.weight": torch.ones(3, 4)}, "r")
    save_file({"0.weight": torch.full((3, 4), 7.0)}, str(tmp_path / "best-epoch2.safetensors"))  # the killed one's
    fresh = {"0.weight": torch.full((3, 4), 2.0)}
    save_checkpoint(tmp_path, TrainState(epoch=2, global_step=4, best_epoch=2), model, opt, fresh, "r")
    assert torch.equal(load_checkpoint(tmp_path, model, opt, "r")[1]["0.weight"], fresh["0.weight"])
    written = (tmp_path / "best-epoch2.safetensors").stat().st_mtime_ns
    save_checkpoint(tmp_path, TrainState(epoch=2, global_step=5, best_epoch=2), model, opt, fresh, "r")
    assert (tmp_path / "best-epoch2.safetensors").stat().st_mtime_ns == written  # the recorded one: reused


# -- issue 28: a damaged or hostile checkpoint is a one-line RunError, read bounded ---------------------------------


def _saved(tmp_path, steps: int = 2):
    model, opt = _model_and_optimizer(0)
    _train(model, opt, steps)
    save_checkpoint(tmp_path, TrainState(epoch=1, global_step=steps), model, opt, None, "r")
    return model, opt


def _edit_state(tmp_path, fn) -> None:
    import json

    header = json.loads((tmp_path / "state.json").read_text())
    fn(header)
    (tmp_path / "state.json").write_text(json.dumps(header))


def test_a_trainable_file_that_lacks_tensors_is_refused(tmp_path):
    """Accepting it would resume with some parameters back at their initial values (training silently lost)."""
    from randmask_lab.methods.trainable import write_tensors

    model, opt = _saved(tmp_path)
    (file,) = tmp_path.glob("trainable-*.safetensors")
    digest = write_tensors(file, {"0.weight": torch.zeros(3, 4)})  # "1.weight" and "1.bias" left out
    with pytest.raises(RunError, match="is damaged .*does not match the checksum recorded"):
        load_checkpoint(tmp_path, *_model_and_optimizer(1), "r")
    _edit_state(tmp_path, lambda h: h["sha256"].update({file.name: digest}))  # as a checkpoint without checksums
    with pytest.raises(RunError, match="is damaged .*lacks 2 of the model's trainable parameters.*--restart"):
        load_checkpoint(tmp_path, *_model_and_optimizer(1), "r")


@pytest.mark.parametrize("name", ["/dev/zero", "../../etc/passwd", "sub/x.safetensors", 7])
def test_file_names_outside_the_checkpoint_folder_are_refused_unread(tmp_path, name):
    _saved(tmp_path)
    _edit_state(tmp_path, lambda h: h["files"].update(trainable=name))
    with pytest.raises(RunError, match="is damaged .*not a .safetensors file name"):
        load_checkpoint(tmp_path, *_model_and_optimizer(1), "r")


def test_non_regular_and_oversized_tensor_files_are_refused(tmp_path):
    from tests.hostile import hang_guard, make_sparse, replace_with_fifo

    _saved(tmp_path)
    (file,) = tmp_path.glob("optimizer-*.safetensors")
    make_sparse(file, 4 << 30)
    with pytest.raises(RunError, match="over the .*-byte limit"):
        load_checkpoint(tmp_path, *_model_and_optimizer(1), "r")
    replace_with_fifo(file)
    with hang_guard(30), pytest.raises(RunError, match="not a regular file"):
        load_checkpoint(tmp_path, *_model_and_optimizer(1), "r")
    replace_with_fifo(tmp_path / "state.json")
    with hang_guard(30), pytest.raises(RunError, match="not a regular file"):
        load_checkpoint(tmp_path, *_model_and_optimizer(1), "r")


@pytest.mark.parametrize(("key", "value"), [("global_step", -1), ("epoch", -3), ("step_in_epoch", 1.5),
                                            ("loss_sum", float("inf")), ("best_epoch", "1"), ("history", {}),
                                            ("code_versions", [{"commit": [1]}]), ("code_versions", "abc")])
def test_impossible_counters_are_refused(tmp_path, key, value):
    """A negative global_step used to end in a ZeroDivisionError in the LR warm-up."""
    _saved(tmp_path)
    _edit_state(tmp_path, lambda h: h["state"].update({key: value}))
    with pytest.raises(RunError, match=f"is damaged .*({key}|Infinity is not JSON)"):
        load_checkpoint(tmp_path, *_model_and_optimizer(1), "r")


def test_edited_optimizer_hyperparameters_never_take_effect(tmp_path):
    """The run's config fixes lr, betas and eps: a checkpoint's copy of them is not loaded (fuzz-found: an edited
    betas used to crash the next step, an edited lr to train silently at another rate)."""
    _saved(tmp_path)
    _edit_state(tmp_path, lambda h: h["optimizer"]["param_groups"][0].update(lr=5.0, betas=[0.1, 0.2], eps=1.0))
    model, opt = _model_and_optimizer(1)
    load_checkpoint(tmp_path, model, opt, "r")
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["betas"] == (0.9, 0.999)
    _train(model, opt, 1)
    _edit_state(tmp_path, lambda h: h["optimizer"]["scalars"].update({"9.step": 1}))
    with pytest.raises(RunError, match="names parameter 9"):
        load_checkpoint(tmp_path, *_model_and_optimizer(1), "r")


def test_the_optimizer_state_is_gathered_in_one_order_whatever_its_insertion_order(monkeypatch):
    """Every rank of a sharded run gathers the moments one by one (collectives), so every rank must take them in one
    order. A loaded state keeps the order safetensors returned, which differs between processes (a hash map's):
    the first resume of an FSDP run aborted on a collective mismatch."""
    from randmask_lab.experiment.training import checkpoint

    prepared, opt = _model_and_optimizer(0)
    _train(prepared, opt, 1)
    entries = list(opt.state.items())
    opt.state.clear()
    for param, entry in reversed(entries):  # parameters, and each one's keys, in the reverse of AdamW's order
        opt.state[param] = dict(reversed(list(entry.items())))
    gathered = []
    monkeypatch.setattr(checkpoint, "full_tensor", lambda t: gathered.append(tuple(t.shape)) or t)
    tensors, _ = checkpoint._flatten_optimizer(opt)
    assert list(tensors) == sorted(tensors)
    per_param = [(s, s, ()) for s in [(3, 4), (2, 3), (2,)]]  # exp_avg, exp_avg_sq, step of each, in index order
    assert gathered == [shape for triple in per_param for shape in triple]


@pytest.mark.parametrize(("state", "match"), [
    (TrainState(epoch=99), "state.epoch = 99 is past this run's 4 epochs"),
    (TrainState(epoch=1, step_in_epoch=10**6), "state.step_in_epoch = 1000000 is past an epoch's 5 steps"),
    (TrainState(epoch=4, step_in_epoch=2), "state.step_in_epoch = 2 is past"),
    (TrainState(epoch=2, global_step=10**6), "state.global_step = 1000000 is past this run's 20 steps"),
    (TrainState(epoch=1, history=[{"epoch": 3}]), "state.history has an epoch past the 1 completed"),
])
def test_counters_past_the_run_are_refused(tmp_path, state, match):
    """Found by a hostile pass: state.epoch = 99 resumed into a 'done' record of 2 of 4 epochs."""
    from randmask_lab.experiment.training.checkpoint import check_counters

    check_counters(TrainState(epoch=2, step_in_epoch=3, global_step=13), tmp_path, epochs=4, steps_per_epoch=5)
    check_counters(TrainState(epoch=4, global_step=20), tmp_path, epochs=4, steps_per_epoch=5)  # finished
    with pytest.raises(RunError, match=f"is damaged \\({match}.*--restart"):
        check_counters(state, tmp_path, epochs=4, steps_per_epoch=5)


def test_a_rank_that_does_not_write_joins_every_gather_and_keeps_nothing(monkeypatch):
    """A sharded run's other ranks gathered the model and its Adam moments and held them all until the save
    returned; now each gathered tensor is dropped at once, while the gathers (collectives) keep their order."""
    import randmask_lab.experiment.training.checkpoint as ckpt
    import randmask_lab.methods.trainable as trainable

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    for module in (ckpt, trainable):
        gathered: list[tuple[int, ...]] = []
        monkeypatch.setattr(module, "full_tensor", lambda t, seen=gathered: seen.append(tuple(t.shape)) or t)
        kept = (ckpt._flatten_optimizer(optimizer)[0] if module is ckpt else trainable.trainable_tensors(model))
        order = list(gathered)
        gathered.clear()
        dropped = (ckpt._flatten_optimizer(optimizer, keep=False)[0] if module is ckpt
                   else trainable.trainable_tensors(model, keep=False))
        assert len(kept) == len(order) > 0 and dropped == {} and gathered == order
