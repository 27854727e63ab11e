"""Where a router-free exact-value rule should spend an FFN budget: uniform (every layer alike)
shares of the FFN input that gate and up read (`input_keep`) against shares of the units whose
down projection runs (`unit_keep`), at FFN FLOPs = (2 x input_keep + unit_keep) / 3 for a gated
FFN. TEAL-style is the diagonal (input_keep = unit_keep, units ranked by |h|); the rows with
`weighted` rank units by |h| x the norm of their down row (the exact-magnitude score). Held-out
perplexity on the same tokens in one run; thresholds from calibration-split tokens.

    python scripts/split_grid.py --pairs 0.6:0.6,0.7:0.4,0.75:0.3,0.8:0.2 \\
        --json docs/split_grid.json
"""

from __future__ import annotations

import argparse
import json

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="bbc-news")
    ap.add_argument("--pairs", default="0.6:0.6,0.65:0.5,0.7:0.4,0.75:0.3,0.8:0.2")
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--json")
    a = ap.parse_args()

    from d2d.measure.evaluate import Evaluator
    from d2d.measure.sensitivity import layer_sensitivity, split_thresholds
    from d2d.models import load_base
    from d2d.nn.policy import ALL
    from d2d.stages import ConvertConfig, convert

    base = load_base(a.model)
    model = base.model
    convert(model, ConvertConfig(expert_size=1, data=a.data), tokenizer=base.tokenizer)
    kw = dict(data=a.data, seq_len=a.seq_len, bf16=False)
    ev = Evaluator(model, base.tokenizer, split="heldout", tokens=a.tokens, **kw)
    cal = Evaluator(model, base.tokenizer, split="calib", tokens=a.calib_tokens, **kw)
    sens = layer_sensitivity(model, cal, 1, a.calib_tokens)
    torch.set_grad_enabled(False)
    dense = ev.measure(model, ALL).quality
    rows = [{"rule": "dense", "quality": dense}]
    print(json.dumps(rows[0]), flush=True)
    for pair in a.pairs.split(","):
        px, pk = (float(v) for v in pair.split(":"))
        for weighted in (False, True):
            t_in, t_unit = split_thresholds(sens, px, pk, weighted)
            pol = {
                "rule": "threshold",
                "scores": "magnitude" if weighted else "activation",
                "thresholds": {str(i): v for i, v in t_unit.items()},
                "input_thresholds": {str(i): v for i, v in t_in.items()},
                "dense_positions": 1,
            }
            m = ev.measure(model, pol)
            row = {
                "input_keep": px,
                "unit_keep": pk,
                "weighted": weighted,
                "ffn_fraction": m.ffn_fraction,
                "quality": m.quality,
                "change": m.quality / dense - 1,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "heldout_tokens": ev.tokens, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
