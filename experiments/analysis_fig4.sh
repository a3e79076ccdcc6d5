#!/bin/bash
# Paper Fig. 4a/4b for one model and task, from a finished set of runs (analysis_minilm_rte.sh and
# analysis_smollm2_sst2.sh set the variables and call this):
#   before: λ_max at the pretrained weights + the LR suggestion at calibration 1 (suggest-lr runs the same power
#           iteration as `randmask hessian`), for randmask at 3 budgets, full fine-tuning and LoRA;
#   after:  λ_max at the trained weights of each cell's best-LR run (full, LoRA, randmask), and the distance
#           travelled (LoRA: its merged delta);
#   then Fig. 4a/4b and the table (randmask figure4).
# Variables: MODEL, TASK, RUNS (the runs' out-dir), OUT, POWER (power-iteration flags), DISTANCE_FLAGS
# (extra `randmask distance` flags, e.g. --freeze-head), WHICH (top: the largest eigenvalue, measured
# before training by suggest-lr; magnitude: the Hessian norm max |λ|, the paper's quantity, measured
# by `randmask hessian --which magnitude` before and after), SEEDS (default "0": the seeds to measure; a
# seed sets the mask and the batch sample, and "after" uses that seed's run at the chosen LR). Resumable:
# a measurement whose JSON exists is skipped. Layout: $OUT/{before,after}/<cell>/seed<S>/.
set -euo pipefail
: "${MODEL:?}" "${TASK:?}" "${RUNS:?}" "${OUT:?}" "${POWER:?}"
DISTANCE_FLAGS=${DISTANCE_FLAGS:-}
WHICH=${WHICH:-top}
SEEDS=${SEEDS:-0}
M="--model $MODEL --task $TASK $POWER"
before() {  # before OUT_DIR METHOD_FLAGS...: the measurement at the pretrained weights
  local out=$1; shift
  if [ "$WHICH" = top ]; then
    [ -f "$out/suggest_lr.json" ] || randmask suggest-lr $M "$@" --calibration 1 --out "$out"
  else
    [ -f "$out/hessian.json" ] || randmask hessian $M "$@" --which "$WHICH" --out "$out"
  fi
}
for s in $SEEDS; do
  for r in 1e-3 1e-4 1e-5; do before "$OUT/before/randmask_$r/seed$s" --method randmask --trainable-ratio $r --seed $s; done
  for m in full lora; do before "$OUT/before/$m/seed$s" --method $m --seed $s; done
done
REFERENCE=$(python -c "from randmask_lab.zoo import resolve_model_path; print(resolve_model_path('$MODEL'))")/model.safetensors
randmask report --out-dir "$RUNS" --task "$TASK" --best-runs --all-seeds | while IFS=$'\t' read -r task label lr dir seed; do
  case $label in full|lora|randmask_*) ;; *) continue;; esac
  case " $SEEDS " in *" $seed "*) ;; *) continue;; esac
  out="$OUT/after/$label/seed$seed"
  [ -f "$out/hessian.json" ] || randmask hessian --adapter "$dir" $POWER --which "$WHICH" --out "$out" < /dev/null
  ref=(); case $label in full|lora) ref=(--reference "$REFERENCE");; esac  # lora: its delta merged, then compared
  [ -f "$out/distance.json" ] || randmask distance --adapter "$dir" $DISTANCE_FLAGS "${ref[@]}" --out "$out" < /dev/null
done
randmask figure4 "$OUT" --out "$OUT"
