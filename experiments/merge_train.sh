#!/usr/bin/env bash
# Issue 25: the single-task adapters that experiments/merge_eval.py merges. SmolLM2-135M on SST-2, RTE, CB
# and BoolQ, seed 0 (data and order), each method at the LR the committed study chose for it (README table),
# with the study's per-task protocol (experiments/smollm2_study.json) but --precision 32: this CPU has no
# native bf16 (a bf16 matmul is ~48x slower than fp32 here). One run at a time, at nice 10 (NICE=...),
# THREADS=1 by default (THREADS=2 on an idle machine).
# Resumable, within a session and across sessions: every run's result lands in $OUT/results.sqlite and its run
# folder ($OUT/<run id>/); rerunning this script hands a finished run back from that store without training
# (one line in the log) and resumes a killed run from its last checkpoint (every 10 steps and at each epoch's
# end). On a fresh machine, bring the $OUT folder along (copy runs/merge, or point OUT= at it) and run the
# script again: only the runs not yet finished train. Run ids do not depend on OUT, THREADS or NICE.
# The finished single-task runs are also committed (adapter, record, config) in experiments/results/merge_runs/,
# so that a fresh machine keeps them; the runner does not yet take them back into a store (to do: an importer).
# Usage: PYTHON=.venv/bin/python OUT=runs/merge THREADS=1 nohup experiments/merge_train.sh >> runs/merge/train.log 2>&1 &
# Three randmask sets at ratio 1e-3:
#   independent: mask seeds 0-3, one per task (independent masks: two overlap on ~d^2 of their entries);
#   disjoint:    mask seed 0, --option partition=k/4 (part k of 4 disjoint parts of one draw);
#   shared:      mask seed 0 for every task (the same mask: every entry overlaps).
set -euo pipefail
OUT="${OUT:-runs/merge}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"  # this checkout's code trains (partition=k/n needs it), not an installed one
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
read -r -a RM <<< "${RANDMASK:-${PYTHON:-python} -m randmask_lab.cli}"
common=(--model smollm2-135m --seed 0 --precision 32 --batch-size 8 --mode lm --max-length 512 --epochs 3
        --out-dir "$OUT" --threads "${THREADS:-1}" --checkpoint-every 10 --no-progress)
declare -A PROTO=([sst2]="--n-train 500 --n-val 250 --n-test 500" [rte]="--n-train 250 --n-val 125 --n-test 277"
                  [cb]="--n-train 200 --n-val 50 --n-test 56"
                  [boolq]="--n-train 250 --n-val 125 --n-test 500 --group-by-length")
declare -A RANDMASK_LR=([sst2]=1e-2 [rte]=1e-2 [cb]=3e-2 [boolq]=1e-1)
declare -A LORA_LR=([sst2]=1e-3 [rte]=3e-3 [cb]=3e-3 [boolq]=1e-4)
declare -A PART=([cb]=0 [rte]=1 [sst2]=2 [boolq]=3)  # mask seed (independent set) and part (disjoint set)
run() {  # task, then method arguments
  local task=$1; shift
  echo "== $(date -u +%FT%TZ) $task $*"
  # shellcheck disable=SC2086
  nice -n "${NICE:-10}" "${RM[@]}" train "${common[@]}" --task "$task" ${PROTO[$task]} "$@"
}
for task in cb rte sst2 boolq; do
  run "$task" --method randmask --ratio 1e-3 --lr "${RANDMASK_LR[$task]}" --mask-seed "${PART[$task]}"
  run "$task" --method lora --lr "${LORA_LR[$task]}"
done
for task in cb rte sst2 boolq; do
  run "$task" --method randmask --ratio 1e-3 --lr "${RANDMASK_LR[$task]}" --mask-seed 0 --option "partition=${PART[$task]}/4"
done
for task in rte sst2 boolq; do  # cb's shared-mask run is its independent one (mask seed 0)
  run "$task" --method randmask --ratio 1e-3 --lr "${RANDMASK_LR[$task]}" --mask-seed 0
done
