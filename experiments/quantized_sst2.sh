#!/usr/bin/env bash
# randmask on a 4-bit base vs the float base vs QLoRA: SmolLM2-135M, SST-2 in LM mode, the study's SST-2
# protocol (500 train / 250 val / 500 test, 3 epochs, batch 8, prompts cut at 512), fp32 compute (this CPU
# has no native bf16), 3 seeds, at the study's chosen LRs (randmask 1e-3: 1e-2; LoRA: 1e-3). One run at a
# time, niced: a background study competes. Then the table of test accuracy per seed, mean and std.
# 4-bit bases: bitsandbytes NF4 (nf4) and torchao's NF4Tensor (ao-nf4, torchtune's QLoRA base). The export is
# merged into the committed file, so a run of part of the grid in another store keeps the records already there.
#   OUT=runs/quantized_sst2 THREADS=1 bash experiments/quantized_sst2.sh   (THREADS: torch threads per run, default 1)
set -euo pipefail
OUT=${OUT:-runs/quantized_sst2}
read -r -a RM <<< "${RANDMASK:-randmask}"  # the CLI; RANDMASK="python -m randmask_lab.cli" runs a checkout
COMMON=(--models smollm2-135m --tasks sst2 --mode lm --n-train 500 --n-val 250 --n-test 500 --epochs 3
        --batch-size 8 --max-length 512 --precision 32 --seeds 0 1 2 --out-dir "$OUT" --threads "${THREADS:-1}" --no-progress)
nice -n "${NICE:-5}" "${RM[@]}" sweep "${COMMON[@]}" --methods randmask --ratios 1e-3 --lrs 1e-2 --quantize nf4
nice -n "${NICE:-5}" "${RM[@]}" sweep "${COMMON[@]}" --methods lora --lrs 1e-3 --quantize nf4
nice -n "${NICE:-5}" "${RM[@]}" sweep "${COMMON[@]}" --methods randmask --ratios 1e-3 --lrs 1e-2
nice -n "${NICE:-5}" "${RM[@]}" sweep "${COMMON[@]}" --methods randmask --ratios 1e-3 --lrs 1e-2 --quantize ao-nf4
nice -n "${NICE:-5}" "${RM[@]}" sweep "${COMMON[@]}" --methods lora --lrs 1e-3 --quantize ao-nf4
"${RM[@]}" export --store "$OUT/results.sqlite" --out "$OUT/export.jsonl"
"${RM[@]}" merge --out experiments/results/quantized_sst2.jsonl experiments/results/quantized_sst2.jsonl "$OUT/export.jsonl"
"${RM[@]}" report --from experiments/results/quantized_sst2.jsonl
