"""`heal`: fine-tune a converted model at its chosen routing, distilling the model it was
converted from, so that the weights adapt to the experts (or input entries) the routing skips.

Skipping part of an FFN removes part of its output; a model that has never seen that happen
loses more than one that has. `heal` trains the artifact with its routing applied (the masked
reference path: the skipped units get no output and no gradient) to match the next-token
distribution of the same artifact with every expert executed, i.e. the model before routing,
held frozen beside it. With the default `--lm-weight 0` the loss is the KL divergence alone:
the model learns nothing from the text but how to behave like its own dense self under the
routing, so its baseline stays the original model (a language-model loss on in-domain text
would lower perplexity by itself, which is not the routing's gain).

The routing's thresholds were calibrated on the weights before healing; the skipped share
moves a little as the weights move, so `heal` reports the FLOPs before and after and `eval`
measures them again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from d2d.errors import D2DError
from d2d.stages.base import Stage, Table, TrainFields, at_least, corpus_of, one_of, pct, thin

TRAINS = ("all", "ffn")


@dataclass
class HealConfig(TrainFields):
    lm_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the language-model loss beside the KL to the model before "
            "routing (0: distillation alone, so the baseline stays the input model)."
        },
    )
    trains: str = field(
        default="all",
        metadata={"help": "Weights that train: all, or ffn (the converted FFNs' experts only)."},
    )

    def __post_init__(self):
        at_least(self, 0, "lm_weight")
        one_of("trains", self.trains, TRAINS)
        super().__post_init__()


class HealTask:
    """The training loop's task: KL(model with every expert || model under its routing)."""

    def __init__(self, teacher, ids, cfg: HealConfig, evaluate_fn):
        self.teacher, self.ids, self.cfg, self.evaluate_fn = teacher, ids, cfg, evaluate_fn
        self.n_examples = len(ids)

    def batch(self, indices) -> dict:
        return {"input_ids": self.ids[indices]}

    def loss(self, model, batch: dict, step: int):
        from d2d.train import next_token_loss, teacher_kl

        logits = model(**batch).logits
        kl = teacher_kl(self.teacher, logits, batch)
        logs = {"kl": float(kl.detach()), "loss": float(kl.detach())}
        loss = kl
        if self.cfg.lm_weight > 0:
            lm = next_token_loss(logits, batch["input_ids"])
            loss = kl + self.cfg.lm_weight * lm
            logs["lm"] = float(lm.detach())
        return loss, logs

    def evaluate(self, model) -> dict:
        return self.evaluate_fn(model)


def run(art, cfg: HealConfig, progress, out=None):
    """Fine-tune art.model at its routing. Returns (metrics, structure)."""
    import torch

    from d2d.data import lm_windows
    from d2d.dist import is_main_process
    from d2d.measure.evaluate import Evaluator
    from d2d.models import task_of
    from d2d.nn.policy import ALL
    from d2d.nn.routing import apply_routing
    from d2d.nn.structure import moe_layers
    from d2d.train import frozen_copy, train_stage

    model = art.model
    policy = art.meta.get("routing")
    if not policy or policy.get("rule") == "all":
        raise D2DError(
            "heal needs a chosen routing that skips experts: run d2d calibrate first "
            "(its --target-flops or --max-quality-drop picks one)"
        )
    if task_of(model) != "causal-lm":
        raise D2DError("heal distils next-token distributions: give a causal language model")
    teacher = frozen_copy(model)
    apply_routing(teacher, ALL)
    moes = moe_layers(model)
    if cfg.trains == "ffn":
        model.requires_grad_(False)
        for m in moes.values():
            for name, p in m.named_parameters():
                p.requires_grad_(not name.startswith("router."))
    else:
        for m in moes.values():  # routers rank experts; the KL gives them no gradient
            if m.router is not None:
                m.router.requires_grad_(False)
    ev = Evaluator.of(model, art.tokenizer, cfg, "heldout", cfg.eval_tokens)

    def evaluate(m) -> dict:
        routed, dense = ev.measure(m, policy), ev.measure(m, ALL)
        return {
            "routed": routed.quality,
            "dense": dense.quality,
            "ffn_fraction": routed.ffn_fraction,
            "model_fraction": routed.model_fraction,
        }

    main = is_main_process()
    before = evaluate(model) if main else None
    if main:
        progress("held-out before", 1, 1, perplexity=before["routed"])
    ids = lm_windows(art.tokenizer, corpus_of(cfg).split("train", cfg.seed), cfg.seq_len, None)
    task = HealTask(teacher, ids, cfg, evaluate)
    torch.manual_seed(cfg.seed)
    try:
        result = train_stage(model, task, cfg, art.meta["base"]["source"], out, progress, "heal")
    finally:
        model.requires_grad_(True)
    apply_routing(model, policy)
    if not main:
        return {"history": result.history[-1:]}, {}
    after = result.evals[-1]
    metrics = {
        "metric": "perplexity",
        "policy": policy,
        "before": before,
        "after": after,
        "evals": result.evals,
        "history": thin(result.history, 200),
        "resumed_from": result.resumed_from,
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "trains": cfg.trains,
    }
    return metrics, {}


def summary(record: dict) -> str:
    m = record["metrics"]
    b, a = m["before"], m["after"]
    return (
        f"routed perplexity {b['routed']:.4g} -> {a['routed']:.4g} "
        f"(every expert {b['dense']:.4g} -> {a['dense']:.4g}) at "
        f"{pct(a['ffn_fraction'])} of the FFN FLOPs"
    )


def view(record: dict) -> list:
    m = record["metrics"]
    t = Table(
        f"heal: held-out perplexity, {m['tokens_seen']} training tokens (KL to every expert)",
        ["", "at the routing", "every expert", "FFN FLOPs", "model FLOPs"],
    )
    for label, r in (("before", m["before"]), ("after", m["after"])):
        t.add(
            label,
            f"{r['routed']:.4g}",
            f"{r['dense']:.4g}",
            pct(r["ffn_fraction"]),
            pct(r["model_fraction"]),
        )
    return [t]


STAGE = Stage(
    "heal",
    HealConfig,
    run,
    help="Fine-tune at the chosen routing, distilling the model with every expert.",
    requires=("convert", "calibrate"),
    takes_out=True,
    summary=summary,
    view=view,
)
