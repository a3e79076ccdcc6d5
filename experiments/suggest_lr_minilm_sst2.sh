#!/bin/bash
# Issue 4: the LR suggestion (calibration 1) on MiniLM-L6 + head, SST-2, to check the factor fitted on RTE.
set -euo pipefail
OUT=${OUT:-runs/paper/analysis-sst2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
M="--model minilm-l6 --task sst2 --freeze-head --num-batches 2 --batch-size 8 --tol 1e-3 --max-iter 60 --calibration 1"
for r in 1e-3 1e-4 1e-5; do
  randmask suggest-lr $M --method randmask --trainable-ratio $r --out "$OUT/before/randmask_$r"
done
for m in full lora; do randmask suggest-lr $M --method $m --out "$OUT/before/$m"; done
