#!/bin/bash
# Issue 10's Fig. 4a/4b analogue on SmolLM2-135M, SST-2 prompts (LM mode), by analysis_fig4.sh, from the
# study's chosen runs (needs runs/study from experiments/smollm2_study.sh on this machine: the adapters are
# not in the JSONL). Loss: 2 batches of 8 SST-2 training prompts. At the pretrained weights the largest-|λ|
# eigenvalue of this loss was negative (-76 on randmask 1e-3's subspace); `--which top` (the default) reports
# the largest algebraic one (a shifted re-run). One HVP is ~15 s on a shared core: up to ~30 min per
# measurement at these settings, so run it with the study paused. POWER overrides the power-iteration
# settings (a quick check: POWER="--num-batches 1 --batch-size 4 --max-iter 2 --tol 1e-1").
set -euo pipefail
export MODEL=smollm2-135m TASK=sst2 RUNS=${RUNS:-runs/study} OUT=${OUT:-runs/analysis_smollm2_sst2}
export POWER=${POWER:-"--num-batches 2 --batch-size 8 --tol 1e-3 --max-iter 60"}
exec bash "$(dirname "$0")/analysis_fig4.sh"
