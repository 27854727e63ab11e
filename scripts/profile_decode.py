"""Where a decoding step's (or a prompt's) time goes: FFNs (and their routers), attention (and
within it the projections), the LM head, the rest.

    python scripts/profile_decode.py runs/smollm2-routers/3-calibrate [--batch 1] [--steps 32]
    python scripts/profile_decode.py runs/bert-bbc-attention/5-calibrate --prefill 256

Runs greedy decoding with the KV cache (or, with --prefill N, one forward of an N-token prompt:
encoders too), dense (every expert; replaced attention projections as the linear layers they
were, as `d2d bench` times its reference) and converted (the chosen routing, sparse execution)
in turn, and times each module family with forward hooks (the hooks cost a little themselves;
the totals are printed beside the unhooked time).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

import d2d
from d2d import arch
from d2d.data import encode_docs, lm_windows, load_corpus
from d2d.measure.timing import _reference, decode_loop
from d2d.models import task_of
from d2d.nn.policy import ALL as DENSE
from d2d.nn.projection import projection_slots
from d2d.nn.routing import routing

# families whose time is inside another's (not subtracted again for "rest")
NESTED = ("attention projections",)


def families(model) -> dict[str, list[torch.nn.Module]]:
    fam = arch.detect(model)
    blocks = arch.blocks(model, fam)
    out = defaultdict(list)
    for b in blocks:
        out["FFN (with router)"].append(arch.get_path(b, fam.slot))
        attn = next(
            (getattr(b, n) for n in ("self_attn", "attn", "attention") if hasattr(b, n)), None
        )
        if attn is not None:
            out["attention"].append(attn)
    for _, _, _, _, mod in projection_slots(model):
        out["attention projections"].append(mod)
    head = model.get_output_embeddings()
    if head is not None:
        out["LM head"].append(head)
    return out


def prefill_once(model, prompt: dict, steps: int) -> float:
    """Seconds of `steps` forwards of the prompt (steps: repetitions, not decoding steps)."""
    t0 = time.perf_counter()
    for _ in range(steps):
        model(**prompt)
    return time.perf_counter() - t0


def timed(model, prompt, steps: int, run=decode_loop) -> dict[str, float]:
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
        total = run(model, prompt, steps)
    finally:
        for h in handles:
            h.remove()
    top = sum(v for k, v in spent.items() if k not in NESTED)
    spent["rest (norms, embeddings, framework)"] = total - top
    return {k: 1e3 * v / steps for k, v in spent.items()} | {"step (hooked)": 1e3 * total / steps}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prefill", type=int, default=0, help="time an N-token prompt instead")
    a = ap.parse_args()
    art = d2d.load_artifact(a.artifact)
    model = art.model.float().eval()
    corpus = load_corpus(art.meta.get("data", "bbc-news")).split("calib", 0)
    run = decode_loop
    if a.prefill:
        run = prefill_once
        if task_of(model) == "causal-lm":
            prompt = {"input_ids": lm_windows(art.tokenizer, corpus, a.prefill, a.batch)}
        else:
            ids, mask, _ = encode_docs(art.tokenizer, corpus, a.prefill, a.batch)
            prompt = {"input_ids": ids, "attention_mask": torch.ones_like(mask)}
    else:
        prompt = lm_windows(art.tokenizer, corpus, a.prompt, a.batch)
    rows = {}
    with torch.no_grad():
        for name, pol in (("dense", DENSE), ("d2d", art.meta["routing"])):
            with routing(model, pol), _reference(model, pol):
                run(model, prompt, 4)  # warm-up
                plain = statistics.median(run(model, prompt, a.steps) for _ in range(a.reps))
                parts = [timed(model, prompt, a.steps, run) for _ in range(a.reps)]
            rows[name] = {k: statistics.median(p.get(k, 0.0) for p in parts) for k in parts[0]}
            rows[name]["step (no hooks)"] = 1e3 * plain / a.steps
    what = f"prompt of {a.prefill} tokens" if a.prefill else "decoding step"
    print(f"ms per {what}, batch {a.batch}, {torch.get_num_threads()} threads")
    print(f"{'':40s}{'dense':>10s}{'d2d':>10s}")
    for k in rows["dense"] | rows["d2d"]:
        print(f"{k:40s}{rows['dense'].get(k, 0.0):10.2f}{rows['d2d'].get(k, 0.0):10.2f}")


if __name__ == "__main__":
    main()
