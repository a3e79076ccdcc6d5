#!/bin/bash
# Issue 4, the paper's longer-training study (Fig. 4b right) on MiniLM-L6 + head, SST-2: randmask at 0.01% of all
# parameters with LRs below its best (0.1 in paper_minilm.sh's grid) trained for 12 epochs; the validation score
# per epoch shows whether small LRs fail by underfitting (still rising) or by generalising worse.
set -euo pipefail
OUT=${OUT:-runs/paper/longer}
randmask sweep --models minilm-l6 --tasks sst2 --methods randmask --ratios 1e-4 --lrs 3e-3 1e-2 1e-1 --seeds 0 \
  --n-train 500 --n-val 200 --n-test 1000 --epochs 12 --head-lr 1e-3 --eval-initial --threads 1 --eval-batch-size 64 \
  --out-dir "$OUT" --no-progress
randmask curves --out-dir "$OUT" --task sst2 --out "$OUT/curves.png"
