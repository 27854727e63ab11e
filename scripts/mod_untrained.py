"""What a Mixture-of-Depths retrofit starts from: SmolLM2-135M with routed blocks on every
other block and no training, held-out perplexity at several capacities, with tokens ranked at
random or by the size of the block's own update (|block(x) - x| / |x|, an oracle that needs
the block's output first), with and without the sink (position 0 always processed).

    python scripts/mod_untrained.py [--tokens 4096] [--capacities 0.875,0.5,0.25]
"""

import argparse

import torch

from d2d.measure.evaluate import Evaluator
from d2d.models import load_base
from d2d.nn.depth import MoDBlock, insert_mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--capacities", default="0.875,0.5,0.25")
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_base(args.model)
    model = loaded.model
    ev = Evaluator(model, loaded.tokenizer, "bbc-news", "heldout", 256, args.tokens, 0, True)
    print(f"dense: {ev.measure(model, {'rule': 'all'}).quality:.2f}")
    n = len(model.model.layers)
    blocks = insert_mod(model, list(range(1, n, 2)), 1.0)
    score: dict[int, torch.Tensor] = {}

    def update_size(i):
        def hook(mod: MoDBlock, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "cache")}
            y = mod.block(x, **{**kw, "cache": None, "use_cache": False})
            y = y[0] if isinstance(y, tuple) else y
            score[i] = (y - x).float().norm(dim=-1) / x.float().norm(dim=-1)

        return hook

    for i, b in blocks.items():
        b.register_forward_pre_hook(update_size(i), with_kwargs=True)
        b.router.register_forward_hook(
            lambda mod, a, out, i=i: (
                score[i][..., None].to(out.dtype) * 1e-6
                if ranking == "update"
                else torch.rand_like(out) * 1e-6
            )
        )  # tiny logits: they only rank, the update scale 2 sigmoid(r) stays 1
    print("| capacity | ranking | no sink | sink (position 0 always processed) |")
    print("|---|---|---|---|")
    for cap in [float(c) for c in args.capacities.split(",")]:
        for ranking in ("random", "update"):
            ppl = []
            for sink in (0, 1):
                torch.manual_seed(0)
                for b in blocks.values():
                    b.capacity, b.sink = cap, sink
                ppl.append(ev.measure(model, {"depth": "topk"}).quality)
            print(f"| {cap:g} | {ranking} | {ppl[0]:.1f} | {ppl[1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
