"""Issue 25: one merged model on SST-2, RTE, CB and BoolQ, randmask vs LoRA (SmolLM2-135M, fp32, CPU).

    PYTHONPATH=src python experiments/merge_eval.py [--runs runs/merge experiments/results/merge_runs]
        [--out experiments/results/merge_study.jsonl]
        [--merges NAME ...] [--threads 1]
    python experiments/merge_eval.py --table [--out ...]      # the table, from the committed file alone

The single-task adapters are the runs of experiments/merge_train.sh (seed 0, the study's chosen LRs and
per-task protocol, fp32). Each merge loads the four adapters of one method onto a fresh base model, merges
them with ``add_weighted_adapter`` (randmask: ``randmask.add_weighted_adapter``; LoRA: PEFT's), makes the
merge active and scores every task's test split with the lab's own evaluation (the same items, prompts and
scoring as the training runs' test metric). Zero-shot: the untouched base model, scored the same way.
Per task, the share of the single adapter's gain the merge keeps: (merged - zero-shot) / (single - zero-shot).

Rows are appended to --out as they finish (the file is rewritten atomically) and a merge already in the file
is skipped, so the script resumes. Settings are fixed in advance (no choice on test data): weights 1.0 for
every adapter (task arithmetic with lambda = 1), density 0.5 for ties / dare_*, DARE seed 0. The ``*-min-norm``
merges weight each adapter by (smallest delta norm) / (its delta norm), so that every task's delta enters the merge
with the norm of the weakest one and none is amplified: a rule from the adapters alone, fixed before any merge ran,
for the case where one adapter's delta is many times the others' (BoolQ's, at LR 1e-1).

Every scored row also records ``top_share``: the share of the test items given the model's most frequent answer
(1.0: one answer for every item), and a ``majority`` row per task the share of the most frequent gold answer, so
that a merge that answers every item alike (and scores the majority share) is visible as such. ``--table`` prints
two means of the kept share: the issue's, over every task whose single adapter gained on zero-shot, and one over the
learned tasks alone (single adapter above zero-shot and above the most frequent answer), since a gain of a point or
two (an adapter that learned the majority answer) makes the share a ratio of noise.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import statistics
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch

TASKS = ("sst2", "rte", "cb", "boolq")
STUDY = Path(__file__).resolve().parent / "smollm2_study.json"
DENSITY = 0.5
MERGES = {  # name: (method, mask set, combination_type, density[, weighting]); in the order they are evaluated
    "randmask-linear": ("randmask", "independent", "linear", None),
    "randmask-ties": ("randmask", "independent", "ties", DENSITY),
    "lora-linear": ("lora", None, "linear", None),
    "lora-ties": ("lora", None, "ties", DENSITY),
    "lora-dare_linear": ("lora", None, "dare_linear", DENSITY),
    "lora-cat": ("lora", None, "cat", None),
    "lora-dare_ties": ("lora", None, "dare_ties", DENSITY),
    "randmask-dare_linear": ("randmask", "independent", "dare_linear", DENSITY),
    "randmask-dare_ties": ("randmask", "independent", "dare_ties", DENSITY),
    "randmask-disjoint-linear": ("randmask", "disjoint", "linear", None),
    "randmask-disjoint-ties": ("randmask", "disjoint", "ties", DENSITY),
    "randmask-shared-linear": ("randmask", "shared", "linear", None),
    "randmask-shared-ties": ("randmask", "shared", "ties", DENSITY),
    "randmask-linear-min-norm": ("randmask", "independent", "linear", None, "min-norm"),
    "lora-linear-min-norm": ("lora", None, "linear", None, "min-norm"),
}
MAX_ADAPTER_BYTES = 8 * 135_000_000 + 2**20  # SmolLM2-135M's every parameter in fp64, plus a header
COMMITTED_RUNS = Path(__file__).resolve().parent / "results" / "merge_runs"  # finished runs, committed
PART = {"cb": 0, "rte": 1, "sst2": 2, "boolq": 3}  # experiments/merge_train.sh: mask seed / part per task


def _run_config(task: str, method: str = "zeroshot", **extra):
    from randmask_lab.experiment.run.config import RunConfig

    study = json.loads(STUDY.read_text())
    protocol = {k: v for k, v in study["protocol"][task].items()}
    return RunConfig(model=study["model"], task=task, method=method, seed=0, precision="32", device="cpu",
                     **study["common"], **protocol, **extra)


def find_adapters(runs: list[Path], method: str, mask_set: str | None) -> dict[str, dict]:
    """{task: record} of the finished single-task runs of one method (and randmask mask set), each record with
    ``folder``: the run folder it was read from. The folders in ``runs`` are searched in order and the first run
    found for a task is kept: a training output folder first, then the committed copies
    (experiments/results/merge_runs), so that a fresh machine evaluates what an earlier one trained."""
    found: dict[str, dict] = {}
    for path in (p for folder in runs for p in sorted(folder.glob("*/record.json"))):
        rec = json.loads(path.read_text())
        cfg = rec["config"]
        if rec["status"] != "done" or cfg["method"] != method or cfg["precision"] != "32" or cfg["seed"] != 0:
            continue
        if method == "randmask":
            partition = cfg["method_options"].get("partition")
            mask_seed = cfg["mask_seed"] if cfg["mask_seed"] is not None else cfg["seed"]
            want = {"independent": (None, PART[cfg["task"]]), "disjoint": (f"{PART[cfg['task']]}/4", 0),
                    "shared": (None, 0)}[mask_set]
            if (partition, mask_seed) != want:
                continue
        found.setdefault(cfg["task"], {**rec, "folder": str(path.parent)})
    return found


def adapter_dirs(adapters: dict[str, dict]) -> dict[str, Path]:
    """{task: its run's adapter folder}, for the records ``find_adapters`` returns."""
    return {task: Path(rec["folder"]) / "adapter" for task, rec in adapters.items()}


class Scorer:
    """Each task's test items and objective, built once; ``score(model, task)`` is the lab's test metric."""

    def __init__(self) -> None:
        from randmask_lab.experiment.compute.precision import PrecisionPlan
        from randmask_lab.experiment.parts.assemble import check_names, load_data, make_objective, sample_splits
        from randmask_lab.zoo import load_causal_lm

        self.plan = PrecisionPlan("32", torch.device("cpu"))
        _, tokenizer = load_causal_lm("smollm2-135m")
        self.tasks = {}
        for task in TASKS:
            config = _run_config(task)
            spec = check_names(config)
            data = load_data(config, spec, "lm", tokenizer, sample_splits(config, spec))
            self.tasks[task] = (data.test, make_objective(config, data, tokenizer))

    def score(self, model, task: str) -> dict[str, float]:
        """``{"metric": the lab's test metric, "top_share": share of items given the most frequent answer}``."""
        from randmask_lab.experiment.compute.distributed import DistContext
        from randmask_lab.experiment.training.loop import predict

        items, objective = self.tasks[task]
        preds = predict(model, objective, self.plan, DistContext(), items, True)[1]  # one process, on the CPU
        return {"metric": objective.metric(preds, items), "top_share": top_share(preds)}

    def majority(self, task: str) -> float | None:
        """Share of the most frequent gold answer in ``task``'s test items (None for free-text answers)."""
        items = self.tasks[task][0]
        return top_share([x.gold for x in items]) if items[0].gold is not None else None


def top_share(answers: list) -> float:
    """Share of ``answers`` equal to the most frequent one."""
    return max(Counter(map(str, answers)).values()) / len(answers)


def base_model():
    from randmask_lab.experiment.compute.precision import PrecisionPlan
    from randmask_lab.zoo import load_causal_lm

    model, _ = load_causal_lm("smollm2-135m", dtype=torch.float32)
    PrecisionPlan("32", torch.device("cpu")).setup_attention(model)  # as the training runs did
    return model.eval()


def min_norm_weights(norms: dict[str, float]) -> list[float]:
    """Per task (in TASKS order): the smallest delta norm over its own, so each weighted delta has that norm."""
    return [min(norms.values()) / norms[t] for t in TASKS]


def lora_delta_norms(peft_model) -> dict[str, float]:
    """{adapter: Frobenius norm of its whole delta, sqrt(sum over layers of ||scale * B @ A||^2)}."""
    from peft.tuners.lora import LoraLayer

    squares = dict.fromkeys(TASKS, 0.0)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for task in TASKS:
                squares[task] += float(module.get_delta_weight(task).double().pow(2).sum())
    return {t: v ** 0.5 for t, v in squares.items()}


def load_lora(model: torch.nn.Module, dirs: dict[str, Path]):
    """A PeftModel over ``model`` holding every task's LoRA adapter, each named after its task."""
    from peft import PeftModel
    from safetensors import SafetensorError

    task = TASKS[0]
    try:
        peft_model = PeftModel.from_pretrained(model, dirs[task], adapter_name=task)
        for task in TASKS[1:]:
            peft_model.load_adapter(dirs[task], adapter_name=task)
    except (SafetensorError, OSError, ValueError) as e:  # a damaged adapter: one line naming it, not a traceback
        raise SystemExit(f"cannot load the LoRA adapter in {dirs[task]} ({e}); retrain it with "
                         "experiments/merge_train.sh or restore it from git") from None
    return peft_model


def merged_model(method: str, adapters: dict[str, dict], combination: str, density: float | None,
                 weighting: str = "equal") -> tuple[torch.nn.Module, list[float]]:
    """A fresh base model with the four adapters loaded and their merge active, and the weights it used."""
    model = base_model()
    dirs = adapter_dirs(adapters)
    if method == "randmask":
        import randmask

        for task in TASKS:
            randmask.load_adapter(model, dirs[task], adapter_name=task)
        weights = min_norm_weights(value_norms(adapters)) if weighting == "min-norm" else [1.0] * len(TASKS)
        randmask.add_weighted_adapter(model, list(TASKS), weights, "merged", combination_type=combination,
                                      density=density)
        randmask.set_adapter(model, "merged")
        return model, weights
    peft_model = load_lora(model, dirs)
    weights = min_norm_weights(lora_delta_norms(peft_model)) if weighting == "min-norm" else [1.0] * len(TASKS)
    kwargs = {"density": density} if density is not None else {}
    torch.manual_seed(0)  # PEFT's DARE draws from the global generator
    peft_model.add_weighted_adapter(list(TASKS), weights, "merged", combination_type=combination, **kwargs)
    peft_model.set_adapter("merged")
    return peft_model.eval(), weights


def mask_overlap(adapters: dict[str, dict]) -> dict:
    """How many kept entries the four randmask masks share (issue: independent masks overlap on ~d^2)."""
    import randmask

    model, dirs = base_model(), adapter_dirs(adapters)
    for task in TASKS:
        randmask.load_adapter(model, dirs[task], adapter_name=task)
    total = shared = 0
    for layer in randmask.masked_layers(model).values():
        idx = torch.cat([layer.adapters[t].indices for t in TASKS])
        counts = torch.unique(idx, return_counts=True)[1]
        total += idx.numel()
        shared += int(counts[counts > 1].sum())
    return {"entries": total, "in_two_or_more_masks": shared, "share": shared / total}


def value_norms(adapters: dict[str, dict]) -> dict[str, float]:
    """{task: L2 norm of its randmask adapter's values}: how strongly each delta pulls a merge at equal weights."""
    from randmask_lab.methods.trainable import read_tensors

    norms = {}
    for task, folder in adapter_dirs(adapters).items():  # through the project's bounded reader, as every file
        tensors = read_tensors(folder / "adapter.safetensors", MAX_ADAPTER_BYTES)
        values = [t.double().flatten() for name, t in tensors.items() if name.endswith("values")]
        norms[task] = float(torch.cat(values).norm())
    return norms


def _save(path: Path, rows: list[dict]) -> None:
    from randmask import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())


