"""Selection rules side by side on held-out data, with learned routers and with an oracle:
a thin caller of `d2d eval --compare-rules` that renders its JSON as markdown tables.

    d2d eval ARTIFACT --compare-rules --tokens 12288 --json FILE.json
    python scripts/compare_rules.py FILE.json       # tables for docs/results.md
"""

from __future__ import annotations

import json
import sys


def markdown(path: str) -> str:
    d = json.loads(open(path).read())
    if "metrics" in d:  # d2d eval --compare-rules --json
        m = d["metrics"]
        rules, metric, tokens = m["rules"], m["rows"][0]["metric"], m["tokens"]
    else:  # the earlier script's own JSON (docs/compare_rules_smollm2.json)
        rules = {"dense_quality": d["dense_quality"], "rows": d["rows"]}
        rules["savings"] = d["savings_ratio"]
        metric, tokens = d["metric"], d["tokens"]
        for r in rules["rows"]:  # "router global tau": the scores are the name's first word
            scores, _, rule = r["rule"].partition(" ")
            if r.get("scores") is None and scores in ("router", "oracle"):
                r["scores"], r["rule"] = scores, rule
            r.setdefault("scores", "")
    groups: dict[str, list] = {}
    for r in rules["rows"]:
        groups.setdefault(f"{r['scores']} {r['rule']}".strip(), []).append(r)
    lines = [f"Dense {metric}: {rules['dense_quality']:.2f} on {tokens} held-out tokens.", ""]
    for rule, rows in groups.items():
        key = next((k for k in ("budget", "fraction") if k in rows[0]), "")
        lines += [
            f"**{rule}**",
            "",
            f"| {key or 'tau'} | FFN FLOPs | model FLOPs | {metric} | change |",
        ]
        lines.append("|---|---|---|---|---|")
        for r in rows:
            v = r[key] if key else r.get("tau", r["policy"].get("tau"))
            lines.append(
                f"| {v} | {100 * r['ffn_fraction']:.1f}% | {100 * r['model_fraction']:.1f}% "
                f"| {r['quality']:.2f} | {100 * r['drop']:+.1f}% |"
            )
        lines.append("")
    if rules["savings"]:  # routers and the oracle were both measured
        lines += ["| quality drop | router savings | oracle savings | ratio |", "|---|---|---|---|"]
        for k, v in rules["savings"].items():
            ratio = "n/a" if v["ratio"] is None else f"{v['ratio']:.2f}"
            lines.append(
                f"| {k} | {100 * v['router_savings']:.1f}% | {100 * v['oracle_savings']:.1f}% "
                f"| {ratio} |"
            )
        # each rule with the routers' scores against itself with the oracle's (computed from
        # the rows, so earlier JSON files get it too)
        from d2d.stages.evaluation import savings_ratio

        drops = list(rules["savings"])
        lines += ["", "| rule (router / oracle savings) | " + " | ".join(drops) + " |"]
        lines.append("|---" * (len(drops) + 1) + "|")
        for rule in dict.fromkeys(r["rule"] for r in rules["rows"]):
            per = savings_ratio(rules["rows"], rule)
            if not per:
                continue
            cells = [
                ("n/a" if v["ratio"] is None else f"{v['ratio']:.2f}")
                + f" ({100 * v['router_savings']:.1f}% / {100 * v['oracle_savings']:.1f}%)"
                for v in (per[d] for d in drops)
            ]
            lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    print(markdown(sys.argv[1]))
