"""`calibrate`: sweep the routing, measure cost and quality, pick the operating point.

Rules calibrated side by side on the calibration split:

* global tau: one dynamic-k threshold for every layer (D2DMoE's rule);
* per-layer rules (tau, absolute threshold, top-k; d2d.nn.policy): a value per layer,
  allocated where it costs least for each FFN FLOPs budget from one sensitivity pass
  (d2d.measure.sensitivity); every allocation is measured for real before it can be chosen.

Optionally the first `dense_sink` positions of each sequence run every expert: on decoder LMs
the first token is an attention sink whose FFN output is large and easily damaged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from d2d.errors import D2DError, StageOrderError
from d2d.options import parse_budgets, parse_taus
from d2d.progress import Progress, null_progress
from d2d.stages.base import SampleFields, Stage, Table, change, pct

DEFAULT_TAUS = "0,0.005,0.01,0.02,0.03,0.05,0.075,0.1,0.15,0.2,0.3,0.5,1"
DEFAULT_BUDGETS = "0.95,0.9,0.85,0.8,0.7,0.6,0.5,0.4,0.3,0.2"
DEFAULT_MAX_DROP = 0.02
# a per-layer allocation for budget b measures within about a point of b: --target-flops t
# accepts measured points up to t + TARGET_SLACK
TARGET_SLACK = 0.01


# per-layer rules calibrate allocates: the routers' (d2d.nn.policy's per-layer rules) and the
# router-free exact-magnitude rule ("magnitude": gate and up on the input entries above a
# per-layer threshold, down for the neurons whose |h| x |W_down row| passes another; "split":
# the same rule, each layer's share of the budget allocated from its measured cost)
ROUTER_RULES = ("tau", "threshold", "topk")
FREE_RULES = ("magnitude", "split")
PEERS = ("teal-style", "cats-style")


def parse_rules(spec: str) -> list[str]:
    rules = [r.strip() for r in str(spec).split(",") if r.strip()]
    allowed = ROUTER_RULES + FREE_RULES
    bad = [r for r in rules if r not in allowed]
    if bad or not rules:
        raise D2DError(f"bad per-layer rule list {spec!r}: use some of {', '.join(allowed)}")
    return rules


@dataclass
class CalibrateConfig(SampleFields):
    seq_len: int = field(default=512, metadata={"help": "Tokens per sequence."})
    taus: str = field(
        default=DEFAULT_TAUS,
        metadata={
            "help": "Global taus to sweep: one value or a comma list (--taus: the same).",
            "flag": "tau",
        },
    )
    target_flops: float | None = field(
        default=None,
        metadata={
            "help": "Choose the best quality at <= this FFN FLOPs fraction (with attention "
            "projections converted: of every converted layer's FLOPs; measured points "
            f"within +{TARGET_SLACK:g} count: per-layer allocations land about there)."
        },
    )
    max_quality_drop: float | None = field(
        default=None,
        metadata={
            "help": "Choose the fewest FLOPs whose quality drop <= this (0.02 = 2%), as must "
            "be every point of the same rule with more FLOPs. "
            f"Default when no target is given: {DEFAULT_MAX_DROP:g}."
        },
    )
    count_gains: bool = field(
        default=False,
        metadata={
            "help": "With --max-quality-drop on a classifier: let examples the routing gets "
            "right where the dense model was wrong offset the ones it breaks (the net accuracy "
            "drop). Default: the drop is the share of the dense model's right answers broken, "
            "so that lucky gains on a small calibration split do not pay for real losses."
        },
    )
    per_layer: bool = field(
        default=True, metadata={"help": "Also calibrate per-layer rules (allocated budgets)."}
    )
    layer_rules: str = field(
        default="tau,threshold,topk",
        metadata={
            "help": "Per-layer rules: tau (dynamic-k), threshold (absolute predicted "
            "norm), topk (fixed k per layer); magnitude (no router: gate and up on the input "
            "entries above a per-layer threshold, down for the units whose |h| x |W_down row| "
            "passes another; both allocated per layer from an estimate, best with --expert-size "
            "1); split (the same rule, gate and up reading 5 points more of the input than a "
            "layer's budget, each layer's budget allocated from its measured cost: the "
            "divergence from the dense model with that layer alone routed, 6 levels per layer "
            "on the sensitivity tokens, about 180 forward passes for a 30-layer model)."
        },
    )
    peers: bool = field(
        default=False,
        metadata={
            "help": "Also measure the training-free peers at each budget: TEAL-style (one "
            "magnitude threshold per FFN matrix input) and CATS-style (gate in full, "
            "|act(gate)| threshold; gated FFNs)."
        },
    )
    budgets: str = field(
        default=DEFAULT_BUDGETS,
        metadata={
            "help": "FFN FLOPs budgets of the per-layer rules, comma-separated (with attention "
            "projections converted: budgets of every converted layer's FLOPs)."
        },
    )
    dense_sink: int = field(
        default=1, metadata={"help": "Leading positions of each sequence that run every expert."}
    )
    sensitivity_tokens: int = field(
        default=2048, metadata={"help": "Tokens for the per-layer sensitivity pass."}
    )

    def __post_init__(self):
        parse_taus(self.taus)
        parse_rules(self.layer_rules)
        parse_budgets(self.budgets)
        if self.target_flops is not None and not 0.0 < self.target_flops <= 1.0:
            raise D2DError(f"target-flops must be in (0, 1], got {self.target_flops}")
        if self.max_quality_drop is not None and self.max_quality_drop < 0:
            raise D2DError(f"max-quality-drop must be >= 0, got {self.max_quality_drop}")
        if self.target_flops is not None and self.max_quality_drop is not None:
            raise D2DError("give --target-flops or --max-quality-drop, not both")
        if self.dense_sink < 0:
            raise D2DError("dense-sink must be >= 0, seq-len >= 2 and tokens >= 1")
        super().__post_init__()


def _row(rule: str, policy: dict, m, dense_q: float, metric: str) -> dict:
    from d2d.measure.evaluate import quality_drop

    row = {
        "rule": rule,
        "policy": policy,
        "ffn_fraction": m.ffn_fraction,
        "model_fraction": m.model_fraction,
        "quality": m.quality,
        "drop": quality_drop(metric, m.quality, dense_q),
        "layer_fractions": m.layer_fractions,
    }
    if m.routed_fraction is not None:
        row["routed_fraction"] = m.routed_fraction
    row.update(m.paired())
    return row


def budget_fraction(row: dict) -> float:
    """What budgets and --target-flops measure: the FFN FLOPs fraction, or with attention
    projections converted, that of every converted layer (FFNs and projections)."""
    return row.get("routed_fraction", row["ffn_fraction"])


def choose(rows: list[dict], cfg: CalibrateConfig) -> int:
    """The chosen row: best quality within --target-flops, else fewest FLOPs within the drop
    (with every point of the same rule that runs more FLOPs within it too; a classifier's drop
    counted as the share of the dense model's right answers it breaks, unless --count-gains)."""
    if cfg.target_flops is not None:
        limit = cfg.target_flops + TARGET_SLACK
        ok = [j for j, r in enumerate(rows) if budget_fraction(r) <= limit]
        if not ok:
            raise D2DError(
                f"no calibrated point reaches {cfg.target_flops:.0%} of the FFN FLOPs: "
                "add larger taus to --tau or raise --target-flops"
            )
        return min(ok, key=lambda j: rows[j]["drop"])
    limit = DEFAULT_MAX_DROP if cfg.max_quality_drop is None else cfg.max_quality_drop

    def within(r) -> bool:  # it, and every point of its rule that runs more FLOPs
        return all(
            (q["drop"] if cfg.count_gains else q.get("broken", q["drop"])) <= limit
            for q in rows
            if _family(q) == _family(r) and budget_fraction(q) >= budget_fraction(r)
        )

    ok = [j for j, r in enumerate(rows) if within(r)]
    return min(ok, key=lambda j: (budget_fraction(rows[j]), rows[j]["drop"]))


def _family(row: dict) -> str:
    """A row's rule without its parameter ("global tau 0.1" -> "global tau"): a point that
    passes the quality limit while a point of its rule with more FLOPs fails it passed by the
    calibration split's noise, and --max-quality-drop does not choose it."""
    label = row.get("rule", "")
    return label.rsplit(" ", 1)[0] if " " in label else label


def sweep(
    model,
    ev,
    cfg: CalibrateConfig,
    progress: Progress = null_progress,
    scores: str = "router",
    sensitivity_ev=None,
):
    """Measure the dense model, every global tau and every per-layer allocation on `ev`.
    Returns (rows, measurements) in the same order; `scores="oracle"` ranks experts by their
    true output norms instead of the routers' predictions (the ceiling of a rule). The
    per-layer allocation reads `sensitivity_ev`'s batches (default: `ev`'s)."""
    from d2d.measure.sensitivity import allocate, layer_sensitivity
    from d2d.nn.policy import ALL, layer_policy
    from d2d.nn.structure import moe_layers

    routers = all(m.router is not None for m in moe_layers(model).values())
    dense = ev.measure(model, ALL, progress, "dense reference")
    rows = [_row("dense", {"rule": "all"}, dense, dense.quality, ev.metric)]
    measured = [dense]
    sink = cfg.dense_sink
    extra = {} if scores == "router" else {"scores": scores}
    taus = parse_taus(cfg.taus) if routers or scores == "oracle" else []
    rules = parse_rules(cfg.layer_rules)
    if not (routers or scores == "oracle"):
        rules = [r for r in rules if r in FREE_RULES]

    def add(rule: str, pol: dict, budget: float | None = None, got=None):
        measured.append(got or ev.measure(model, pol, progress, f"measuring {rule}"))
        rows.append(_row(rule, pol, measured[-1], dense.quality, ev.metric))
        if budget is not None:
            rows[-1]["budget"] = budget

    def trial(pol: dict):
        got = ev.measure(model, pol, progress, "measuring a trial split")
        return _row("", pol, got, dense.quality, ev.metric)["drop"], got

    for j, tau in enumerate(taus):
        add("global-tau", {"rule": "tau", "tau": tau, "dense_positions": sink, **extra})
        progress("global tau sweep", j + 1, len(taus), tau=tau)
    if cfg.per_layer or cfg.peers:
        sens_ev = sensitivity_ev or ev
        sens = layer_sensitivity(
            model, sens_ev, sink, cfg.sensitivity_tokens, cfg.seed, scores, progress
        )
        budgets = set(parse_budgets(cfg.budgets))
        if cfg.target_flops:
            budgets.add(cfg.target_flops)
        budgets = sorted(budgets, reverse=True)
        for rule in rules if cfg.per_layer else []:
            if rule in FREE_RULES:
                continue
            table = sens.table(rule, progress)
            for j, b in enumerate(budgets):
                add(
                    f"per-layer-{rule}",
                    layer_policy(rule, allocate(table, b, sens.weights()), sink, **extra),
                    b,
                )
                progress(f"per-layer {rule}", j + 1, len(budgets), budget=b)
        free = cfg.per_layer and "magnitude" in rules
        split = cfg.per_layer and "split" in rules  # measured on the sensitivity tokens
        cost = sens_ev.first(cfg.sensitivity_tokens).divergence if split else None
        free_rows(model, sens, budgets, sink, free, cfg.peers, add, progress, trial, cost)
    return rows, measured


# the exact-magnitude rule at a uniform split: shares of the input that gate and up read,
# above the budget, tried at each budget (the units' share then follows from the budget)
SPLIT_STEPS = (0.0, 0.05, 0.1)


def free_rows(
    model,
    sens,
    budgets,
    sink: int,
    magnitude: bool,
    peers: bool,
    add,
    progress,
    trial=None,
    divergence=None,
):
    """The router-free rows at each budget: d2d's exact-magnitude rule (allocated per layer,
    and at the best uniform split of the budget between gate/up's input and down's units),
    with `divergence` (policy -> its measured cost on calibration text) the split allocated per
    layer from measured costs, and the peers. `add(rule, policy, budget, measurement=None)`
    measures (unless given) and records one row; `trial(policy)` measures without recording
    and returns (drop, measurement): the split is chosen by it (on calibration text) before its
    row is recorded."""
    from d2d.measure.sensitivity import allocate, magnitude_table

    table = magnitude_table(sens, progress) if magnitude else None
    measured = None
    if divergence is not None:
        measured = measured_split_table(sens, lambda p: divergence(model, p), sink, progress)
    for j, b in enumerate(budgets):
        if measured is not None:
            add("per-layer-split", magnitude_policy(allocate(measured, b, sens.weights()), sink), b)
        if table is not None:
            add(
                "per-layer-magnitude", magnitude_policy(allocate(table, b, sens.weights()), sink), b
            )
            tried = [(trial(p), p) for p in split_policies(sens, b, sink)] if trial else []
            if tried:
                (_, got), pol = min(tried, key=lambda t: t[0][0])
                add("split-magnitude", pol, b, got)
        for name, pol in (peer_policies(model, sens, b, sink) if peers else {}).items():
            add(name, pol, b)
        progress("router-free rules", j + 1, len(budgets), budget=b)


def split_policies(sens, budget: float, sink: int) -> list[dict]:
    """The exact-magnitude rule at each uniform split of an FFN `budget` (SPLIT_STEPS): every
    layer reads the share `budget + step` of its input in gate and up and runs the units that
    the rest of the budget pays for, ranked by |h| x their down row's norm."""
    from d2d.measure.sensitivity import split_thresholds, unit_share

    out = []
    for step in SPLIT_STEPS:
        keep = min(1.0, budget + step)
        units = {i: unit_share(m, budget, keep) for i, m in sens.moes.items()}
        if any(u is None for u in units.values()):
            continue
        t_in, t_unit = split_thresholds(sens, keep, units, weighted=True)
        pol = magnitude_policy({i: (t_in[i], t_unit[i]) for i in t_in}, sink)
        out.append({**pol, "input_share": keep})
        if keep >= 1.0:
            break
    return out


# the split allocated per layer: the FFN budgets a layer may take besides every unit, and how
# much more of the input than its budget gate and up read there (units get the rest)
SPLIT_LEVELS = (0.85, 0.75, 0.65, 0.55, 0.45, 0.35)
SPLIT_STEP = 0.05


def measured_split_table(sens, cost, sink: int, progress=None, levels=SPLIT_LEVELS) -> dict:
    """Per layer, the exact-magnitude rule at the split of each level b of `levels` (gate and
    up read the share min(1, b + SPLIT_STEP) of the input, down runs the units that the rest of
    b pays for, thresholds from the calibration sample) and its measured cost: `cost(policy)`
    with only this layer routed (the rest run every unit). Returns `allocate`'s table: FFN
    fractions (every unit first, at cost 0), costs made non-decreasing with the savings, and
    (input, unit) thresholds. The costs of layers routed alone do not add up exactly (a layer's
    error changes what the next sees); they rank the layers, which is what the allocation
    needs."""
    from d2d.measure.sensitivity import cost_table, split_thresholds, unit_share

    points = {i: [(1.0, 0.0, (0.0, 0.0))] for i in sens.moes}
    steps = len(levels) * len(sens.moes)
    for j, b in enumerate(levels):
        keep = min(1.0, b + SPLIT_STEP)
        units = {i: unit_share(m, b, keep) for i, m in sens.moes.items()}
        t_in, t_unit = split_thresholds(sens, keep, {i: u or 1.0 for i, u in units.items()}, True)
        for k, i in enumerate(sens.moes):
            if progress is not None:
                progress("measured split costs, layer x level", j * len(sens.moes) + k, steps)
            if units[i] is None:  # gate and up alone exceed this level
                continue
            params = (t_in[i], t_unit[i])
            points[i].append((b, cost(magnitude_policy({i: params}, sink)), params))
    return {i: cost_table(*zip(*pts, strict=True)) for i, pts in points.items()}


def magnitude_policy(params: dict, sink: int) -> dict:
    """The exact-magnitude rule's policy from per-layer (input, unit) thresholds."""
    return {
        "rule": "threshold",
        "scores": "magnitude",
        "thresholds": {str(i): t_h for i, (_, t_h) in params.items()},
        "input_thresholds": {str(i): t_x for i, (t_x, _) in params.items()},
        "dense_positions": sink,
    }


def peer_policies(model, sens, budget: float, sink: int) -> dict[str, dict]:
    """The training-free peers at an FFN FLOPs budget, thresholds from calibration statistics:
    TEAL-style keeps `budget` of every matrix's input (gate and up: x; down: h); CATS-style
    computes the gate in full (a third of the FFN) and keeps (budget - 1/3) x 3/2 of the units
    by |act(gate)| (gated FFNs, budgets above 1/3)."""
    from d2d.measure.sensitivity import cats_thresholds, teal_thresholds

    t_in, t_unit = teal_thresholds(sens, budget)
    out = {
        "teal-style": {
            "rule": "threshold",
            "scores": "activation",
            "thresholds": {str(i): v for i, v in t_unit.items()},
            "input_thresholds": {str(i): v for i, v in t_in.items()},
            "dense_positions": sink,
        }
    }
    # FFN layers (int keys); converted attention projections are not gated
    gated = all(m.gated for i, m in sens.moes.items() if isinstance(i, int))
    if gated and budget > 1 / 3:
        keep = min(1.0, (budget - 1 / 3) * 1.5)
        t = cats_thresholds(sens, keep)
        out["cats-style"] = {
            "rule": "threshold",
            "scores": "gate",
            "thresholds": {str(i): v for i, v in t.items()},
            "dense_positions": sink,
        }
    return out


def calibrate(model, tokenizer, cfg: CalibrateConfig, progress: Progress = null_progress) -> dict:
    """Sweep on the calibration split; returns the calibration record (table + choice)."""
    from d2d.measure.evaluate import Evaluator
    from d2d.nn.structure import moe_layers

    moes = moe_layers(model)
    if not moes:
        raise D2DError("calibrate needs a converted model: run d2d convert first")
    free = cfg.peers or any(r in FREE_RULES for r in parse_rules(cfg.layer_rules))
    if any(m.router is None for m in moes.values()) and not free:
        raise StageOrderError(
            "calibrate needs an artifact that went through 'train-routers' first: run d2d "
            "train-routers on it, then d2d calibrate (or calibrate rules that need no routers: "
            "--layer-rules magnitude, --peers)"
        )
    ev = Evaluator.of(model, tokenizer, cfg, "calib")
    rows, measured = sweep(model, ev, cfg, progress)
    pick = choose(rows, cfg)
    return {
        "split": "calib",
        "tokens": ev.tokens,
        "metric": ev.metric,
        "dense_quality": rows[0]["quality"],
        "rows": rows,
        "choice": pick,
        # how often each expert ran, and how many experts each token ran, at the choice
        "usage": measured[pick].usage,
        "k_hist": measured[pick].k_hist,
        "config": asdict(cfg),
    }


def run(art, cfg: CalibrateConfig, progress):
    from d2d.nn.routing import apply_routing

    record = calibrate(art.model, art.tokenizer, cfg, progress)
    chosen = record["rows"][record["choice"]]
    art.meta["calibration"] = record
    art.meta["routing"] = chosen["policy"]
    apply_routing(art.model, chosen["policy"])
    metrics = {k: chosen[k] for k in ("rule", "ffn_fraction", "model_fraction", "quality", "drop")}
    metrics["metric"] = record["metric"]
    metrics["dense_quality"] = record["dense_quality"]
    return metrics, {}


def summary(record: dict) -> str:
    m = record["metrics"]
    return (
        f"{m['rule']}: {m['ffn_fraction']:.1%} FFN / {m['model_fraction']:.1%} model "
        f"FLOPs, {m['metric']} {m['quality']:.4g} (dense {m['dense_quality']:.4g})"
    )


def calibration_table(cal: dict, title: str = "calibration") -> Table:
    """Rows: routing (per-layer rules @ their FLOPs budget), FLOPs fractions, quality."""
    from d2d.nn.policy import row_label

    routed = any("routed_fraction" in r for r in cal["rows"])  # projections converted
    paired = any("broken" in r for r in cal["rows"])  # a classifier: changes against dense
    t = Table(
        f"{title}; FLOPs as a fraction of dense",
        ["", "routing", "FFN", *(["converted layers"] if routed else []), "model"]
        + [cal["metric"], "change", *(["broken"] if paired else [])],
        left=("", "routing"),
    )
    for j, r in enumerate(cal["rows"]):
        chosen = j == cal.get("choice")
        t.add(
            "->" if chosen else "",
            row_label(r),
            pct(r["ffn_fraction"]),
            *([pct(budget_fraction(r))] if routed else []),
            pct(r["model_fraction"]),
            f"{r['quality']:.4g}",
            change(r["drop"]),
            *([pct(r.get("broken", 0.0))] if paired else []),
            style="chosen" if chosen else None,
        )
    return t


def view(record) -> list:
    m = record["metrics"]
    cal = (record.meta or {}).get("calibration")
    out = [calibration_table(cal, f"calibration ({cal['tokens']} tokens)")] if cal else []
    out.append(
        f"calibrate: chose {m['rule']} at {pct(m['ffn_fraction'])} of FFN FLOPs, "
        f"{m['metric']} {m['quality']:.4g} (dense {m['dense_quality']:.4g}, "
        f"{100 * m['drop']:+.2f}%)"
    )
    return out


def about(meta: dict) -> dict | None:
    """inspect's "calibration" facts (the table without per-layer details)."""
    cal = meta.get("calibration")
    if not cal:
        return None
    facts = {k: cal.get(k) for k in ("split", "tokens", "metric", "dense_quality", "choice")}
    facts["rows"] = [
        {k: r.get(k) for k in ("rule", "policy", "ffn_fraction", "model_fraction", "quality")}
        | ({"budget": r["budget"]} if "budget" in r else {})
        | {"drop": r.get("drop")}
        for r in cal.get("rows", [])
    ]
    return {"calibration": facts}


STAGE = Stage(
    "calibrate",
    CalibrateConfig,
    run,
    help="Sweep tau, measure FLOPs and quality, choose the operating point.",
    requires=("convert",),  # routers too, unless only router-free rules are calibrated
    summary=summary,
    view=view,
    about=about,
)
