#!/usr/bin/env bash
# Decode and prefill time of each capacity of scripts/mod_curve.sh against the same weights
# with every block on every token (docs/results.md). Run on an otherwise idle machine.
# Usage: scripts/mod_bench.sh [OUT]   (about 2 minutes per capacity on 2 CPU cores)
set -euo pipefail
out=${1:-runs/mod-curve}
for run in "$out"/capacity-*; do
  d2d bench "$run/0-mod" --reps 20 --prompt-len 256 --decode-batch 1,8 --json "$run/bench.json"
done
