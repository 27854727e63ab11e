"""`eval`: quality and FLOPs on held-out data, the converted model beside its dense self.

The routing measured is the artifact's chosen one (or `--tau`); for Mixture-of-Depths
artifacts, both top-k and the causal decision generation uses. Quality is measured with the
masked reference path under bf16 autocast (the fast path's numbers are the same function);
wall-clock time is `d2d bench`'s job, so the table shows none.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from d2d.errors import D2DError
from d2d.stages.base import SampleFields, Stage, Table, change, pct


@dataclass
class EvalConfig(SampleFields):
    tau: float | None = field(
        default=None, metadata={"help": "Evaluate at this global tau instead of the chosen one."}
    )
    seq_len: int = field(default=512, metadata={"help": "Tokens per sequence."})
    tokens: int = field(default=12288, metadata={"help": "Held-out tokens."})

    def __post_init__(self):
        if self.tau is not None and not 0.0 <= self.tau <= 1.0:
            raise D2DError(f"tau must be in [0, 1], got {self.tau}")
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

    policy = chosen_policy(art, cfg.tau)
    ev = Evaluator.of(art.model, art.tokenizer, cfg, "heldout")
    runs = [("dense", {"rule": "all"}, "dense model")]
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
            }
        )
    out = {"split": "heldout", "tokens": ev.tokens, "policy": policy, "rows": rows}
    if blocks:
        out["mod"] = {"layers": sorted(blocks), "capacity": next(iter(blocks.values())).capacity}
    return out, {}


def view(record: dict) -> list:
    from d2d.nn.policy import label

    m = record["metrics"]
    routing = [] if m.get("mod") and m["policy"].get("rule") == "all" else [m["policy"]]
    routing = [f"routing: {label(p)}" for p in routing]
    if m.get("mod"):
        routing.append(f"MoD capacity {m['mod']['capacity']:g}")
    depth = any("depth" in r for r in m["rows"])
    cols = ["model", m["rows"][0]["metric"], "change", "FFN FLOPs", "model FLOPs"]
    cols += ["blocks run", "causal accuracy"] if depth else []
    t = Table(f"held-out evaluation ({m['tokens']} tokens), {', '.join(routing)}", cols)
    for r in m["rows"]:
        d = r.get("depth") or {}
        acc = d.get("predictor_accuracy")
        extra = [pct(d.get("block_fraction", 1.0)), "" if acc is None else pct(acc)]
        t.add(
            r["model"],
            f"{r['quality']:.4g}",
            change(r["drop"]),
            pct(r["ffn_fraction"]),
            pct(r["model_fraction"]),
            *(extra if depth else []),
        )
    return [t, "time: see d2d bench (it times the fast path against dense in one run)"]


STAGE = Stage(
    "eval",
    EvalConfig,
    run,
    help="Quality and FLOPs on held-out data, beside the dense model.",
    writes_artifact=False,
    view=view,
)
