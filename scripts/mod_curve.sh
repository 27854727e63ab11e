#!/usr/bin/env bash
# The Mixture-of-Depths proof (docs/results.md): recipes/smollm2-mod.yaml at capacities 0.5,
# 0.25 and 0.125, and its baseline, the same fine-tune without routers (d2d sparsify with no
# penalty: same steps, batch, sequence length, learning rate, data and seed), each evaluated on
# the same held-out tokens. About an hour on 2 CPU cores. Usage: scripts/mod_curve.sh [OUT]
set -euo pipefail
out=${1:-runs/mod-curve}
mkdir -p "$out"
capacity() {
  d2d run recipes/smollm2-mod.yaml out="$out/capacity-$1" mod.capacity="$1"
}
capacity 0.5
if [ ! -f "$out/baseline/d2d.json" ]; then
  d2d sparsify smollm2-135m -o "$out/baseline" --weight 0 --steps 180 --batch-size 8 \
    --seq-len 256 --lr 0.0002 --eval-tokens 8192
fi
d2d eval "$out/baseline" --tokens 16384 --seq-len 256 --json "$out/baseline-eval.json"
capacity 0.25
capacity 0.125