@contextlib.contextmanager
def exclusive(out: Path):
    """Hold ``<out>.lock`` for the whole evaluation: two processes rewriting one --out would lose rows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another merge_eval.py is writing {out}; wait for it, or pass another --out") from None
        yield


def evaluate_all(args) -> None:
    from randmask_lab.experiment.results.record import code_version

    rows = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    done = {(r["row"], r.get("name"), r.get("task")) for r in rows}
    rows.append({"row": "meta", "command": " ".join(sys.argv), "code_version": code_version("cpu"),
                 "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    scorer = Scorer()
    if not all(("zeroshot", None, t) in done for t in TASKS):
        model = base_model()
        for task in TASKS:
            rows.append({"row": "zeroshot", "task": task, **scorer.score(model, task)})
            _save(args.out, rows)
        del model
    for task in TASKS:
        if ("majority", None, task) not in done:
            rows.append({"row": "majority", "task": task, "metric": scorer.majority(task)})
    for name in args.merges:
        method, mask_set, combination, density, weighting = (*MERGES[name], "equal")[:5]
        adapters = find_adapters(args.runs, method, mask_set)
        for task, rec in adapters.items():  # every finished single-task run, even while others still train
            if ("single", f"{method}-{mask_set}", task) not in done:
                rows.append({"row": "single", "name": f"{method}-{mask_set}", "task": task, "run_id": rec["run_id"],
                             "lr": rec["config"]["lr"], "metric": rec["test_metric"]})
                done.add(("single", f"{method}-{mask_set}", task))
        if set(adapters) != set(TASKS):
            print(f"{name}: adapters for {sorted(set(TASKS) - set(adapters))} not trained yet; merge skipped")
            continue
        if method == "randmask" and ("overlap", mask_set, None) not in done:
            rows.append({"row": "overlap", "name": mask_set, **mask_overlap(adapters)})
            done.add(("overlap", mask_set, None))
        if all(("merge", name, t) in done for t in TASKS):
            continue
        started = time.time()
        model, weights = merged_model(method, adapters, combination, density, weighting)
        for task in TASKS:
            rows.append({"row": "merge", "name": name, "method": method, "mask_set": mask_set, "task": task,
                         "combination_type": combination, "density": density, "weighting": weighting,
                         "weights": weights, **scorer.score(model, task)})
            _save(args.out, rows)
        print(f"{name}: {time.time() - started:.0f} s")
        del model
    _save(args.out, rows)


def table(path: Path) -> str:
    """Markdown: per merge, each task's metric and kept share of the single adapter's gain, and the mean share."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    zero = {r["task"]: r["metric"] for r in rows if r["row"] == "zeroshot"}
    single = {(r["name"], r["task"]): r["metric"] for r in rows if r["row"] == "single"}
    majority = {r["task"]: r["metric"] for r in rows if r["row"] == "majority"}
    merges: dict[str, dict[str, float]] = {}
    one_answer = {(r["name"], r["task"]) for r in rows if r["row"] == "merge" and r.get("top_share") == 1.0}
    for r in rows:
        if r["row"] == "merge":
            merges.setdefault(r["name"], {})[r["task"]] = r["metric"]
    head = ("| model | " + " | ".join(TASKS) + " | mean share kept | mean share kept, learned tasks |\n|---|"
            + "---|" * (len(TASKS) + 2) + "\n")
    lines = ["| zero-shot | " + " | ".join(f"{zero[t]:.3f}" for t in TASKS) + " | | |"]
    if majority:
        lines.append("| the most frequent answer, for every item | "
                     + " | ".join(f"{majority[t]:.3f}" if majority.get(t) is not None else "" for t in TASKS)
                     + " | | |")
    for name in sorted({n for n, _ in single}):
        cells = [f"{single[(name, t)]:.3f}" if (name, t) in single else "not trained yet" for t in TASKS]
        lines.append(f"| single {name.removesuffix('-None')} | " + " | ".join(cells) + " | | |")
    for name, metrics in merges.items():
        if len(metrics) < len(TASKS):
            continue
        method, mask_set = MERGES[name][:2]
        cells, shares, learned = [], [], []
        for t in TASKS:
            gain = single[(f"{method}-{mask_set}", t)] - zero[t]
            share = (metrics[t] - zero[t]) / gain if gain > 0 else None
            if share is not None:
                shares.append(share)
                if single[(f"{method}-{mask_set}", t)] > (majority.get(t) or 0.0):  # more than one answer for all
                    learned.append(share)
            mark = " †" if (name, t) in one_answer else ""
            cells.append(f"{metrics[t]:.3f}{mark} ({100 * share:.0f}%)" if share is not None
                         else f"{metrics[t]:.3f}{mark} (n/a)")
        means = [f"{100 * statistics.mean(x):.0f}%" if x else "n/a" for x in (shares, learned)]
        learned_cell = f" {means[1]} |" if majority else " |"
        lines.append(f"| merge {name} | " + " | ".join(cells) + f" | {means[0]} |" + learned_cell)
    overlaps = [f"{r['name']} masks: {r['in_two_or_more_masks']:,} of {r['entries']:,} kept entries "
                f"({100 * r['share']:.3f}%) lie in two or more masks" for r in rows if r["row"] == "overlap"]
    notes = overlaps + (["† the merged model gave every test item the same answer"] if one_answer else [])
    if majority:
        notes.append("learned tasks: those whose single adapter beats zero-shot and the most frequent answer")
    return head + "\n".join(lines) + "\n" + "".join(f"\n{o}" for o in notes) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", default=[Path("runs/merge"), COMMITTED_RUNS],
                        help="folders of single-task run folders, searched in order")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/merge_study.jsonl"))
    parser.add_argument("--merges", nargs="+", default=list(MERGES), choices=list(MERGES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="print the table from --out and exit")
    parser.add_argument("--norms", action="store_true",
                        help="print the L2 norm of each independent-mask randmask adapter's values (and of each LoRA "
                             "adapter's delta, when all four are trained) and exit")
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
        return
    if args.norms:
        adapters = find_adapters(args.runs, "randmask", "independent")
        if not adapters:
            raise SystemExit(f"no finished randmask run (independent masks) in {', '.join(map(str, args.runs))}; "
                             "train them with experiments/merge_train.sh or point --runs at their folder")
        try:
            norms = value_norms(adapters)
        except ValueError as e:  # a damaged or oversized adapter file: one line, not a traceback
            raise SystemExit(str(e)) from None
        for task, norm in norms.items():
            print(f"{task}: L2 norm of the values {norm:.1f}")
        lora = find_adapters(args.runs, "lora", None)
        if set(lora) == set(TASKS):
            for task, norm in lora_delta_norms(load_lora(base_model(), adapter_dirs(lora))).items():
                print(f"{task}: LoRA delta, Frobenius norm {norm:.1f}")
        return
    torch.set_num_threads(args.threads)
    import randmask.peft  # noqa: F401  (randmask's PEFT registration, for completeness of the environment)

    with exclusive(args.out):
        try:
            evaluate_all(args)
        except randmask.MaskingError as e:  # a damaged or foreign randmask adapter: the library's one line
            raise SystemExit(str(e)) from None
    print(table(args.out))


if __name__ == "__main__":
    main()
