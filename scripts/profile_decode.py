"""Where a decoding step's time goes: FFNs (and their routers), attention, the LM head, the rest.

    python scripts/profile_decode.py runs/smollm2-routers/3-calibrate [--batch 1] [--steps 32]

Runs greedy decoding with the KV cache, dense (every expert) and converted (the chosen
routing, sparse execution) in turn, and times each module family with forward hooks (the hooks
cost a little themselves; the totals per step are printed beside the unhooked step time).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

import d2d
from d2d import arch
from d2d.data import lm_windows, load_corpus
from d2d.measure.timing import decode_loop
from d2d.nn.routing import routing


def families(model) -> dict[str, list[torch.nn.Module]]:
    fam = arch.detect(model)
    blocks = arch.blocks(model, fam)
    out = defaultdict(list)
    for b in blocks:
        out["FFN (with router)"].append(arch.get_path(b, fam.slot))
        attn = getattr(b, "self_attn", None) or getattr(b, "attn", None)
        if attn is not None:
            out["attention"].append(attn)
    head = model.get_output_embeddings()
    if head is not None:
        out["LM head"].append(head)
    return out


def timed(model, prompt, steps: int) -> dict[str, float]:
    spent: dict[str, float] = defaultdict(float)
    starts: dict[int, float] = {}
    handles = []
    for name, mods in families(model).items():
        for m in mods:

            def pre(mod, args, name=name):
                starts[id(mod)] = time.perf_counter()

            def post(mod, args, out, name=name):
                spent[name] += time.perf_counter() - starts.pop(id(mod))

            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        total = decode_loop(model, prompt, steps)
    finally:
        for h in handles:
            h.remove()
    spent["rest (norms, embeddings, framework)"] = total - sum(spent.values())
    return {k: 1e3 * v / steps for k, v in spent.items()} | {"step (hooked)": 1e3 * total / steps}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    art = d2d.load_artifact(a.artifact)
    model = art.model.float().eval()
    corpus = load_corpus("bbc-news").split("calib", 0)
    prompt = lm_windows(art.tokenizer, corpus, a.prompt, a.batch)
    rows = {}
    with torch.no_grad():
        for name, pol in (("dense", {"rule": "all"}), ("d2d", art.meta["routing"])):
            with routing(model, pol):
                decode_loop(model, prompt, 4)  # warm-up
                plain = statistics.median(
                    decode_loop(model, prompt, a.steps) for _ in range(a.reps)
                )
                parts = [timed(model, prompt, a.steps) for _ in range(a.reps)]
            rows[name] = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
            rows[name]["step (no hooks)"] = 1e3 * plain / a.steps
    print(f"ms per decoding step, batch {a.batch}, {torch.get_num_threads()} threads")
    print(f"{'':40s}{'dense':>10s}{'d2d':>10s}")
    for k in rows["dense"]:
        print(f"{k:40s}{rows['dense'][k]:10.2f}{rows['d2d'][k]:10.2f}")


if __name__ == "__main__":
    main()
