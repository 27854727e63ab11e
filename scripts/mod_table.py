"""Print the Mixture-of-Depths capacity curve as a markdown table from the outputs of
scripts/mod_curve.sh: `python scripts/mod_table.py [runs/mod-curve]`.

Per capacity: block work done, FLOPs per token (whole model), held-out perplexity with every
block, under top-k and under the causal decision (and the change against the fine-tune
without routers), the causal decision's agreement with top-k, and decode tokens/s against the
same weights with every block on every token (from the bench JSON, when it exists)."""

import json
import sys
from pathlib import Path


def load(path: Path) -> dict | None:
    return json.loads(path.read_text())["metrics"] if path.exists() else None


def main(root: Path) -> None:
    base = load(root / "baseline-eval.json")
    base_ppl = base["rows"][0]["quality"] if base else None

    def vs(p: float) -> str:
        return f"{p:.2f}" + (f" ({100 * (p / base_ppl - 1):+.1f}%)" if base_ppl else "")

    print(
        "| capacity | blocks run (top-k / causal) | model FLOPs (top-k / causal) | perplexity, "
        "every block | perplexity, top-k | perplexity, causal | causal decision agrees "
        "with top-k | decode tokens/s, batch 1 (every block -> causal) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    if base_ppl:
        print(f"| fine-tune without routers | 100% | 100% | {base_ppl:.2f} | | | | |")
    for run in sorted(root.glob("capacity-*"), key=lambda p: -float(p.name.split("-")[1])):
        ev = load(run / "1-eval.json")
        if ev is None:
            continue
        every, topk, causal = ev["rows"]
        bench = load(run / "bench.json")
        dec = next((r for r in (bench or {}).get("model", []) if r["measure"] == "decode, "
                    "batch 1"), None)  # fmt: skip
        speed = f"{dec['dense']:.1f} -> {dec['d2d']:.1f} = **{dec['speedup']:.2f}x**" if dec else ""
        print(
            f"| {run.name.split('-')[1]} "
            f"| {100 * topk['depth']['block_fraction']:.1f}% / "
            f"{100 * causal['depth']['block_fraction']:.1f}% "
            f"| {100 * topk['model_fraction']:.1f}% / {100 * causal['model_fraction']:.1f}% "
            f"| {vs(every['quality'])} | {vs(topk['quality'])} | {vs(causal['quality'])} "
            f"| {100 * topk['depth']['predictor_accuracy']:.1f}% | {speed} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/mod-curve"))
