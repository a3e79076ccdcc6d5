#!/usr/bin/env bash
# Every GPU number of randmask in one call, on one CUDA GPU in <= 8 minutes (see benchmarks/gpu/driver.py):
# the device tests, the masked weight gradient alone at OPT-1.3b shapes, the training step at OPT-1.3b
# shape (batch 8 x 512, bf16-mixed) against LoRA/SHiRA/full fine-tuning, and a SmolLM2 SST-2 run through
# the runner. Writes benchmarks/results/gpu_*.json and benchmarks/results/gpu_summary.md.
#
#   benchmarks/gpu/run.sh --prepare   # here, before the device: copy what the GPU machine cannot fetch into
#                                     # benchmarks/gpu/carry/ (SmolLM2's config + tokenizer, SST-2's files)
#   benchmarks/gpu/run.sh             # on the CUDA machine (carry benchmarks/gpu/carry and the venv)
#   benchmarks/gpu/run.sh --dry-run   # anywhere: the same logic on the CPU at tiny shapes (< 1 minute)
#
# The SmolLM2 weights (538 MB in fp32) do not fit a 64 MiB carry: without them the run uses SmolLM2's
# shape at random init, which gives the same step time (the JSON says so).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [[ "${1:-}" == "--prepare" ]]; then
  carry=benchmarks/gpu/carry
  cache=${RANDMASK_CACHE:-$HOME/.cache/randmask}/models/smollm2-135m
  data=${RANDMASK_DATA_DIR:-../shared/data}
  mkdir -p "$carry/smollm2-135m" "$carry/data/glue"
  for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
    [[ -f "$cache/$f" ]] && cp "$cache/$f" "$carry/smollm2-135m/"
  done
  cp -r "$data/glue/SST-2" "$carry/data/glue/"
  du -sh "$carry"
  exit 0
fi
exec "$PY" benchmarks/gpu/driver.py "$@"
