"""The analysis sub-commands: parsing, and the command logic with an injected tiny model."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import pytest
import torch
from tests.conftest import tiny_inputs, tiny_model  # tests/conftest.py (tests/ is on sys.path under pytest)

from randmask import MaskingConfig, apply_masking, masked_layers
from randmask_lab.analysis.cli import register
from randmask_lab.analysis.runs import activations_markdown, run_activations, run_distance, run_hessian, run_suggest_lr


@pytest.fixture
def model_and_batches():
    model = apply_masking(tiny_model("opt"), MaskingConfig(density=0.2, seed=0))
    return model, [tiny_inputs("opt", batch=1, seq=8)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="randmask")
    register(parser.add_subparsers(dest="verb", required=True))
    return parser


@pytest.mark.filterwarnings("ignore:power iteration did not reach:RuntimeWarning")
def test_run_hessian_writes_json_and_png(model_and_batches, tmp_path):
    model, batches = model_and_batches
    summary = run_hessian(model, batches, tmp_path, max_iter=3, top_k=2)
    data = json.loads((tmp_path / "hessian.json").read_text())
    assert data["lambda_max"] == summary["lambda_max"] and len(data["trace"]) == data["iterations"] <= 3
    assert len(data["top_k"]) == 2 and data["n_trainable"] > 0
    assert len(data["top_k_error_bounds"]) == 2 and all(b >= 0 for b in data["top_k_error_bounds"])
    where = data["localization"]  # the eigenvector estimate's spread over the masked entries
    assert where["dim"] == data["n_trainable"] and 1.0 <= where["participation"] <= where["dim"]
    assert {"out_feature", "in_feature"} <= set(where["top_entries"][0])
    assert (tmp_path / "power_trace.png").is_file()


@pytest.mark.filterwarnings("ignore:power iteration did not reach:RuntimeWarning")
@pytest.mark.parametrize("base", ["nf4", "tied"])
def test_run_hessian_on_the_delta_path(base, tmp_path):
    """A quantized base and a tied head take the delta path, whose double backward raised NotImplementedError: the
    Hessian now runs there, and its top eigenvalue is that of the same model on the in-place path."""
    from tests.randmask.quantized_models import dequantized_copy, load_quantized, save_tiny_llama

    config = MaskingConfig(targets=["q_proj", "v_proj", "lm_head"], density=0.2, seed=0)
    if base == "nf4":
        model = load_quantized(save_tiny_llama(tmp_path / "llama"), "ao-nf4")
        reference = dequantized_copy(model)
    else:
        model, reference = tiny_model("llama"), tiny_model("llama")
        model.lm_head.weight = model.model.embed_tokens.weight
        reference.lm_head.weight = torch.nn.Parameter(reference.model.embed_tokens.weight.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the tied-weights warning
        model, reference = apply_masking(model, config), apply_masking(reference, config)
    assert any(layer.delta_path for layer in masked_layers(model).values())
    assert not any(layer.delta_path for layer in masked_layers(reference).values())
    batches = [tiny_inputs("llama", batch=1, seq=8)]
    got = run_hessian(model, batches, tmp_path / "delta", max_iter=5, top_k=1)
    want = run_hessian(reference, batches, tmp_path / "in_place", max_iter=5, top_k=1)
    assert got["lambda_max"] == pytest.approx(want["lambda_max"], rel=1e-3)


def test_run_distance_writes_json(model_and_batches, tmp_path):
    model, _ = model_and_batches
    data = run_distance(model, tmp_path)
    assert json.loads((tmp_path / "distance.json").read_text())["total"] == data["total"] == 0.0
    with pytest.raises(ValueError, match="--reference"):
        run_distance(tiny_model("opt"), tmp_path)


@pytest.mark.filterwarnings("ignore:power iteration did not reach:RuntimeWarning")
def test_run_suggest_lr_writes_json(model_and_batches, tmp_path):
    model, batches = model_and_batches
    run_suggest_lr(model, batches, tmp_path, max_iter=3)
    data = json.loads((tmp_path / "suggest_lr.json").read_text())
    assert data["adam_lr_low"] < data["adam_lr"] < data["adam_lr_high"]


def test_subcommands_parse():
    args = _parser().parse_args(["suggest-lr", "--task", "sst2", "--calibration", "3", "--out", "x"])
    assert args.command == "suggest-lr" and args.calibration == 3.0 and args.task == "sst2"
    assert _parser().parse_args(["hessian", "--top-k", "4"]).top_k == 4
    assert _parser().parse_args(["distance", "--reference", "w.safetensors"]).reference.name == "w.safetensors"


def test_handler_uses_the_experiment_hook(model_and_batches, tmp_path, monkeypatch):
    import types

    hook = types.ModuleType("randmask_lab.experiment")
    hook.build_model_and_batches = lambda args: (*model_and_batches, None)  # (model, batches, loss_fn)
    hook.describe_analysis_run = lambda args: {"method": "randmask", "ratio": None, "trained": False}
    monkeypatch.setitem(sys.modules, "randmask_lab.experiment", hook)
    args = _parser().parse_args(["distance", "--out", str(tmp_path)])
    assert args.func(args) == 0 and (tmp_path / "distance.json").is_file()
    run = json.loads((tmp_path / "distance.json").read_text())["run"]
    assert run["method"] == "randmask" and 0 < run["n_trainable"] < run["n_total"]


@pytest.mark.filterwarnings("ignore:power iteration did not reach:RuntimeWarning")
def test_figure4_pairs_before_and_after_by_method_and_budget(model_and_batches, tmp_path, capsys):
    model, batches = model_and_batches
    meta = {"method": "randmask", "ratio": 1e-3, "task": "rte"}
    before = run_hessian(model, batches, tmp_path / "before", max_iter=3, meta={**meta, "trained": False})
    after = run_suggest_lr(model, batches, tmp_path / "after", max_iter=3, meta={**meta, "trained": True})
    run_distance(model, tmp_path / "after", meta={**meta, "trained": True})
    full = run_hessian(model, batches, tmp_path / "full", max_iter=3, meta={"method": "full", "trained": False})
    args = _parser().parse_args(["figure4", str(tmp_path), "--out", str(tmp_path / "fig")])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("| randmask |"))
    assert f"| {before['lambda_max']:.4g} | {after['lambda_max']:.4g} | 0 |" in row and "| 0.1% |" in row
    assert f"| {full['lambda_max']:.4g} | - | - |" in table  # full FT: budget from the counts
    assert (tmp_path / "fig" / "lambda_max.png").is_file() and (tmp_path / "fig" / "distance.png").is_file()


def test_figure4_reports_the_hessian_norm_of_magnitude_runs_and_refuses_a_mix(tmp_path):
    from randmask_lab.analysis.figure4 import collect, markdown

    def write(folder, value, which, trained, seed=0, ratio=1e-3):
        run = {"method": "randmask", "ratio": ratio, "n_trainable": 10, "n_total": 10_000, "trained": trained,
               "seed": seed}
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "hessian.json").write_text(json.dumps({"lambda_max": value, "which": which, "run": run}))

    write("before", -76.0, "magnitude", False)  # a negative dominant eigenvalue: its size is the norm
    write("after", 3.0, "magnitude", True)
    write("after_seed1", 5.0, "magnitude", True, seed=1)
    rows = collect([tmp_path])
    assert rows[0]["before"] == 76.0 and rows[0]["after_by_seed"] == {0: 3.0, 1: 5.0}
    assert rows[0]["after"] == pytest.approx(15 ** 0.5)  # geometric mean
    assert "‖H‖₂ before" in markdown(rows) and "| 3.873 (n=2) |" in markdown(rows)
    write("again", 6.0, "magnitude", True, seed=1)
    with pytest.raises(ValueError, match="a second after measurement of randmask at 0.001, seed 1"):
        collect([tmp_path])
    (tmp_path / "again" / "hessian.json").unlink()
    write("other", 2.0, "top", True, ratio=1e-4)
    with pytest.raises(ValueError, match="mix top-eigenvalue and Hessian-norm"):
        collect([tmp_path])


def test_figure4_tables_where_each_seeds_top_direction_lives(model_and_batches, tmp_path):
    """From real hessian.json files: one row per (cell, state), one column per seed; a file without it is a "-"."""
    from randmask_lab.analysis.figure4 import _short_param, collect, localization_markdown

    model, batches = model_and_batches
    for seed in (0, 2):
        run_hessian(model, batches, tmp_path / f"s{seed}", max_iter=2, meta={"method": "randmask", "ratio": 1e-3,
                                                                               "trained": True, "seed": seed})
    old = json.loads((tmp_path / "s2" / "hessian.json").read_text())
    del old["localization"]  # written before hessian.json said where the direction lives
    old["run"]["seed"] = 1
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "hessian.json").write_text(json.dumps(old))
    table = localization_markdown(collect([tmp_path]))
    header, _, row, *_ = table.splitlines()
    assert header == "| Method | Share | State | seed 0 | seed 1 | seed 2 |"
    assert row.startswith("| randmask | 0.1% | after | ") and row.split(" | ")[4] == "-"
    assert ": L" in row and "[out " in row and ", in " in row
    assert _short_param("model.layers.1.self_attn.v_proj.adapters.default.values") == "L1 v_proj"
    assert _short_param("base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight") == "L3 q_proj lora_A"
    assert localization_markdown(collect([tmp_path / "s1"])) == ""


def test_figure4_rejects_files_without_a_run_block(tmp_path):
    from randmask_lab.analysis.figure4 import collect

    (tmp_path / "hessian.json").write_text('{"lambda_max": 1.0}')
    with pytest.raises(ValueError, match="no 'run' block"):
        collect([tmp_path])


@pytest.mark.parametrize("localization", [[], {}, {"participation": 1.0, "top_entries": []},
                                          {"participation": 1.0, "top_entries": [{"share": 0.5}]}])
def test_figure4_names_a_file_with_a_damaged_localization_block(tmp_path, localization):
    from randmask_lab.analysis.figure4 import collect

    run = {"method": "randmask", "ratio": 1e-3, "n_trainable": 10, "n_total": 10_000, "trained": True}
    path = tmp_path / "hessian.json"
    path.write_text(json.dumps({"lambda_max": 1.0, "run": run, "localization": localization}))
    with pytest.raises(ValueError, match=f"{path}: its 'localization' block is damaged"):
        collect([tmp_path])


def test_missing_experiment_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "randmask_lab.experiment", None)  # import fails like a missing module
    args = _parser().parse_args(["hessian"])
    with pytest.raises(SystemExit, match="build_model_and_batches"):
        args.func(args)


def test_run_activations_measures_the_masked_layers_by_default(model_and_batches, tmp_path):
    model, batches = model_and_batches
    summary = run_activations(model, batches, tmp_path, features=[3])
    data = json.loads((tmp_path / "activations.json").read_text())
    assert set(data["modules"]) == set(data["rms"]) and len(data["modules"]) == 4  # q and v of 2 layers
    name = next(iter(data["modules"]))
    assert len(data["rms"][name]) == 32 and data["modules"][name]["features"]["3"]["rank"] in range(32)
    table = activations_markdown(summary, [3])
    assert table.splitlines()[0].endswith("| feature 3: rank, × median |") and name in table
    with pytest.raises(ValueError, match="no randmask layers"):
        run_activations(tiny_model("opt"), batches, tmp_path)


def test_activations_command_errors_are_one_line(model_and_batches, tmp_path, monkeypatch):
    import types

    from randmask_lab.errors import RunError

    hook = types.ModuleType("randmask_lab.experiment")
    hook.build_model_and_batches = lambda args: (*model_and_batches, None)
    hook.describe_analysis_run = lambda args: {"method": "randmask", "trained": False}
    monkeypatch.setitem(sys.modules, "randmask_lab.experiment", hook)
    args = _parser().parse_args(["activations", "--modules", "value", "--out", str(tmp_path)])
    with pytest.raises(RunError, match="pass --modules"):
        args.func(args)
    args = _parser().parse_args(["activations", "--modules", "v_proj", "--features", "99", "--out", str(tmp_path)])
    with pytest.raises(RunError, match="feature 99 is outside"):
        args.func(args)


@pytest.mark.parametrize(("argv", "message"), [
    (["activations", "--num-batches", "0"], "--num-batches: must be a positive integer, got 0"),
    (["activations", "--features", "-1"], "--features: must be an integer ≥ 0, got -1"),
    (["activations", "--top", "0"], "--top: must be a positive integer, got 0"),
    (["hessian", "--max-iter", "0"], "--max-iter: must be a positive integer"),
    (["hessian", "--top-k", "-2"], "--top-k: must be an integer ≥ 0"),
    (["suggest-lr", "--batch-size", "x"], "--batch-size: must be a positive integer, got 'x'"),
])
def test_counts_out_of_range_are_refused_before_the_model_loads(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


class _NotATensor:
    """Pickled into a .pt file: torch's weights_only loader must refuse it (and never run code from it)."""


