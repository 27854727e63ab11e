"""How much of a single-neuron oracle's quality survives grouping neurons into experts, by the
way they are grouped: held-out perplexity with the experts of largest TRUE output norm kept per
token (no router), at each expert size, for weight k-means, co-activation clustering and a
random split, on the same held-out tokens in one run. It isolates the loss of granularity.

    python scripts/clustering_oracle.py --model smollm2-135m --sizes 1,4,8,16 \\
        --keep 0.5,0.75 --json docs/clustering_oracle.json

Each grouping is timed (convert's wall time, co-activation capture included).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="bbc-news")
    ap.add_argument("--sizes", default="1,4,8,16")
    ap.add_argument("--keep", default="0.5,0.75")
    ap.add_argument("--clusterings", default="weights,coactivation,random")
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens")
    ap.add_argument("--profile-tokens", type=int, default=8192)
    ap.add_argument("--json")
    a = ap.parse_args()

    from d2d.measure.evaluate import Evaluator
    from d2d.models import load_base
    from d2d.nn.policy import ALL
    from d2d.nn.structure import moe_layers
    from d2d.stages import ConvertConfig, convert

    torch.set_grad_enabled(False)
    base = load_base(a.model)
    ev = Evaluator(
        base.model, base.tokenizer, data=a.data, split="heldout", seq_len=512, tokens=a.tokens
    )
    dense = ev.measure(base.model, ALL).quality
    rows = [{"grouping": "dense", "quality": dense}]
    print(json.dumps(rows[0]), flush=True)
    keeps = [float(k) for k in a.keep.split(",")]
    for size in [int(s) for s in a.sizes.split(",")]:
        kinds = ["weights"] if size == 1 else a.clusterings.split(",")
        for kind in kinds:
            model = copy.deepcopy(base.model)
            t0 = time.perf_counter()
            cfg = ConvertConfig(
                expert_size=size,
                clustering="coactivation" if kind == "coactivation" else "weights",
                tokens=a.profile_tokens,
                data=a.data,
            )
            convert(model, cfg, tokenizer=base.tokenizer)
            seconds = time.perf_counter() - t0
            if kind == "random":  # a seeded random split of the neurons, for reference
                g = torch.Generator().manual_seed(0)
                for m in moe_layers(model).values():
                    p = torch.randperm(m.perm.numel(), generator=g)
                    for w in (m.w_in, m.w_gate, m.w_out):
                        if w is not None:
                            w.copy_(w[p])
                    for b in (m.b_in, m.b_gate):
                        if b is not None:
                            b.copy_(b[p])
                    m.perm.copy_(m.perm[p])
            for keep in keeps:
                pol = {"rule": "topk", "fraction": keep, "scores": "oracle", "dense_positions": 1}
                q = ev.measure(model, pol).quality
                row = {
                    "expert_size": size,
                    "grouping": "single neurons" if size == 1 else kind,
                    "keep": keep,
                    "quality": q,
                    "change": q / dense - 1,
                    "convert_s": round(seconds, 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            del model
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "heldout_tokens": ev.tokens, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
