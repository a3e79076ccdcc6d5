"""The free-function API with a plain PyTorch loop: mask q/v of a causal LM, train on SST-2 prompts, save.

    python examples/plain_loop.py                     # SmolLM2-135M, 0.1% of its parameters, 50 steps
    python examples/plain_loop.py --max-steps 2 --n-train 16 --model <a small local model>
"""

from __future__ import annotations

import random

import torch

from _common import accuracy, common_args, lm_features, load, sst2_prompts
from randmask import MaskingConfig, apply_masking, masking_summary, save_adapter


def main() -> None:
    parser = common_args(__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=1e-3, help="trainable share of ALL parameters (the paper's)")
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW LR: sparse masks want large ones")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load(args.model)
    train, test = sst2_prompts(args)

    model = apply_masking(model, MaskingConfig(targets=["q_proj", "v_proj"], trainable_ratio=args.ratio, seed=0))
    print(masking_summary(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    order = random.Random(0)
    model.train()
    for step in range(args.max_steps):
        row = order.choice(train)
        f = {k: torch.tensor([v]) for k, v in lm_features(tokenizer, row["prompt"], row["completion"]).items()}
        loss = model(**f).loss  # the frozen dense forward; values get their gradient through the sparse op
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == args.max_steps - 1:
            print(f"step {step}: loss {loss.item():.4f}")
    print(f"test accuracy after {args.max_steps} steps: {100 * accuracy(model, tokenizer, test):.1f}")
    save_adapter(model, args.out)  # values + config: a few KB
    print(f"adapter saved in {args.out}")


if __name__ == "__main__":
    main()