@pytest.mark.parametrize("kind", ["pickled object", "missing", "fifo", "huge", "garbage"])
def test_distance_reference_problems_are_one_line_run_errors(model_and_batches, tmp_path, monkeypatch, kind):
    """Issue 28: a pickled .pt was refused safely, but as a traceback."""
    import types

    import torch
    from tests.hostile import hang_guard, make_sparse, replace_with_fifo

    from randmask_lab.errors import RunError

    hook = types.ModuleType("randmask_lab.experiment")
    hook.build_model_and_batches = lambda args: (*model_and_batches, None)
    hook.describe_analysis_run = lambda args: {"method": "randmask", "ratio": None, "trained": False}
    monkeypatch.setitem(sys.modules, "randmask_lab.experiment", hook)
    ref = tmp_path / "ref.pt"
    if kind == "pickled object":
        torch.save({"w": _NotATensor()}, ref)
    elif kind == "fifo":
        replace_with_fifo(ref)
    elif kind == "huge":
        make_sparse(ref, 64 << 30)
    elif kind == "garbage":
        ref.write_bytes(b"not a pickle at all")
    args = _parser().parse_args(["distance", "--reference", str(ref), "--out", str(tmp_path / "out")])
    match = {"pickled object": "cannot be read safely .*never runs the code", "missing": "not found",
             "fifo": "not a regular file", "huge": "over the .*-byte limit", "garbage": "cannot be read safely"}[kind]
    with hang_guard(30), pytest.raises(RunError, match=match):
        args.func(args)


