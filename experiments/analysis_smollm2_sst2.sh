#!/bin/bash
# Issue 10's Fig. 4a/4b analogue on SmolLM2-135M, SST-2 prompts (LM mode), from the study's chosen runs
# (needs runs/study from experiments/smollm2_study.sh on this machine: the adapters are not in the JSONL):
#   before: λ_max at the pretrained weights + the LR suggestion at calibration 1, for randmask at 3 ratios,
#           full fine-tuning and LoRA;
#   after:  λ_max at the trained weights of each cell's chosen-LR run (seed 0), and the distance travelled;
#   then Fig. 4a/4b and the table (randmask figure4).
# Loss: 2 batches of 8 SST-2 training prompts. At the pretrained weights the largest-|λ| eigenvalue of this
# loss was negative (-76 on randmask 1e-3's subspace); `--which top` (the default) reports the largest
# algebraic one (a shifted re-run). One HVP is ~15 s on a shared core: up to ~30 min per measurement at these
# settings, so run it with the study paused. POWER overrides the power-iteration settings (a quick check:
# POWER="--num-batches 1 --batch-size 4 --max-iter 2 --tol 1e-1").
set -euo pipefail
RUNS=${RUNS:-runs/study}
OUT=${OUT:-runs/analysis_smollm2_sst2}
POWER=${POWER:-"--num-batches 2 --batch-size 8 --tol 1e-3 --max-iter 60"}
M="--model smollm2-135m --task sst2 $POWER"
for r in 1e-3 1e-4 1e-5; do
  randmask suggest-lr $M --method randmask --trainable-ratio $r --calibration 1 --out "$OUT/before/randmask_$r"
done
for m in full lora; do randmask suggest-lr $M --method $m --calibration 1 --out "$OUT/before/$m"; done
REFERENCE=$(python -c "from randmask_lab.zoo import resolve_model_path; print(resolve_model_path('smollm2-135m'))")/model.safetensors
randmask report --out-dir "$RUNS" --task sst2 --best-runs | while IFS=$'\t' read -r task label lr dir; do
  case $label in full|randmask_*) ;; *) continue;; esac
  randmask hessian --adapter "$dir" $POWER --out "$OUT/after/$label" < /dev/null
  ref=(); [ "$label" = full ] && ref=(--reference "$REFERENCE")
  randmask distance --adapter "$dir" "${ref[@]}" --out "$OUT/after/$label" < /dev/null
done
randmask figure4 "$OUT" --out "$OUT"
