"""One token through every FFN layer of an artifact in turn, as a decoding step meets them (each
layer's weights come from memory, not from cache): its routing against every expert,
interleaved, medians of --reps sweeps. The inputs are each layer's real hidden state at one
position of a short BBC text.

    python scripts/cold_ffn_sweep.py ARTIFACT [--reps 15] [--position 10] [--tokens 1]

(--tokens n: n consecutive positions in one call, as a decoding batch of n rows.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--position", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=1)
    a = ap.parse_args()

    from d2d.data import load_corpus
    from d2d.nn.policy import ALL
    from d2d.nn.routing import execution, routing
    from d2d.nn.structure import moe_layers
    from d2d.stages import load_artifact

    art = load_artifact(a.artifact)
    model = art.model.eval()
    torch.set_grad_enabled(False)
    layers = list(moe_layers(model, "ffn").values())
    got: dict[int, torch.Tensor] = {}
    hooks = [
        moe.register_forward_pre_hook(lambda mod, args, i=i: got.setdefault(i, args[0].detach()))
        for i, moe in enumerate(layers)
    ]
    text = load_corpus("bbc-news").split("calib").texts[0]
    ids = art.tokenizer(text, return_tensors="pt", truncation=True, max_length=64).input_ids
    with routing(model, ALL):
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    span = slice(a.position, a.position + a.tokens)
    xs = [got[i][:, span].reshape(a.tokens, 1, -1).contiguous() for i in range(len(layers))]

    def sweep() -> float:
        t0 = time.perf_counter()
        for moe, x in zip(layers, xs, strict=True):
            moe(x)
        return time.perf_counter() - t0

    routed, every = [], []
    with execution(model, "auto"):
        for _ in range(3):
            sweep()
        for _ in range(a.reps):
            routed.append(sweep())
            with routing(model, ALL):
                every.append(sweep())
    r, d = statistics.median(routed), statistics.median(every)
    print(f"{len(layers)} FFN layers, {a.tokens} token(s) each, weights from memory: "
          f"routed {1e3 * r:.2f} ms, every expert {1e3 * d:.2f} ms, "
          f"routed / every expert {r / d:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
