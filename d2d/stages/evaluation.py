"""`eval`: quality and FLOPs on held-out data, the converted model beside its dense self.

The routing measured is the artifact's chosen one (or `--tau`); for Mixture-of-Depths
artifacts, both top-k and the causal decision generation uses. Quality is measured with the
masked reference path under bf16 autocast (the fast path's numbers are the same function);
wall-clock time is `d2d bench`'s job, so the table shows none.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from d2d.errors import D2DError
from d2d.options import parse_budgets
from d2d.stages.base import SampleFields, Stage, Table, agreement_text, change, pct


@dataclass
class EvalConfig(SampleFields):
    tau: float | None = field(
        default=None, metadata={"help": "Evaluate at this global tau instead of the chosen one."}
    )
    compare_rules: bool = field(
        default=False,
        metadata={
            "help": "Also measure the routing rules of --compare on the same held-out tokens, "
            "and the share of the oracle's FFN savings the routers reach at equal quality."
        },
    )
    compare: str = field(
        default="router,oracle",
        metadata={
            "help": "Rule families for --compare-rules: router and oracle (global tau, "
            "per-layer tau / threshold / top-k, static top-k, ranked by the routers or by the "
            "true norms), peers (TEAL-style, CATS-style), magnitude (router-free exact "
            "magnitude), split (the same rule, per-layer budgets from measured costs)."
        },
    )
    compare_budgets: str = field(
        default="0.95,0.9,0.85,0.8,0.7,0.6,0.5,0.4,0.3,0.2",
        metadata={"help": "FFN FLOPs budgets of the per-layer rules and peers compared."},
    )
    lm_eval: str = field(
        default="",
        metadata={
            "help": "Also run these lm-evaluation-harness tasks (comma list; d2d_bbc_topic and "
            "d2d_shakespeare are built from the bundled data) at the routing generation uses "
            "and with every expert, on the same model ('pip install d2d[eval]')."
        },
    )
    lm_eval_include: str = field(
        default="", metadata={"help": "A folder of harness task YAMLs to add to its registry."}
    )
    lm_eval_limit: int = field(
        default=0, metadata={"help": "Documents per harness task (0: all of them)."}
    )
    lm_eval_batch_size: int = field(
        default=8, metadata={"help": "Batch size of the harness's forward passes."}
    )
    layer_errors: bool = field(
        default=False,
        metadata={
            "help": "Also measure each converted layer's relative output error under the "
            "routing against every expert on the same input (FFNs and attention projections)."
        },
    )
    seq_len: int = field(default=512, metadata={"help": "Tokens per sequence."})
    tokens: int = field(default=12288, metadata={"help": "Held-out tokens."})

    def __post_init__(self):
        if self.tau is not None and not 0.0 <= self.tau <= 1.0:
            raise D2DError(f"tau must be in [0, 1], got {self.tau}")
        fams = [f.strip() for f in self.compare.split(",") if f.strip()]
        bad = [f for f in fams if f not in COMPARE_FAMILIES]
        if bad or not fams:
            raise D2DError(
                f"bad --compare {self.compare!r}: use some of {', '.join(COMPARE_FAMILIES)}"
            )
        parse_budgets(self.compare_budgets)
        if self.lm_eval_limit < 0 or self.lm_eval_batch_size < 1:
            raise D2DError("lm-eval-limit must be >= 0 and lm-eval-batch-size >= 1")
        super().__post_init__()


def chosen_policy(art, tau: float | None = None) -> dict:
    """The routing to measure: global `tau` (keeping the chosen sink), else the calibrated
    routing, else every expert for an unconverted (e.g. Mixture-of-Depths only) model."""
    from d2d.nn.policy import global_tau
    from d2d.nn.structure import moe_layers

    converted = bool(moe_layers(art.model))
    if tau is not None:
        if not converted:
            raise D2DError("--tau needs a converted model: run d2d convert first")
        return global_tau(tau, art.meta.get("routing"))
    if art.meta.get("routing"):
        return art.meta["routing"]
    if converted:
        raise D2DError("this artifact has no chosen tau: run d2d calibrate first, or pass --tau")
    return {"rule": "all"}


def run(art, cfg: EvalConfig, progress):
    import time

    from d2d.measure.evaluate import Evaluator, quality_drop
    from d2d.nn.depth import mod_blocks

    if cfg.compare_rules and cfg.tau is None and not art.meta.get("routing"):
        policy = {"rule": "all"}  # not calibrated yet: the rule comparison is the point
    else:
        policy = chosen_policy(art, cfg.tau)
    ev = Evaluator.of(art.model, art.tokenizer, cfg, "heldout")
    from d2d.nn.projection import replaced_projections

    # attention projections replaced by MLPs: every expert is those MLPs, not the model before
    dense_name = "dense (projections as MLPs)" if replaced_projections(art.model) else "dense"
    runs = [(dense_name, {"rule": "all"}, "dense model")]
    blocks = mod_blocks(art.model)
    if blocks:  # routed blocks: the top-k choice and the causal decision
        runs += [
            ("d2d top-k", {**policy, "depth": "topk"}, "top-k routing"),
            ("d2d causal", {**policy, "depth": "causal"}, "causal routing"),
        ]
    else:
        runs.append(("d2d", policy, "converted model"))
    rows, dense = [], None
    for name, pol, label in runs:
        t0 = time.perf_counter()
        m = ev.measure(art.model, pol, progress, label)
        dense = dense or m
        rows.append(
            {
                "model": name,
                "metric": ev.metric,
                "quality": m.quality,
                "drop": quality_drop(ev.metric, m.quality, dense.quality),
                "ffn_fraction": m.ffn_fraction,
                "model_fraction": m.model_fraction,
                # the evaluation's own time (masked reference, bf16): not a speed figure
                "seconds": time.perf_counter() - t0,
                "layer_fractions": m.layer_fractions,
                **({"depth": m.depth} if m.depth else {}),
                **({} if m.routed_fraction is None else {"routed_fraction": m.routed_fraction}),
                **m.paired(),
            }
        )
    out = {"split": "heldout", "tokens": ev.tokens, "policy": policy, "rows": rows}
    if cfg.layer_errors:
        from d2d.nn.structure import moe_layers

        if not moe_layers(art.model):
            raise D2DError("--layer-errors needs a converted model: run d2d convert first")
        out["layer_errors"] = ev.layer_errors(art.model, policy, progress)
    if cfg.compare_rules:
        out["rules"] = compare_rules(art, cfg, ev, progress)
    if cfg.lm_eval:
        from d2d.measure.harness import parse_tasks, run_harness

        generation = {**policy, "depth": "causal"} if blocks else policy
        progress("lm-evaluation-harness", 0, 2)
        out["lm_eval"] = run_harness(
            art.model,
            art.tokenizer,
            parse_tasks(cfg.lm_eval),
            {"dense": {"rule": "all"}, "d2d": generation},
            include=cfg.lm_eval_include or None,
            limit=cfg.lm_eval_limit or None,
            batch_size=cfg.lm_eval_batch_size,
            seq_len=cfg.seq_len,
            seed=cfg.seed,
        )
        progress("lm-evaluation-harness", 2, 2)
    if blocks:
        b = next(iter(blocks.values()))
        out["mod"] = {
            "layers": sorted(blocks),
            "capacity": b.capacity,
            "skip": b.skip,
            "keep_kv": b.keep_kv,
        }
    return out, {}


COMPARE_FAMILIES = ("router", "oracle", "peers", "magnitude", "split")
COMPARE_TAUS = "0.005,0.01,0.02,0.03,0.05,0.075,0.1,0.15,0.2"
COMPARE_TOPK = (0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)
COMPARE_DROPS = (0.01, 0.02, 0.05, 0.1)


def compare_rules(art, cfg: EvalConfig, ev, progress) -> dict:
    """The rule families of `--compare` on `ev` (held-out), per-layer budgets allocated from
    calibration-split sensitivity: "router" and "oracle" (every rule with the routers' or the
    true norms' ranking, and static top-k), "peers" (TEAL-style, CATS-style), "magnitude"
    (d2d's router-free exact-magnitude rule) and "split" (that rule's split allocated per layer
    from costs measured on calibration text); and the router / oracle savings ratio."""
    from d2d.measure.evaluate import Evaluator
    from d2d.measure.sensitivity import layer_sensitivity
    from d2d.nn.policy import ALL
    from d2d.nn.structure import moe_layers
    from d2d.stages.calibrate import CalibrateConfig, _row, free_rows, sweep

    fams = [f.strip() for f in cfg.compare.split(",") if f.strip()]
    moes = moe_layers(art.model)
    if not moes:
        raise D2DError("--compare-rules needs a converted model: run d2d convert first")
    routers = all(m.router is not None for m in moes.values())
    if "router" in fams and not routers:
        raise D2DError(
            "--compare router needs routers: run d2d train-routers first, or leave router out"
        )
    sink = chosen_policy(art, cfg.tau).get("dense_positions", 1) if art.meta.get("routing") else 1
    budgets = parse_budgets(cfg.compare_budgets)
    sw = CalibrateConfig(
        data=cfg.data, doc_split=cfg.doc_split, seq_len=cfg.seq_len, taus=COMPARE_TAUS,
        dense_sink=sink, sensitivity_tokens=2048, seed=cfg.seed, bf16=cfg.bf16,
        budgets=cfg.compare_budgets, layer_rules="tau,threshold,topk",
    )  # fmt: skip
    cal = Evaluator.of(art.model, art.tokenizer, cfg, "calib", 2048)
    dense_q = ev.measure(art.model, ALL).quality
    rows = []
    for scores in [f for f in ("router", "oracle") if f in fams]:
        if routers:
            got, _ = sweep(art.model, ev, sw, progress, scores, sensitivity_ev=cal)
            rows += [{**r, "scores": scores} for r in got[1:]]
        for f in COMPARE_TOPK:
            pol = {"rule": "topk", "fraction": f, "scores": scores, "dense_positions": sink}
            got = ev.measure(art.model, pol, progress, f"measuring static top-k {f:g}")
            row = _row("static-topk", pol, got, dense_q, ev.metric)
            rows.append({**row, "scores": scores, "fraction": f})
        progress(f"comparing rules ({scores} scores)", 1, 1)
    if {"peers", "magnitude", "split"} & set(fams):
        sens = layer_sensitivity(art.model, cal, sink, 2048, cfg.seed)

        def add(rule: str, pol: dict, budget: float, got=None) -> None:
            got = got or ev.measure(art.model, pol, progress, f"measuring {rule}")
            row = _row(rule, pol, got, dense_q, ev.metric)
            rows.append({**row, "scores": pol["scores"], "budget": budget})

        def trial(pol: dict):  # the split is chosen on calibration text, then measured here
            got = cal.measure(art.model, pol, progress, "measuring a trial split")
            return _row("", pol, got, cal_q, cal.metric)["drop"], None

        cal_q = cal.measure(art.model, ALL).quality if "magnitude" in fams else None
        cost = cal.divergence if "split" in fams else None
        free_rows(art.model, sens, budgets, sink, "magnitude" in fams, "peers" in fams, add,
                  progress, trial, cost)  # fmt: skip
    for r in rows:
        r.pop("layer_fractions", None)
    by_rule = {k: savings_ratio(rows, k) for k in dict.fromkeys(r["rule"] for r in rows)}
    return {
        "dense_quality": dense_q,
        "rows": rows,
        "savings": savings_ratio(rows),
        # each rule with the routers' scores against the same rule with the oracle's
        "savings_by_rule": {k: v for k, v in by_rule.items() if v},
    }


def fraction_at(rows: list[dict], scores: str, drop: float, rule: str | None = None) -> float:
    """The lowest FFN fraction any rule (or `rule`) with `scores` reaches at quality drop <=
    `drop`; within one rule, linear interpolation between its neighbouring settings."""
    best = 1.0
    for name in {r["rule"] for r in rows if r["scores"] == scores and rule in (None, r["rule"])}:
        pts = sorted(
            (r["drop"], r["ffn_fraction"])
            for r in rows
            if r["rule"] == name and r["scores"] == scores
        )
        for (d0, f0), (d1, f1) in zip(pts, pts[1:], strict=False):
            if d0 <= drop < d1 and d1 > d0:
                best = min(best, f0 + (f1 - f0) * (drop - d0) / (d1 - d0))
        best = min([best] + [f for d, f in pts if d <= drop])
    return best


def savings_ratio(rows: list[dict], rule: str | None = None) -> dict:
    """Router savings / oracle savings of FFN FLOPs at equal quality drop, for a few drops: the
    best of every rule on each side, or one `rule` on both; empty unless both routers and the
    oracle were measured (nothing to compare otherwise)."""
    out = {}
    if not all(
        any(r.get("scores") == k and rule in (None, r["rule"]) for r in rows)
        for k in ("router", "oracle")
    ):
        return out
    for drop in COMPARE_DROPS:
        r = 1 - fraction_at(rows, "router", drop, rule)
        o = 1 - fraction_at(rows, "oracle", drop, rule)
        out[f"{drop:.0%}"] = {
            "router_savings": r,
            "oracle_savings": o,
            "ratio": r / o if o > 0 else None,
        }
    return out


def _rules_view(rules: dict, metric: str) -> list:
    from d2d.nn.policy import row_label

    t = Table(
        f"every rule, router and oracle scores (dense {metric} {rules['dense_quality']:.4g})",
        ["scores", "routing", "FFN FLOPs", "model FLOPs", metric, "change"],
        left=("scores", "routing"),
    )
    for r in rules["rows"]:
        name = f"static top-k {r['fraction']:.0%}" if "fraction" in r else row_label(r)
        t.add(
            r["scores"],
            name,
            pct(r["ffn_fraction"]),
            pct(r["model_fraction"]),
            f"{r['quality']:.4g}",
            change(r["drop"]),
        )
    s = Table(
        "FFN FLOPs saved at equal quality: routers against the oracle",
        ["quality drop", "router savings", "oracle savings", "ratio"],
    )
    for k, v in rules["savings"].items():
        ratio = "n/a" if v["ratio"] is None else f"{v['ratio']:.2f}"
        s.add(k, pct(v["router_savings"]), pct(v["oracle_savings"]), ratio)
    if not rules["savings"]:
        return [t]
    by_rule = rules.get("savings_by_rule") or {}
    drops = list(rules["savings"])
    b = Table(
        "each rule: router savings / oracle savings at equal quality drop (router and oracle "
        "FFN savings in brackets)",
        ["rule", *drops],
        left=("rule",),
    )
    for rule, vals in by_rule.items():
        b.add(rule, *(_ratio_cell(vals[d]) for d in drops))
    return [t, s, b] if by_rule else [t, s]


def _ratio_cell(v: dict) -> str:
    ratio = "n/a" if v["ratio"] is None else f"{v['ratio']:.2f}"
    return f"{ratio} ({pct(v['router_savings'])} / {pct(v['oracle_savings'])})"


def view(record: dict) -> list:
    from d2d.nn.depth import RUN_LABEL, skip_text
    from d2d.nn.policy import label

    m = record["metrics"]
    routing = [] if m.get("mod") and m["policy"].get("rule") == "all" else [m["policy"]]
    routing = [f"routing: {label(p)}" for p in routing]
    mod = m.get("mod") or {}
    if mod:
        what = skip_text(mod.get("skip", "block"), mod.get("keep_kv", False))
        routing.append(f"MoD capacity {mod['capacity']:g}, skipping {what}")
    depth = any("depth" in r for r in m["rows"])
    routed = any("routed_fraction" in r for r in m["rows"])  # attention projections converted
    paired = any("broken" in r for r in m["rows"])  # a classifier: changes against dense
    cols = ["model", m["rows"][0]["metric"], "change"] + (["broken"] if paired else [])
    cols += ["FFN FLOPs"]
    cols += ["converted layers' FLOPs"] if routed else []
    run_label = RUN_LABEL[mod.get("skip", "block")]  # the share of (token, block) pairs
    cols += ["model FLOPs"] + ([run_label, "causal decision agrees with"] if depth else [])
    t = Table(f"held-out evaluation ({m['tokens']} tokens), {', '.join(routing)}", cols)
    for r in m["rows"]:
        d = r.get("depth") or {}
        extra = [pct(d.get("block_fraction", 1.0)), agreement_text(d)]
        t.add(
            r["model"],
            f"{r['quality']:.4g}",
            change(r["drop"]),
            *([pct(r.get("broken", 0.0))] if paired else []),
            pct(r["ffn_fraction"]),
            *([pct(r.get("routed_fraction", 1.0))] if routed else []),
            pct(r["model_fraction"]),
            *(extra if depth else []),
        )
    out = [t, "time: see d2d bench (it times the fast path against dense in one run)"]
    if m.get("layer_errors"):
        from d2d.nn.policy import key_order

        e = Table(
            "each converted layer's output under the routing against every expert "
            "(relative squared error, the model routed throughout)",
            ["layer", "relative error", "experts run"],
        )
        fr = m["rows"][-1].get("layer_fractions", {})
        for k in sorted(m["layer_errors"], key=key_order):
            e.add(k, f"{m['layer_errors'][k]:.4f}", pct(fr[k]) if k in fr else "")
        out.append(e)
    if m.get("rules"):
        out += _rules_view(m["rules"], m["rows"][0]["metric"])
    if m.get("lm_eval"):
        out += harness_view(m["lm_eval"])
    return out


def harness_view(h: dict) -> list:
    """The harness's figures: task, metric, dense, d2d, change; and the FLOPs spent."""
    f = h["flops"]["d2d"]
    t = Table(
        f"lm-evaluation-harness {h['versions']['lm_eval']} (d2d at {pct(f['ffn_fraction'])} "
        f"of the FFN FLOPs, {pct(f['model_fraction'])} of the model's, on these tasks' tokens)",
        ["task", "metric", "dense", "d2d", "change"],
        left=("task", "metric"),
    )
    for task, metrics in sorted(h["tasks"].items()):
        n = h.get("n_samples", {}).get(task)
        name = f"{task} ({n} documents)" if n else task
        for metric, v in metrics.items():
            dense, ours = v.get("dense"), v.get("d2d")
            if dense is None or ours is None:
                continue
            rel = (ours - dense) / abs(dense) if dense else 0.0
            t.add(name, metric, f"{dense:.4g}", f"{ours:.4g}", f"{100 * rel:+.1f}%")
    return [t]


STAGE = Stage(
    "eval",
    EvalConfig,
    run,
    help="Quality and FLOPs on held-out data, beside the dense model.",
    writes_artifact=False,
    view=view,
)
