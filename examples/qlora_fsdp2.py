"""randmask over a 4-bit NF4 base sharded with FSDP2, as torchtune's QLoRA-FSDP2 recipe shards LoRA.

The decoder's Linear weights become torchao ``NF4Tensor``s (4-bit, frozen); randmask trains its values beside them
(the delta path); ``fully_shard`` each decoder layer, then the root. Each rank trains on its own rows; rank 0
writes the adapter (every rank calls ``save_adapter``: the values are gathered).

    torchrun --nproc-per-node 2 examples/qlora_fsdp2.py      # 2 processes (gloo on CPU, nccl on GPUs)
    python examples/qlora_fsdp2.py                           # one process: the same, without sharding
"""

from __future__ import annotations

import os
import random

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torchao.prototype._nf4tensor_api import NF4WeightOnlyConfig  # torchao 0.18's home of the NF4 config
from torchao.quantization import quantize_

from _common import accuracy, common_args, lm_features, load, sst2_prompts
from randmask import MaskingConfig, apply_masking, masking_summary, save_adapter


def main() -> None:
    parser = common_args(__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=1e-3, help="trainable share of ALL parameters (the paper's)")
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW LR: sparse masks want large ones")
    args = parser.parse_args()
    sharded = "WORLD_SIZE" in os.environ  # started by torchrun
    if sharded:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    torch.manual_seed(0)
    model, tokenizer = load(args.model)
    train, test = sst2_prompts(args)

    nf4 = NF4WeightOnlyConfig()  # QLoRA's blocks of 64 weights per scale; the scales in groups of 4, which
    nf4.block_size, nf4.scaler_block_size = 64, 4  # SmolLM2's 576-wide matrices divide (torchtune's 256 does not)
    quantize_(model.model, nf4)  # every decoder Linear: a frozen NF4Tensor (embeddings and head stay float)
    # The masks are drawn from the seed: every rank draws the same ones, before sharding.
    model = apply_masking(model, MaskingConfig(targets=["q_proj", "v_proj"], trainable_ratio=args.ratio, seed=0))
    if rank == 0:
        print(masking_summary(model))
    if sharded:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    order = random.Random(0)
    model.train()
    for step in range(args.max_steps):
        rows = order.sample(train, world)  # the same draw on every rank; each takes its own row
        row = rows[rank]
        f = {k: torch.tensor([v]) for k, v in lm_features(tokenizer, row["prompt"], row["completion"]).items()}
        loss = model(**f).loss  # NF4 base forward + the sparse delta beside it
        loss.backward()  # FSDP2 averages the values' gradients over the ranks
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and (step % 10 == 0 or step == args.max_steps - 1):
            print(f"step {step}: loss {loss.item():.4f} (rank 0's row)")
    save_adapter(model, args.out)  # every rank calls it; rank 0 writes
    score = accuracy(model, tokenizer, test)  # every rank: a sharded forward gathers from all of them
    if rank == 0:
        print(f"test accuracy after {args.max_steps} steps: {100 * score:.1f}")
        print(f"adapter saved in {args.out}")
    if sharded:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
