"""Load a saved randmask adapter onto its base model, check it, then merge it into the weights.

    python examples/plain_loop.py --out outputs/example       # makes the adapter
    python examples/load_and_merge.py --adapter outputs/example --merged outputs/merged
"""

from __future__ import annotations

import argparse

import torch

from _common import load
from randmask import load_adapter, merge_and_unload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="the base the adapter was trained on")
    parser.add_argument("--adapter", default="outputs/example", help="a folder written by save_adapter")
    parser.add_argument("--merged", help="save the merged model here (save_pretrained), if given")
    args = parser.parse_args()
    base, tokenizer = load(args.model)
    ids = tokenizer("The film was a delight. It was", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = base(input_ids=ids).logits
    # Checks the file's checksums, the indices regenerated from its seed, and a fingerprint of this base.
    model = load_adapter(base, args.adapter)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    print(f"adapter changes the logits by up to {(adapted - before).abs().max().item():.3g}")
    merged = merge_and_unload(model)  # a plain transformers model, the delta inside its weights
    with torch.no_grad():
        same = torch.equal(merged(input_ids=ids).logits, adapted)
    print(f"merged model gives the adapted logits bit for bit: {same}")
    if args.merged:
        merged.save_pretrained(args.merged)
        tokenizer.save_pretrained(args.merged)
        print(f"merged model saved in {args.merged}")
    if not same:
        raise SystemExit("merged and adapted outputs differ")


if __name__ == "__main__":
    main()
