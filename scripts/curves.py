"""Cost-quality curves on held-out data for calibrated artifacts, side by side.

Every routing policy in each artifact's calibration table (or only the rules given by --rules)
is re-measured on the held-out split, with the artifact's own dense model (every expert) as the
first point. Plain models (e.g. the original checkpoint) can be added as dense reference lines.

    python scripts/curves.py --artifact sparsified=runs/smollm2-routers/3-calibrate \\
        --artifact baseline=runs/smollm2-ft0/3-calibrate --dense original=smollm2-135m \\
        --json docs/curves.json --png docs/curves.png --at 0.5

--calibration-split plots the rows that calibrate measured instead (no forward passes).
Prints a markdown table; --at F also prints each curve's quality at F of the FFN FLOPs
(linear interpolation between the two measured neighbours).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _pairs(items):
    out = []
    for it in items or []:
        label, eq, path = it.partition("=")
        if not eq:
            sys.exit(f"error: {it!r} is not LABEL=PATH")
        out.append((label, path))
    return out


def from_calibration(args) -> dict:
    """The curves as calibrate measured them (calibration split), without running anything."""
    from d2d.artifact import read_meta

    curves, metric = [], None
    for label, path in _pairs(args.artifact):
        cal = read_meta(Path(path)).get("calibration")
        if not cal:
            sys.exit(f"error: {path} is not calibrated: run d2d calibrate on it first")
        metric = cal["metric"]
        rules = {r["rule"] for r in cal["rows"] if r["rule"] != "dense"}
        wanted = set(args.rules.split(",")) if args.rules else rules
        for rule in sorted(rules & wanted):
            points = [
                {"ffn": 1.0, "model": 1.0, "quality": cal["dense_quality"], "setting": "dense"}
            ]
            for r in cal["rows"]:
                if r["rule"] == rule:
                    points.append(
                        {
                            "ffn": r["ffn_fraction"],
                            "model": r["model_fraction"],
                            "quality": r["quality"],
                            "setting": r.get("budget", r["policy"].get("tau")),
                        }
                    )
            points.sort(key=lambda p: -p["ffn"])
            curves.append({"label": label, "rule": rule, "path": path, "points": points})
    return {
        "metric": metric,
        "split": "calib",
        "tokens": cal["tokens"],
        "curves": curves,
        "dense": [],
    }


def measure(args) -> dict:
    from d2d.measure.evaluate import Evaluator
    from d2d.stages import open_input

    curves, refs, metric = [], [], None
    for label, path in _pairs(args.artifact):
        art = open_input(path)
        cal = art.meta.get("calibration")
        if not cal:
            sys.exit(f"error: {path} is not calibrated: run d2d calibrate on it first")
        ev = Evaluator(
            art.model, art.tokenizer, args.data, "heldout", args.seq_len, args.tokens, args.seed
        )
        metric = ev.metric
        dense = ev.measure(art.model, {"rule": "all"})
        rules = {r["rule"] for r in cal["rows"] if r["rule"] != "dense"}
        wanted = set(args.rules.split(",")) if args.rules else rules
        for rule in sorted(rules & wanted):
            points = [{"ffn": 1.0, "model": 1.0, "quality": dense.quality, "setting": "dense"}]
            for r in cal["rows"]:
                if r["rule"] != rule:
                    continue
                m = ev.measure(art.model, r["policy"])
                points.append(
                    {
                        "ffn": m.ffn_fraction,
                        "model": m.model_fraction,
                        "quality": m.quality,
                        "setting": r.get("budget", r["policy"].get("tau")),
                    }
                )
                print(f"{label} {rule} {m.ffn_fraction:.3f} {m.quality:.4g}", file=sys.stderr)
            points.sort(key=lambda p: -p["ffn"])
            curves.append({"label": label, "rule": rule, "path": path, "points": points})
        del art
    for label, path in _pairs(args.dense):
        art = open_input(path)
        ev = Evaluator(
            art.model, art.tokenizer, args.data, "heldout", args.seq_len, args.tokens, args.seed
        )
        metric = ev.metric
        refs.append(
            {
                "label": label,
                "path": path,
                "quality": ev.measure(art.model, {"rule": "all"}).quality,
            }
        )
    return {
        "metric": metric,
        "split": "heldout",
        "data": args.data,
        "tokens": args.tokens,
        "seq_len": args.seq_len,
        "curves": curves,
        "dense": refs,
    }


def at(points: list[dict], frac: float) -> float | None:
    """Quality at FFN fraction `frac`, interpolated between measured neighbours."""
    pts = sorted(points, key=lambda p: p["ffn"])
    for a, b in zip(pts, pts[1:], strict=False):
        if a["ffn"] <= frac <= b["ffn"]:
            w = (frac - a["ffn"]) / max(b["ffn"] - a["ffn"], 1e-12)
            return a["quality"] + w * (b["quality"] - a["quality"])
    return None


def markdown(res: dict, at_frac: float | None) -> str:
    lines = [
        f"| model | rule | FFN FLOPs | model FLOPs | {res['metric']} |",
        "|---|---|---|---|---|",
    ]
    for c in res["curves"]:
        for p in c["points"]:
            lines.append(
                f"| {c['label']} | {c['rule']} | {100 * p['ffn']:.1f}% | {100 * p['model']:.1f}% "
                f"| {p['quality']:.4g} |"
            )
    for r in res["dense"]:
        lines.append(f"| {r['label']} | dense | 100% | 100% | {r['quality']:.4g} |")
    if at_frac is not None:
        lines += ["", f"| model | rule | {res['metric']} at {100 * at_frac:.0f}% FFN FLOPs |"]
        lines.append("|---|---|---|")
        for c in res["curves"]:
            q = at(c["points"], at_frac)
            lines.append(f"| {c['label']} | {c['rule']} | {'n/a' if q is None else f'{q:.4g}'} |")
    return "\n".join(lines)


def plot(res: dict, png: str, at_frac: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for c in res["curves"]:
        xs = [100 * p["ffn"] for p in c["points"]]
        ys = [p["quality"] for p in c["points"]]
        ax.plot(xs, ys, marker="o", ms=3, label=f"{c['label']} ({c['rule']})")
    for r in res["dense"]:
        ax.axhline(r["quality"], ls="--", lw=1, color="grey")
        ax.annotate(r["label"], (2, r["quality"]), fontsize=8, color="grey", va="bottom")
    if at_frac is not None:
        ax.axvline(100 * at_frac, ls=":", lw=1, color="black")
    ax.set_xlabel("FFN FLOPs (% of dense)")
    split = {"calib": "calibration-split", "heldout": "held-out"}.get(res.get("split"), "")
    ax.set_ylabel(f"{split} {res['metric']}")
    if res["metric"] == "perplexity":
        ax.set_yscale("log")
    ax.set_xlim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", action="append", help="LABEL=calibrated artifact")
    ap.add_argument("--dense", action="append", help="LABEL=plain model (reference line)")
    ap.add_argument("--data", default="bbc-news")
    ap.add_argument("--tokens", type=int, default=12288)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rules", default="", help="e.g. per-layer-threshold,global-tau")
    ap.add_argument("--at", type=float, default=None, help="report quality at this FFN fraction")
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    ap.add_argument("--from-json", default=None, help="re-render a saved --json result")
    ap.add_argument(
        "--calibration-split",
        action="store_true",
        help="plot the rows calibrate measured (calibration split) instead of re-measuring",
    )
    args = ap.parse_args()
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
    elif args.calibration_split:
        res = from_calibration(args)
    else:
        res = measure(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    if args.png:
        plot(res, args.png, args.at)
    print(markdown(res, args.at))


if __name__ == "__main__":
    main()
