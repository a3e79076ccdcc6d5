#!/bin/bash
# Issue 4 on MiniLM-L6 + head, RTE (needs the RTE runs of paper_minilm.sh in $RUNS):
#   before: λ_max at the pretrained weights + the LR suggestion at calibration 1 (suggest-lr runs the same power
#           iteration as `randmask hessian`), for randmask at 3 budgets, full fine-tuning and LoRA;
#   after:  λ_max at the trained weights of each cell's best-LR run, and the distance travelled;
#   then Fig. 4a/4b and the table (randmask figure4).
# The head trains in every method, so it is held fixed (--freeze-head): λ is w.r.t. the method's own parameters.
# Loss: 2 batches of 8 RTE training prompts (the run's data seed and first-epoch order).
set -euo pipefail
RUNS=${RUNS:-runs/paper/minilm}
OUT=${OUT:-runs/paper/analysis}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
POWER="--freeze-head --num-batches 2 --batch-size 8 --tol 1e-3 --max-iter 60"
M="--model minilm-l6 --task rte $POWER"
for r in 1e-3 1e-4 1e-5; do
  randmask suggest-lr $M --method randmask --trainable-ratio $r --calibration 1 --out "$OUT/before/randmask_$r"
done
for m in full lora; do randmask suggest-lr $M --method $m --calibration 1 --out "$OUT/before/$m"; done
REFERENCE=$(python -c "from randmask_lab.zoo import resolve_model_path; print(resolve_model_path('minilm-l6'))")/model.safetensors
randmask report --out-dir "$RUNS" --task rte --best-runs | while IFS=$'\t' read -r task label lr dir; do
  case $label in full|randmask_*) ;; *) continue;; esac
  randmask hessian --adapter "$dir" $POWER --out "$OUT/after/$label" < /dev/null
  ref=(); [ "$label" = full ] && ref=(--reference "$REFERENCE")
  randmask distance --adapter "$dir" --freeze-head "${ref[@]}" --out "$OUT/after/$label" < /dev/null
done
randmask figure4 "$OUT" --out "$OUT"
