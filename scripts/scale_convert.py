"""convert's time per layer and peak memory on random weights of the FFN shapes users bring
(1B-8B models: FFN widths 8,192-14,336), two layers each, so that clustering's cost is
measured where the bundled 135M model cannot show it.

    python scripts/scale_convert.py --shapes 2048x8192,4096x14336 --expert-size 16

Prints one JSON line per shape: hidden size, FFN width, seconds per layer, peak resident MB.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="576x1536,2048x8192,4096x14336")
    ap.add_argument("--expert-size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=2)
    a = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from d2d.stages import ConvertConfig, convert

    for shape in a.shapes.split(","):
        d, f = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=256,
            hidden_size=d,
            intermediate_size=f,
            num_hidden_layers=a.layers,
            num_attention_heads=d // 64,
            num_key_value_heads=max(1, d // 256),
        )
        model = LlamaForCausalLM(cfg).eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            convert(model, ConvertConfig(expert_size=a.expert_size))
        s = (time.perf_counter() - t0) / a.layers
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            json.dumps(
                {
                    "hidden": d,
                    "ffn": f,
                    "expert_size": a.expert_size,
                    "s_per_layer": round(s, 2),
                    "peak_rss_mb_so_far": round(peak),
                }
            ),
            flush=True,
        )
        del model


if __name__ == "__main__":
    main()
