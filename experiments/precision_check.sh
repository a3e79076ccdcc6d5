#!/usr/bin/env bash
# Does bf16 keep accuracy? SmolLM2-135M on SST-2, randmask at ratio 1e-3, LR 1e-2 (the best LR of the
# 256/64/500 SmolLM2 sweep in the README), 3 seeds, --precision 32 vs bf16-true (then bf16-mixed).
# Protocol scaled to a shared 2-core machine (a fp32 step took ~35 s under the load there):
# 96 train / 32 val (from SST-2 train), 200 test (SST-2 dev), 1 epoch = 12 steps of 8.
# Prints one Markdown table; experiments/results/precision_check.md holds what it printed.
set -euo pipefail
OUT=${OUT:-runs/precision_check}
COMMON=(--models smollm2-135m --tasks sst2 --methods randmask --ratios 1e-3 --lrs 1e-2 --seeds 0 1 2
        --n-train 96 --n-val 32 --n-test 200 --epochs 1 --threads "${THREADS:-2}" --no-progress)
for p in 32 bf16-true bf16-mixed; do
  randmask sweep "${COMMON[@]}" --precision "$p" --out-dir "$OUT/$p" > "$OUT.$p.log" 2>&1 || true
done
python - "$OUT" <<'PY'
import statistics, sys
from randmask_lab.experiment import ResultStore
out = sys.argv[1]
print("| precision | test accuracy per seed (0, 1, 2) | mean ± std | train seconds per run (mean) |")
print("|---|---|---|---|")
for p in ("32", "bf16-true", "bf16-mixed"):
    recs = sorted(ResultStore(f"{out}/{p}/results.sqlite").records(), key=lambda r: r.config["seed"])
    acc = [100 * r.test_metric for r in recs if r.test_metric is not None]
    secs = [r.train_seconds for r in recs]
    if len(acc) < 2:
        print(f"| {p} | {acc} | n/a | n/a |")
        continue
    print(f"| {p} | {', '.join(f'{a:.1f}' for a in acc)} | {statistics.mean(acc):.1f} ± {statistics.stdev(acc):.1f} "
          f"| {statistics.mean(secs):.0f} |")
PY
