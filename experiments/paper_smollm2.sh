#!/bin/bash
# Issue 3 grid: SmolLM2-135M, prompt scoring (MeZO-style templates), SST-2, CB, RTE; seed 0; zero-shot too.
# Reduced protocol (a training step of 8 RTE prompts takes ~10 s on one CPU core):
#   SST-2: 256 train / 64 val / 500 test; CB, RTE: 64 train / 32 val / 128 test (CB: its 56 validation rows);
#   2 epochs, batch 8, AdamW, constant LR; a 2-point LR grid per method and budget.
# Usage: OUT=runs/paper/smollm2 bash experiments/paper_smollm2.sh; then randmask report --out-dir $OUT
set -euo pipefail
OUT=${OUT:-runs/paper/smollm2}
COMMON="--models smollm2-135m --seeds 0 --epochs 2 --threads 1 --out-dir $OUT --no-progress"
sizes() { case $1 in sst2) echo "--n-train 256 --n-val 64 --n-test 500";; *) echo "--n-train 64 --n-val 32 --n-test 128";; esac; }
for task in ${TASKS:-sst2 cb rte}; do
  S="$COMMON --tasks $task $(sizes "$task")"
  randmask sweep $S --methods zeroshot
  randmask sweep $S --methods randmask --ratios 1e-3 --lrs 1e-3 1e-2
  randmask sweep $S --methods randmask --ratios 1e-4 --lrs 1e-2 1e-1
  randmask sweep $S --methods randmask --ratios 1e-5 --lrs 3e-2 3e-1
  randmask sweep $S --methods lora --lrs 1e-4 1e-3
  # (time: full fine-tuning steps cost ~3x; on CB and RTE only its LR 1e-5 was run)
  if [ "$task" = sst2 ]; then randmask sweep $S --methods full --lrs 1e-5 1e-4; else randmask sweep $S --methods full --lrs 1e-5; fi
done
randmask report --out-dir "$OUT"
