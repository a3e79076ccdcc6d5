#!/bin/bash
# Issue 10's Fig. 4a/4b analogue on SmolLM2-135M, SST-2 prompts (LM mode), by analysis_fig4.sh, from the
# study's chosen runs (needs runs/study from experiments/smollm2_study.sh on this machine: the adapters are
# not in the JSONL). Loss: 1 batch of 8 SST-2 training prompts. It measures the paper's quantity, the Hessian
# norm max |λ| (WHICH=magnitude): at the pretrained weights the dominant eigenvalue of this loss is negative
# (-76 on randmask 1e-3's subspace), and the largest positive one is too small for a shifted power run to
# resolve at tol 1e-2. One HVP is ~5-15 s on a shared core. POWER overrides the power-iteration settings
# (a quick check: POWER="--num-batches 1 --batch-size 4 --max-iter 2 --tol 1e-1").
set -euo pipefail
export WHICH=${WHICH:-magnitude} SEEDS=${SEEDS:-"0 1 2"} MODEL=smollm2-135m TASK=sst2 RUNS=${RUNS:-runs/study} OUT=${OUT:-runs/analysis_smollm2_sst2}
export POWER=${POWER:-"--num-batches 1 --batch-size 8 --tol 1e-2 --max-iter 40"}
exec bash "$(dirname "$0")/analysis_fig4.sh"
