"""Selection rules side by side on held-out data: FFN FLOPs fraction -> quality.

    python scripts/compare_rules.py ARTIFACT [--tokens 12288] [--json FILE]
    python scripts/compare_rules.py FILE.json --markdown     # tables for docs/results.md

ARTIFACT must have routers (after train-routers or calibrate). Each rule runs twice: with the
learned routers' scores and with an oracle's (each expert's true output norm, the ceiling that
routers chase). Rules: a global tau; per-layer taus, per-layer absolute thresholds and
per-layer k, with budgets allocated by calibrate's sensitivity estimate; and static top-k (the
same number of experts for every token and layer). All points use
the same held-out windows; the dense model is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from d2d import load_artifact
from d2d.io import write_json_atomic
from d2d.measure.evaluate import Evaluator, quality_drop
from d2d.measure.sensitivity import allocate, layer_sensitivity
from d2d.nn.policy import layer_policy
from d2d.stages.calibrate import DEFAULT_BUDGETS

TAUS = [0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2]
TOPK = [0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5]


def markdown(path: str) -> str:
    """Render a saved comparison as markdown tables, one per rule."""
    d = json.loads(open(path).read())
    groups: dict[str, list] = {}
    for r in d["rows"]:
        groups.setdefault(r["rule"], []).append(r)
    lines = [f"Dense {d['metric']}: {d['dense_quality']:.2f} on {d['tokens']} held-out tokens.", ""]
    for rule, rows in groups.items():
        key = next(k for k in ("tau", "budget", "fraction") if k in rows[0])
        lines += [
            f"**{rule}**",
            "",
            f"| {key} | FFN FLOPs | model FLOPs | {d['metric']} | change |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r[key]} | {100 * r['ffn_fraction']:.1f}% | {100 * r['model_fraction']:.1f}% "
            f"| {r['quality']:.2f} | {100 * r['drop']:+.1f}% |"
            for r in rows
        ]
        lines.append("")
    lines += ["| quality drop | router savings | oracle savings | ratio |", "|---|---|---|---|"]
    for k, v in savings_ratio(d["rows"]).items():
        ratio = "n/a" if v["ratio"] is None else f"{v['ratio']:.2f}"
        lines.append(
            f"| {k} | {100 * v['router_savings']:.1f}% | "
            f"{100 * v['oracle_savings']:.1f}% | {ratio} |"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", help="artifact with routers, or a saved .json with --markdown")
    ap.add_argument("--markdown", action="store_true", help="render a saved comparison")
    ap.add_argument("--data", default="bbc-news")
    ap.add_argument("--tokens", type=int, default=12288)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--dense-sink", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.markdown:
        print(markdown(a.artifact))
        return
    art = load_artifact(a.artifact)
    model, tok = art.model, art.tokenizer
    t0 = time.time()
    # per-layer sensitivity from the calibration split, measured on held-out data
    cal = Evaluator(model, tok, a.data, "calib", a.seq_len, 2048)
    ev = Evaluator(model, tok, a.data, "heldout", a.seq_len, a.tokens)
    dense = ev.measure(model, {"rule": "all"})
    rows = []

    def add(name, policy, extra=None):
        m = ev.measure(model, policy)
        row = {
            "rule": name,
            "policy": policy,
            "ffn_fraction": m.ffn_fraction,
            "model_fraction": m.model_fraction,
            "quality": m.quality,
            "drop": quality_drop(ev.metric, m.quality, dense.quality),
            **(extra or {}),
        }
        rows.append(row)
        print(
            f"{name:22s} {json.dumps(extra or {}):18s} FFN {100 * m.ffn_fraction:5.1f}%  "
            f"{ev.metric} {m.quality:8.3f}  {100 * row['drop']:+7.2f}%",
            flush=True,
        )

    sink = a.dense_sink
    for scores in ("router", "oracle"):
        for t in TAUS:
            add(
                f"{scores} global tau",
                {"rule": "tau", "tau": t, "scores": scores, "dense_positions": sink},
                {"tau": t},
            )
        sens = layer_sensitivity(model, cal, sink, 2048, scores=scores)
        for rule in ("tau", "threshold", "topk"):
            table = sens.table(rule)
            for b in DEFAULT_BUDGETS:
                pol = layer_policy(rule, allocate(table, b), sink, scores=scores)
                add(f"{scores} per-layer {rule}", pol, {"budget": b})
        for f in TOPK:
            add(
                f"{scores} top-k",
                {"rule": "topk", "fraction": f, "scores": scores, "dense_positions": sink},
                {"fraction": f},
            )
    out = {
        "artifact": a.artifact,
        "data": a.data,
        "split": "heldout",
        "tokens": ev.tokens,
        "seq_len": a.seq_len,
        "dense_sink": sink,
        "metric": ev.metric,
        "dense_quality": dense.quality,
        "rows": rows,
        "seconds": time.time() - t0,
        "savings_ratio": savings_ratio(rows),
    }
    print(json.dumps(out["savings_ratio"], indent=1))
    if a.json:
        write_json_atomic(a.json, out)


def fraction_at(rows, prefix: str, drop: float) -> float:
    """Lowest FFN fraction reachable at quality drop <= `drop` by any rule whose name starts
    with `prefix`; within one rule, linear interpolation between its neighbouring settings."""
    best = 1.0
    rules = {r["rule"] for r in rows if r["rule"].startswith(prefix)}
    for rule in rules:
        pts = sorted((r["drop"], r["ffn_fraction"]) for r in rows if r["rule"] == rule)
        for (d0, f0), (d1, f1) in zip(pts, pts[1:], strict=False):
            if d0 <= drop < d1:
                best = min(best, float(np.interp(drop, [d0, d1], [f0, f1])))
        best = min([best] + [f for d, f in pts if d <= drop])
    return best


def savings_ratio(rows):
    """Router savings / oracle savings at equal quality drop, for a few drops."""
    out = {}
    for drop in (0.01, 0.02, 0.05, 0.1):
        r = 1 - fraction_at(rows, "router", drop)
        o = 1 - fraction_at(rows, "oracle", drop)
        out[f"{drop:.0%}"] = {
            "router_savings": r,
            "oracle_savings": o,
            "ratio": r / o if o > 0 else None,
        }
    return out


if __name__ == "__main__":
    main()
