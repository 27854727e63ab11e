"""Mixture-of-Depths on a GPU: prefill and decode time of a SmolLM2-135M-shaped decoder (random
weights: only shapes matter for time) with every other block routed, against the same model
with every block on every token, interleaved in one run (d2d.measure.timing). Top-k prefill
runs exactly the capacity's share; for decoding, each router is set so that about that share of
tokens pass its causal decision (the measured share is printed).

Prefill is timed under top-k and under the causal decision (what threshold routing runs).

    python scripts/bench_mod_gpu.py [--capacities 0.5,0.25,0.125] [--dtype bfloat16]
        [--skip block|attention|mlp] [--keep-kv]
"""

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from d2d.measure.timing import decode_loop, interleaved, timer
from d2d.nn.depth import RUN_LABEL, depth_mode, insert_mod, mod_stats, set_mode, summarise

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--capacities", default="0.5,0.25,0.125")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prefill", default="8x1024")
    ap.add_argument("--decode-batch", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip", default="block", choices=["block", "attention", "mlp"])
    ap.add_argument("--keep-kv", action="store_true")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(args.device, dtype).eval()
    n = model.config.num_hidden_layers
    blocks = insert_mod(model, list(range(1, n, 2)), 1.0, 1, args.skip, args.keep_kv)
    pb, pl = (int(v) for v in args.prefill.split("x"))
    ids = torch.randint(0, 49152, (pb, pl), device=args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    kv = ", keep-kv" if args.keep_kv else ""
    print(f"{name}, torch {torch.__version__}, {args.dtype}, skip {args.skip}{kv}")
    print(f"| measure | capacity | {RUN_LABEL[args.skip]} | every block | routed | speed-up |")
    print("|---|---|---|---|---|---|")
    dev = args.device

    def prefill(mode, cap=None):
        def run():
            with depth_mode(model, mode, cap):
                model(input_ids=ids, logits_to_keep=1)

        return timer(run, dev)

    def decode(mode, p):
        def run(r):
            with depth_mode(model, mode):
                return decode_loop(model, p, args.new_tokens)

        return run

    batches = [int(v) for v in args.decode_batch.split(",")]
    with torch.no_grad():
        for cap in [float(c) for c in args.capacities.split(",")]:
            g = torch.Generator(device=args.device).manual_seed(1)
            q = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(cap)).item()
            for blk in blocks.values():
                d = blk.router.in_features
                w = torch.randn(1, d, generator=g, device=args.device) / d**0.5
                blk.router.weight.copy_(w.to(dtype))
                blk.router.bias.fill_(q)  # P(w . x/rms(x) + q > 0) ~ cap
            for mode, label in (("topk", "top-k"), ("causal", "causal")):
                set_mode(model, mode, cap)
                with mod_stats(model) as st:
                    model(input_ids=ids, logits_to_keep=1)
                frac = summarise(st, n)["block_fraction"]
                t = interleaved(
                    {"dense": prefill("dense"), "routed": prefill(mode, cap)}, args.reps, 3
                )
                td, tr = t["dense"], t["routed"]
                print(f"| prefill {pb}x{pl}, {label} | {cap:g} | {frac:.1%} | {1e3 * td:.1f} ms "
                      f"| {1e3 * tr:.1f} ms | {td / tr:.2f}x |")  # fmt: skip
            set_mode(model, "causal")
            for b in batches:
                p = ids[:1, :32].expand(b, -1).contiguous()
                with mod_stats(model) as st:
                    decode_loop(model, p, args.new_tokens, st)
                frac = summarise(st, n)["block_fraction"]
                t = interleaved(
                    {"dense": decode("dense", p), "routed": decode("causal", p)}, args.reps, 1
                )
                td, tr, tok = t["dense"], t["routed"], b * args.new_tokens
                print(f"| decode batch {b}, causal | {cap:g} | {frac:.1%} | {tok / td:.0f} tok/s "
                      f"| {tok / tr:.0f} tok/s | {td / tr:.2f}x |")  # fmt: skip
            set_mode(model, "dense")


if __name__ == "__main__":
    main()
