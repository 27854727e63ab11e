"""Routers against the oracle at equal FFN fractions: held-out perplexity of a converted model
with each token's top-k experts ranked by trained routers (one run per router loss) and by the
true output norms, k the same share of experts in every layer, first position dense. The
router's FLOPs are added to its fraction, so router and oracle rows are priced alike.

    python scripts/router_probe.py --model smollm2-135m --expert-size 16 --losses mse,log \\
        --keep 0.5,0.75 --json docs/router_probe.json
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
    ap.add_argument("--expert-size", type=int, default=16)
    ap.add_argument("--clustering", default="weights")
    ap.add_argument("--losses", default="mse,log")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--router-tokens", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--keep", default="0.5,0.75")
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens")
    ap.add_argument("--json")
    a = ap.parse_args()

    from d2d.measure.evaluate import Evaluator
    from d2d.models import load_base
    from d2d.nn.policy import ALL
    from d2d.routers import train_routers
    from d2d.stages import ConvertConfig, TrainRoutersConfig, convert

    base = load_base(a.model)
    ev = Evaluator(
        base.model, base.tokenizer, data=a.data, split="heldout", seq_len=512, tokens=a.tokens
    )
    with torch.no_grad():
        dense = ev.measure(base.model, ALL).quality
    model = base.model
    convert(
        model,
        ConvertConfig(expert_size=a.expert_size, clustering=a.clustering, data=a.data),
        tokenizer=base.tokenizer,
    )
    rows = [{"rule": "dense", "quality": dense}]
    print(json.dumps(rows[0]), flush=True)
    keeps = [float(k) for k in a.keep.split(",")]

    def measure(label, scores, extra=None):
        for keep in keeps:
            pol = {"rule": "topk", "fraction": keep, "scores": scores, "dense_positions": 1}
            with torch.no_grad():
                m = ev.measure(model, pol)
            row = {
                "rule": label,
                "keep": keep,
                "ffn_flops": m.ffn_fraction,
                "quality": m.quality,
                "change": m.quality / dense - 1,
                **(extra or {}),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)

    measure("oracle", "oracle")
    plain = copy.deepcopy(model)
    for loss in a.losses.split(","):
        model = copy.deepcopy(plain)
        cfg = TrainRoutersConfig(
            data=a.data, tokens=a.router_tokens, steps=a.steps, hidden=a.hidden, loss=loss
        )
        t0 = time.perf_counter()
        met = train_routers(model, base.tokenizer, cfg)
        extra = {
            "hidden": a.hidden,
            "mean_r2": met["mean_r2"],
            "mean_capture_25": met["mean_capture_25"],
            "train_s": round(time.perf_counter() - t0),
        }
        measure(f"router ({loss})", "router", extra)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "heldout_tokens": ev.tokens, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
