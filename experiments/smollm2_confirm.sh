#!/usr/bin/env bash
# The confirmatory SmolLM2-135M study of issue 26, as specified in experiments/smollm2_confirm.json: the paper's
# protocol (SST-2 1000 train / 500 validation / 872 test, CB 200 / 50 / 56, 5 epochs), fp32 (see README: the
# precision that runs at full speed on every CPU this project gets), 10 seeds for the cells the findings compare
# (for finding (a)'s cells, re-estimated once from the study's own spread, up to 30: the spec's "reestimate"),
# Table 5's sparsity curve and Appendix B.1's baselines on SST-2 at 3 seeds. Stages order the work: stage 0 is
# finding (a) (LoRA, randmask 1e-3, full FT), stage 1 finding (e) and the other ratios, stage 2 Table 5,
# stage 3 the B.1 baselines.
#
# Resumable anywhere: on a fresh machine it first takes the finished records of the committed JSONL into its store;
# run it again to go on; a second copy on the same out-dir shares the work (leased runs). It refuses uncommitted
# code (records name their commit). Run two workers of one thread each on two cores, one of them on Table 5's curve
# (stage 2) so that it does not wait for every seed of stages 0-1 (docs/confirmatory.md):
#   experiments/smollm2_confirm.sh & experiments/smollm2_confirm.sh --stages 2 &
# What is left, its worker-hours on this kind of CPU, and the seeds each comparison needs:
#   randmask study experiments/smollm2_confirm.json --export experiments/results/smollm2_confirm.jsonl --plan
# Tables and verdicts from the committed file alone:
#   randmask report --from experiments/results/smollm2_confirm.jsonl --spec experiments/smollm2_confirm.json \
#       --figures experiments/results/smollm2_confirm
#   randmask findings --from experiments/results/smollm2_confirm.jsonl --spec experiments/smollm2_confirm.json
# (--spec: a cell whose LR search is still running shows as the best so far and is left out of the findings.)
set -euo pipefail
randmask study experiments/smollm2_confirm.json --out-dir "${OUT:-runs/confirm}" \
  --export "${EXPORT:-experiments/results/smollm2_confirm.jsonl}" --threads "${THREADS:-1}" --lease-seconds 3600 "$@"
