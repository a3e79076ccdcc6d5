#!/bin/bash
# Issue 4 on MiniLM-L6 + head, RTE (needs the RTE runs of paper_minilm.sh in $RUNS): Fig. 4a/4b by
# analysis_fig4.sh. The head trains in every method, so it is held fixed (--freeze-head): λ is w.r.t. the
# method's own parameters. Loss: 2 batches of 8 RTE training prompts (the run's data seed and first-epoch order).
set -euo pipefail
export MODEL=minilm-l6 TASK=rte RUNS=${RUNS:-runs/paper/minilm} OUT=${OUT:-runs/paper/analysis}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export POWER="--freeze-head --num-batches 2 --batch-size 8 --tol 1e-3 --max-iter 60" DISTANCE_FLAGS=--freeze-head
exec bash "$(dirname "$0")/analysis_fig4.sh"
