"""randmask as a PEFT method, trained with the Hugging Face Trainer on SST-2 prompts.

    python examples/peft_trainer.py                   # SmolLM2-135M, q/v at 0.1%, 50 steps
    python examples/peft_trainer.py --max-steps 2 --n-train 16 --model <a small local model>
"""

from __future__ import annotations

import transformers
from datasets import Dataset
from peft import PeftModel, get_peft_model

import randmask.peft  # noqa: F401  (registers the PEFT type "RANDMASK")
from _common import accuracy, common_args, lm_features, load, sst2_prompts
from randmask.peft import RandMaskConfig


def main() -> None:
    args = common_args(__doc__.splitlines()[0]).parse_args()
    base, tokenizer = load(args.model)
    train, test = sst2_prompts(args)
    dataset = Dataset.from_list([lm_features(tokenizer, r["prompt"], r["completion"]) for r in train])

    model = get_peft_model(base, RandMaskConfig(target_modules=["q_proj", "v_proj"], trainable_ratio=1e-3))
    model.print_trainable_parameters()
    training = transformers.TrainingArguments(
        output_dir=f"{args.out}/trainer", max_steps=args.max_steps, learning_rate=1e-2, per_device_train_batch_size=4,
        lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_steps=10, use_cpu=True)
    collator = transformers.DataCollatorForSeq2Seq(tokenizer, padding=True)  # pads labels with -100
    transformers.Trainer(model=model, args=training, train_dataset=dataset, data_collator=collator).train()
    print(f"test accuracy: {100 * accuracy(model, tokenizer, test):.1f}")
    model.save_pretrained(args.out)  # values only
    reloaded = PeftModel.from_pretrained(load(args.model)[0], args.out)  # checks checksums and the base
    print(f"reloaded from {args.out}: test accuracy {100 * accuracy(reloaded, tokenizer, test):.1f}")


if __name__ == "__main__":
    main()
