#!/bin/bash
# Issue 3 grid: MiniLM-L6 + classification head on SST-2, RTE, CB; seed 0; reduced protocol (2 CPU cores):
#   SST-2: 500 train / 200 val / its 872 validation rows as test; RTE, CB: 256 train / 100 val / all validation
#   rows as test (277, 56; CB's train split has 250 rows, so the sizes shrink to fit, as the run notes say);
#   3 epochs, batch 8, AdamW, constant LR; head (pooler + classifier) at LR 1e-3 in every method.
# Usage: OUT=runs/paper/minilm bash experiments/paper_minilm.sh; then randmask report --out-dir $OUT
set -euo pipefail
OUT=${OUT:-runs/paper/minilm}
COMMON="--models minilm-l6 --seeds 0 --epochs 3 --head-lr 1e-3 --threads 1 --eval-batch-size 64 --out-dir $OUT --no-progress"
sizes() { case $1 in sst2) echo "--n-train 500 --n-val 200 --n-test 1000";; *) echo "--n-train 256 --n-val 100 --n-test 1000";; esac; }
for task in ${TASKS:-sst2 rte cb}; do
  S="$COMMON --tasks $task $(sizes "$task")"
  randmask sweep $S --methods full --lrs 1e-5 3e-5 1e-4
  randmask sweep $S --methods lora --lrs 3e-4 1e-3 3e-3
  # (time: CB's 1e-3 grid starts at 3e-3, RTE's and CB's 1e-4 grids at 3e-2)
  randmask sweep $S --methods randmask --ratios 1e-3 --lrs $([ "$task" = cb ] || echo 1e-3) 3e-3 1e-2 3e-2
  randmask sweep $S --methods randmask --ratios 1e-4 --lrs $([ "$task" = sst2 ] && echo 1e-2) 3e-2 1e-1 3e-1
  randmask sweep $S --methods randmask --ratios 1e-5 --lrs 3e-2 1e-1 3e-1
done
randmask report --out-dir "$OUT"
