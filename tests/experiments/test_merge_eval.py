"""experiments/merge_eval.py's table: per merge the kept share of each single adapter's gain, with tasks still
training marked (never a KeyError), and the mean over the tasks whose single adapter gained."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "merge_eval.py"


def _module():
    spec = importlib.util.spec_from_file_location("merge_eval", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_partial_singles_are_marked_and_a_full_merge_gets_its_shares(tmp_path):
    table = _module().table
    zero = [{"row": "zeroshot", "task": t, "metric": m} for t, m in
            [("sst2", 0.5), ("rte", 0.5), ("cb", 0.5), ("boolq", 0.6)]]
    partial = [{"row": "single", "name": "lora-None", "task": "cb", "metric": 0.7}]
    _write(tmp_path / "p.jsonl", zero + partial)
    text = table(tmp_path / "p.jsonl")
    assert "| single lora | not trained yet | not trained yet | 0.700 | not trained yet | | |" in text
    singles = [{"row": "single", "name": "randmask-independent", "task": t, "metric": m} for t, m in
               [("sst2", 0.9), ("rte", 0.7), ("cb", 0.7), ("boolq", 0.5)]]  # boolq: no gain
    merge = [{"row": "merge", "name": "randmask-linear", "task": t, "metric": m} for t, m in
             [("sst2", 0.8), ("rte", 0.6), ("cb", 0.7), ("boolq", 0.6)]]
    _write(tmp_path / "f.jsonl", zero + singles + merge)
    line = next(x for x in table(tmp_path / "f.jsonl").splitlines() if x.startswith("| merge randmask-linear"))
    # shares: (0.8-0.5)/(0.9-0.5)=75%, (0.6-0.5)/(0.7-0.5)=50%, 100%, n/a; mean of three: 75%
    assert line == "| merge randmask-linear | 0.800 (75%) | 0.600 (50%) | 0.700 (100%) | 0.600 (n/a) | 75% | |"


def _record(folder, task, method, **cfg):
    run = folder / f"{task}-{method}"
    run.mkdir(parents=True)
    config = {"task": task, "method": method, "precision": "32", "seed": 0, "mask_seed": None,
              "method_options": {}, **cfg}
    (run / "record.json").write_text(json.dumps({"status": "done", "config": config, "run_id": run.name,
                                                 "run_dir": "/elsewhere/runs/merge/" + run.name}))
    return run


def test_adapters_come_from_their_own_folder_and_the_first_folder_wins(tmp_path):
    find = _module().find_adapters
    fresh, committed = tmp_path / "runs", tmp_path / "committed"
    fresh_cb = _record(fresh, "cb", "lora")
    _record(committed, "cb", "lora")
    committed_rte = _record(committed, "rte", "lora")
    _record(committed, "sst2", "lora", precision="bf16")  # another precision: not this study's
    found = find([fresh, committed], "lora", None)
    assert set(found) == {"cb", "rte"}
    # the folder the record lies in, never the run_dir another machine wrote into it
    assert found["cb"]["folder"] == str(fresh_cb) and found["rte"]["folder"] == str(committed_rte)


def test_min_norm_weights_bring_every_delta_to_the_smallest_norm_and_amplify_none():
    module = _module()
    norms = {"sst2": 30.0, "rte": 60.0, "cb": 90.0, "boolq": 300.0}
    weights = module.min_norm_weights(norms)
    assert weights == [1.0, 0.5, 30.0 / 90.0, 0.1]  # TASKS order: sst2, rte, cb, boolq
    assert all(w * norms[t] == 30.0 or abs(w * norms[t] - 30.0) < 1e-12 for w, t in zip(weights, module.TASKS))


def test_a_merge_that_gives_every_item_one_answer_is_marked_beside_the_majority_row(tmp_path):
    module = _module()
    assert module.top_share([1, 1, 0, 1]) == 0.75 and module.top_share(["yes"] * 3) == 1.0
    zero = [{"row": "zeroshot", "task": t, "metric": 0.5} for t in module.TASKS]
    majority = [{"row": "majority", "task": t, "metric": m} for t, m in
                [("sst2", 0.512), ("rte", 0.527), ("cb", 0.411), ("boolq", 0.628)]]
    singles = [{"row": "single", "name": "lora-None", "task": t, "metric": 0.6 if t == "boolq" else 0.8}
               for t in module.TASKS]  # boolq's single adapter: above zero-shot, below the most frequent answer
    merge = [{"row": "merge", "name": "lora-linear", "task": t, "metric": m, "top_share": s} for t, m, s in
             [("sst2", 0.512, 1.0), ("rte", 0.65, 0.6), ("cb", 0.7, 0.5), ("boolq", 0.628, 1.0)]]
    _write(tmp_path / "m.jsonl", zero + majority + singles + merge)
    text = module.table(tmp_path / "m.jsonl")
    assert "| the most frequent answer, for every item | 0.512 | 0.527 | 0.411 | 0.628 | | |" in text
    line = next(x for x in text.splitlines() if x.startswith("| merge lora-linear"))
    # every task's share counts in the first mean (62%); boolq's gain is not learned, so the second is 40%
    assert line == "| merge lora-linear | 0.512 † (4%) | 0.650 (50%) | 0.700 (67%) | 0.628 † (128%) | 62% | 40% |"
    assert "† the merged model gave every test item the same answer" in text


def test_a_second_writer_of_one_out_file_is_refused(tmp_path):
    import pytest

    exclusive = _module().exclusive
    out = tmp_path / "merge.jsonl"
    with exclusive(out):
        with pytest.raises(SystemExit, match="another merge_eval.py is writing .*merge.jsonl; wait for it, or pass"):
            with exclusive(out):
                pass
    with exclusive(out):  # released: the next run goes ahead
        pass
