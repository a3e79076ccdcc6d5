#!/bin/bash
# Paper Fig. 4a/4b for one model and task, from a finished set of runs (analysis_minilm_rte.sh and
# analysis_smollm2_sst2.sh set the variables and call this):
#   before: λ_max at the pretrained weights + the LR suggestion at calibration 1 (suggest-lr runs the same power
#           iteration as `randmask hessian`), for randmask at 3 budgets, full fine-tuning and LoRA;
#   after:  λ_max at the trained weights of each cell's best-LR run, and the distance travelled;
#   then Fig. 4a/4b and the table (randmask figure4).
# Variables: MODEL, TASK, RUNS (the runs' out-dir), OUT, POWER (power-iteration flags), DISTANCE_FLAGS
# (extra `randmask distance` flags, e.g. --freeze-head), WHICH (top: the largest eigenvalue, measured
# before training by suggest-lr; magnitude: the Hessian norm max |λ|, the paper's quantity, measured
# by `randmask hessian --which magnitude` before and after).
set -euo pipefail
: "${MODEL:?}" "${TASK:?}" "${RUNS:?}" "${OUT:?}" "${POWER:?}"
DISTANCE_FLAGS=${DISTANCE_FLAGS:-}
WHICH=${WHICH:-top}
M="--model $MODEL --task $TASK $POWER"
before() {  # before OUT_NAME METHOD_FLAGS...: the measurement at the pretrained weights
  local name=$1; shift
  if [ "$WHICH" = top ]; then randmask suggest-lr $M "$@" --calibration 1 --out "$OUT/before/$name"
  else randmask hessian $M "$@" --which "$WHICH" --out "$OUT/before/$name"; fi
}
for r in 1e-3 1e-4 1e-5; do before "randmask_$r" --method randmask --trainable-ratio $r; done
for m in full lora; do before "$m" --method $m; done
REFERENCE=$(python -c "from randmask_lab.zoo import resolve_model_path; print(resolve_model_path('$MODEL'))")/model.safetensors
randmask report --out-dir "$RUNS" --task "$TASK" --best-runs | while IFS=$'\t' read -r task label lr dir; do
  case $label in full|randmask_*) ;; *) continue;; esac
  randmask hessian --adapter "$dir" $POWER --which "$WHICH" --out "$OUT/after/$label" < /dev/null
  ref=(); [ "$label" = full ] && ref=(--reference "$REFERENCE")
  randmask distance --adapter "$dir" $DISTANCE_FLAGS "${ref[@]}" --out "$OUT/after/$label" < /dev/null
done
randmask figure4 "$OUT" --out "$OUT"
