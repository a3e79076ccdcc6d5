"""randmask with TRL's SFTTrainer: a small instruction set built from BoolQ (../shared/data), prompt-completion.

    python examples/trl_sft.py                        # SmolLM2-135M, q/v at 0.1%, 50 steps
    python examples/trl_sft.py --max-steps 2 --n-train 16 --model <a small local model>

It trains and saves the adapter; it does not evaluate (so it has no --n-test).
"""

from __future__ import annotations

import trl
from datasets import Dataset

import randmask.peft  # noqa: F401  (registers the PEFT type "RANDMASK")
from _common import common_args, load
from randmask.peft import RandMaskConfig
from randmask_lab.tasks import load_task_splits


def instructions(n: int, data_dir: str | None) -> list[dict[str, str]]:
    """BoolQ as instructions: {"prompt": passage + question, "completion": " yes" / " no"}."""
    splits = load_task_splits("boolq", data_seed=0, n_train=n, n_val=1, n_test=0, data_dir=data_dir)
    return [{"prompt": f"Read the passage and answer yes or no.\nPassage: {ex.fields['passage'][:600]}\n"
                       f"Question: {ex.fields['question']}?\nAnswer:",
             "completion": " yes" if ex.label == 1 else " no"} for ex in splits.train]


def main() -> None:
    args = common_args(__doc__.splitlines()[0], task="BoolQ", evaluates=False).parse_args()
    model, tokenizer = load(args.model)
    dataset = Dataset.from_list(instructions(args.n_train, args.data_dir))
    config = trl.SFTConfig(output_dir=f"{args.out}/sft", max_steps=args.max_steps, learning_rate=1e-2,
                           per_device_train_batch_size=4, lr_scheduler_type="constant", report_to=[],
                           save_strategy="no", logging_steps=10, use_cpu=True, max_length=512)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=RandMaskConfig(target_modules=["q_proj", "v_proj"], trainable_ratio=1e-3))
    trainer.train()
    trainer.model.save_pretrained(args.out)
    print(f"adapter saved in {args.out}")


if __name__ == "__main__":
    main()
