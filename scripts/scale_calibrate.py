"""convert and calibrate, as a user runs them, on random LLaMA-shaped decoders of the widths
users bring (1B-8B: hidden 2,048-4,096, FFN 8,192-14,336), a few layers each: time and peak
resident memory of each stage beside the model's own size, so that calibrate's memory is
measured where the bundled 135M model cannot show it (random weights: the quality figures
mean nothing, the costs are real).

    python scripts/scale_calibrate.py --shapes 2048x8192 --layers 4 --out /tmp/scale

Each stage runs as its own `d2d` process (peak memory per stage); prints one JSON line per
shape: hidden, FFN width, layers, the model's parameter bytes (fp32), and for each stage its
seconds and peak resident MB from the artifact's lineage.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path


def build(shape: str, layers: int, folder: Path) -> int:
    """A random LLaMA of `shape` saved with SmolLM2's tokenizer; returns its fp32 bytes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from d2d.models import resolve_path

    d, f = (int(v) for v in shape.split("x"))
    path, gguf = resolve_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=d,
        intermediate_size=f,
        num_hidden_layers=layers,
        num_attention_heads=d // 64,
        num_key_value_heads=max(1, d // 512),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() * 4 for p in model.parameters())


def stage(args: list[str]) -> dict:
    subprocess.run(["d2d", *args], check=True, stdout=subprocess.DEVNULL)
    out = Path(args[args.index("-o") + 1])
    rec = json.loads((out / "d2d.json").read_text())["stages"][-1]
    return {"seconds": rec["seconds"], "peak_rss_mb": rec["peak_rss_mb"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="2048x8192")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--expert-size", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", default="/tmp/d2d-scale")
    a = ap.parse_args()
    root = Path(a.out)
    for shape in a.shapes.split(","):
        base = root / f"base-{shape}"
        shutil.rmtree(root, ignore_errors=True)
        size = build(shape, a.layers, base)
        conv = root / "A"
        row = {"shape": shape, "layers": a.layers, "model_mb": round(size / 2**20)}
        row["convert"] = stage(
            ["convert", str(base), "-o", str(conv), "--expert-size", str(a.expert_size)]
        )
        # the decoder recipe's calibrate (recipes/smollm2-d2dmoe.yaml)
        row["calibrate"] = stage(
            ["calibrate", str(conv), "-o", str(root / "C"), "--layer-rules", "magnitude",
             "--peers", "--budgets", "0.6", "--target-flops", "0.6", "--tokens",
             str(a.tokens), "--seq-len", "512"]
        )  # fmt: skip
        print(json.dumps(row), flush=True)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
