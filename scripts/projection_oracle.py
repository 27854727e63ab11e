"""The exact ceiling of expert routing on a model whose FFNs and attention projections are ReLU
MLPs (after `d2d sparsify --relu` and `d2d attention-mlp`): for each way of grouping neurons into
experts, convert a copy, then run only the experts whose true output is not zero (the oracle's
scores, no router, no router cost) on the calibration split (choices made from it leave the
held-out split clean). Nothing changes the model's function, so
the FLOPs printed are the least that routing at that granularity can cost without losing
anything; what a router adds and what a looser threshold saves come on top.

    python scripts/projection_oracle.py ARTIFACT [--sizes 16,8,4]
        [--clusterings weights,coactivation] [--ffn-size 16] [--tokens 16384] [--seq-len 256]
        [--split calib] [--json out.json]
"""

import argparse
import copy
import json

from d2d.measure.evaluate import Evaluator
from d2d.nn.routing import exact_policy
from d2d.nn.structure import moe_layers
from d2d.stages import ConvertConfig, convert, load_artifact


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--sizes", default="16,8,4")
    ap.add_argument("--clusterings", default="weights,coactivation")
    ap.add_argument("--ffn-size", type=int, default=16)
    ap.add_argument("--data", default="bbc-news")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--split", default="calib", help="calib (for choosing) or heldout")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    art = load_artifact(args.artifact)
    rows = []
    print("| clustering | projection expert size | projections' FLOPs (of their MLPs) | "
          "FFNs' FLOPs | model FLOPs | quality |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    ev = None
    for clustering in args.clusterings.split(","):
        for size in [int(v) for v in args.sizes.split(",")]:
            model = copy.deepcopy(art.model)
            cfg = ConvertConfig(
                expert_size=args.ffn_size,
                attention_expert_size=size,
                clustering=clustering,
                data=args.data,
                seq_len=args.seq_len,
            )
            convert(model, cfg, tokenizer=art.tokenizer)
            if ev is None:
                ev = Evaluator(
                    model,
                    art.tokenizer,
                    data=args.data,
                    split=args.split,
                    seq_len=args.seq_len,
                    tokens=args.tokens,
                )
            m = ev.measure(model, exact_policy(model))
            moes = moe_layers(model)
            proj = [k for k in m.layer_fractions if "_" in k]
            ffn = [k for k in m.layer_fractions if "_" not in k]

            def mean(keys, lf=m.layer_fractions):
                return sum(lf[k] for k in keys) / max(len(keys), 1)

            row = {
                "clustering": clustering,
                "size": size,
                "projection_fraction": mean(proj),
                "ffn_layer_fraction": mean(ffn),
                "model_fraction": m.model_fraction,
                "quality": m.quality,
                "layer_fractions": m.layer_fractions,
                "n_layers": len(moes),
            }
            rows.append(row)
            print(f"| {clustering} | {size} | {row['projection_fraction']:.1%} | "
                  f"{row['ffn_layer_fraction']:.1%} | {m.model_fraction:.1%} | "
                  f"{m.quality:.4f} |", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