def test_distance_reference_state_dicts_load(model_and_batches, tmp_path):
    import torch
    from safetensors.torch import save_file

    from randmask_lab.analysis.cli import load_state_dict

    state = {"a": torch.ones(3), "b": torch.zeros(2, 2)}
    save_file(state, str(tmp_path / "r.safetensors"))
    torch.save(state, tmp_path / "r.pt")
    for name in ("r.safetensors", "r.pt"):
        loaded = load_state_dict(tmp_path / name, 1 << 20)
        assert set(loaded) == {"a", "b"} and torch.equal(loaded["a"], state["a"])


def test_figure4_without_results_is_a_one_line_error(tmp_path, capsys):
    """It was a ValueError traceback; a folder that does not exist is named."""
    from randmask_lab.cli import main

    (tmp_path / "empty").mkdir()
    code = main(["figure4", str(tmp_path / "empty"), str(tmp_path / "typo"), "--out", str(tmp_path / "fig")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "no hessian.json" in err and f"{tmp_path / 'typo'}: no such folder" in err and "randmask hessian" in err


def test_lanczos_steps_without_top_k_is_refused_before_the_model_loads():
    from randmask_lab.errors import RunError

    args = _parser().parse_args(["hessian", "--lanczos-steps", "40"])
    with pytest.raises(RunError, match="--lanczos-steps sets the Lanczos run of --top-k"):
        args.func(args)
