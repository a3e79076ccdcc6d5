#!/usr/bin/env bash
# The SmolLM2-135M study of issue 10 (the paper's LM setting: SST-2, RTE, CB, BoolQ; zero-shot, FT, LoRA,
# randmask at 1e-3/1e-4/1e-5, structured at 1e-4/1e-5 on SST-2 and RTE), as specified in
# experiments/smollm2_study.json. Resumable: run it again to go on; a second copy on the same out-dir shares
# the work (leased runs). Every finished run is exported to experiments/results/smollm2_study.jsonl; commit it.
# Tables, figures and verdicts from the committed file alone:
#   randmask report --from experiments/results/smollm2_study.jsonl --spec experiments/smollm2_study.json \
#       --figures experiments/results/smollm2_study
#   randmask findings --from experiments/results/smollm2_study.jsonl --spec experiments/smollm2_study.json \
#       --theory experiments/results/theory/theory_summary.json
# (experiments/results/theory/ was written by `randmask theory --out experiments/results/theory`, 14 s.)
set -euo pipefail
randmask study experiments/smollm2_study.json --out-dir "${OUT:-runs/study}" \
  --export experiments/results/smollm2_study.jsonl --threads "${THREADS:-2}" "$@"
