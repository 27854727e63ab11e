"""`sparsify`: fine-tune a dense model so that few FFN neurons fire per token (D2DMoE, step 1).

Loss = task loss + w(t) x penalty, the penalty (square Hoyer or L1, d2d.nn.activations)
averaged over the FFN layers and over the real (non-padding) tokens of the batch. Optionally
the activation is swapped for ReLU first ("relufication"), so that inactive neurons give exact
zeros; the model config then names ReLU, and d2d.json records the swap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from d2d.errors import D2DError
from d2d.stages.base import DistillFields, Stage, Table, at_least, corpus_of, one_of, pct, thin

TASKS = ("auto", "causal-lm", "classification")
PENALTIES = ("hoyer", "l1")
WEIGHT_SCHEDULES = ("linear", "constant")
PENALTY_TARGETS = ("hidden", "gate")  # d2d.nn.activations.TAP_TARGETS (kept torch-free here)


@dataclass
class SparsifyConfig(DistillFields):
    task: str = field(
        default="auto",
        metadata={
            "help": "auto (from model and data), causal-lm, or classification "
            "(adds a head to a bare encoder; labels from the data)."
        },
    )
    penalty: str = field(
        default="hoyer", metadata={"help": "Sparsity penalty: hoyer (square Hoyer) or l1."}
    )
    weight: float = field(default=0.01, metadata={"help": "Penalty weight (0: plain fine-tune)."})
    projection_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the same penalty on the hidden activations of the attention "
            "projections' MLPs (made by attention-mlp), on the same schedule (0: none)."
        },
    )
    schedule: str = field(
        default="linear", metadata={"help": "Penalty weight schedule: linear warm-up or constant."}
    )
    weight_warmup: float = field(
        default=0.2, metadata={"help": "Fraction of steps to reach the full penalty weight."}
    )
    relu: bool = field(
        default=False,
        metadata={"help": "Swap the FFN activation for ReLU first (exact zeros)."},
    )
    penalty_on: str = field(
        default="hidden",
        metadata={
            "help": "What the penalty reads: hidden (the down projection's input) or gate "
            "(the gate's activation alone, in gated FFNs; the same as hidden elsewhere)."
        },
    )

    def __post_init__(self):
        one_of("task", self.task, TASKS)
        one_of("penalty", self.penalty, PENALTIES)
        one_of("schedule", self.schedule, WEIGHT_SCHEDULES)
        one_of("penalty_on", self.penalty_on, PENALTY_TARGETS)
        at_least(self, 0, "weight", "projection_weight")
        if not 0 <= self.weight_warmup <= 1:
            raise D2DError(f"weight-warmup must be in [0, 1], got {self.weight_warmup}")
        super().__post_init__()


def weight_at(step: int, steps: int, weight: float, schedule: str, warmup: float) -> float:
    """Penalty weight for optimizer step `step` (0-based): linear warm-up to `weight` by
    `warmup` x steps, or constant."""
    if schedule == "constant" or warmup <= 0:
        return weight
    ramp = max(1, math.ceil(warmup * steps))
    return weight * min(1.0, (step + 1) / ramp)


def resolve_task(current: str, cfg: SparsifyConfig, has_labels: bool, model_name: str) -> str:
    """The task to fine-tune for, from --task, the model's own task and the data's labels."""
    task = cfg.task
    if task == "auto":
        if current == "causal-lm":
            return "causal-lm"
        if current == "classification" or has_labels:
            return "classification"
        raise D2DError(
            f"{model_name} is a bare encoder and data {cfg.data} has no labels: "
            "give labelled data (class sub-folders or a 'label' column) for classification"
        )
    if task == "causal-lm" and current != "causal-lm":
        raise D2DError(f"--task causal-lm needs a causal language model, not {model_name}")
    if task == "classification":
        if current == "causal-lm":
            raise D2DError("--task classification needs an encoder, not a causal language model")
        if not has_labels:
            raise D2DError(
                f"data {cfg.data} has no labels, which --task classification needs: use a "
                "folder of class sub-folders or a table with a 'label' column"
            )
    return task


@dataclass
class SparsifyTask:
    """Examples and loss for the training loop: task loss + scheduled penalty."""

    kind: str  # causal-lm | classification
    inputs: dict  # name -> tensor [N, ...]
    cfg: SparsifyConfig
    evaluate_fn: object
    teacher: object = None  # the frozen input model, for --distill

    @property
    def n_examples(self) -> int:
        return int(self.inputs["input_ids"].shape[0])

    def batch(self, indices) -> dict:
        return {k: v[indices] for k, v in self.inputs.items()}

    def loss(self, model, batch, step):
        from d2d.nn.activations import penalty, pooled_shares, sparsity_stats, tapped
        from d2d.nn.projection import tapped_projections

        c = self.cfg
        w = weight_at(step, c.steps, c.weight, c.schedule, c.weight_warmup)
        kw = dict(batch)
        if self.kind == "causal-lm":
            kw["labels"] = kw["input_ids"]
        with tapped(model, c.penalty_on) as acts, tapped_projections(model) as proj:
            out = model(**kw)
        mask = batch.get("attention_mask")
        pen = penalty(acts, c.penalty, mask)
        task_loss = out.loss.float()
        loss = task_loss + w * pen if w > 0 else task_loss
        pen_p = penalty(proj, c.penalty, mask) if proj and c.projection_weight > 0 else None
        if pen_p is not None:  # the FFN penalty's schedule, at its own weight
            wp = weight_at(step, c.steps, c.projection_weight, c.schedule, c.weight_warmup)
            loss = loss + wp * pen_p
        kl = None
        if self.teacher is not None:
            from d2d.train import teacher_kl

            # a classifier's logits are per example: the token mask does not apply
            kl_mask = mask if self.kind == "causal-lm" else None
            kl = teacher_kl(self.teacher, out.logits, kw, kl_mask)
            loss = loss + c.distill_weight * kl
        zeros, near = pooled_shares(sparsity_stats(acts, mask))
        logs = {
            "loss": float(task_loss.detach()),
            "penalty": float(pen.detach()),
            "weight": w,
            "sparsity": near,
            "zeros": zeros,
        }
        if kl is not None:
            logs["kl"] = float(kl.detach())
        if pen_p is not None:
            logs["projection_penalty"] = float(pen_p.detach())
            logs["projection_zeros"] = pooled_shares(sparsity_stats(proj, mask))[0]
        return loss, logs

    def evaluate(self, model) -> dict:
        return self.evaluate_fn(model)


def run(art, cfg: SparsifyConfig, progress, out=None):
    """Fine-tune art.model (replaced when a head is added). Returns (metrics, structure)."""
    from d2d.data import encode_docs, lm_windows
    from d2d.dist import is_main_process
    from d2d.measure.evaluate import Evaluator
    from d2d.measure.sparsity import mean_sparsity, measure_sparsity
    from d2d.models import task_of, with_classification_head
    from d2d.nn.activations import neuron_oracle, relufy
    from d2d.nn.policy import ALL
    from d2d.nn.structure import moe_layers
    from d2d.train import train_stage

    if moe_layers(art.model):
        raise D2DError("sparsify runs on a dense model: sparsify first, then d2d convert")
    if cfg.projection_weight > 0:
        from d2d.nn.projection import projection_mlps

        if not projection_mlps(art.model):
            raise D2DError(
                "--projection-weight needs attention projections replaced by MLPs: run d2d "
                "attention-mlp first, or leave --projection-weight out"
            )
    corpus = corpus_of(cfg)
    name = type(art.model).__name__
    task = resolve_task(task_of(art.model), cfg, corpus.labels is not None, name)
    structure: dict = {"task": task, "relu": cfg.relu}
    teacher = None
    if cfg.distill:
        if task_of(art.model) != task:
            raise D2DError(
                f"--distill needs the input model's own outputs, and {name} has no "
                f"{task} head yet: fine-tune it without --distill"
            )
        from d2d.train import frozen_copy

        teacher = frozen_copy(art.model)
    if task == "classification":
        art.model = with_classification_head(art.model, corpus.label_names, cfg.seed)
        art.meta["model_class"] = type(art.model).__name__
        structure["num_labels"] = len(corpus.label_names)
    if cfg.relu:
        relufy(art.model)
    model, tok = art.model, art.tokenizer

    train_split = corpus.split("train", cfg.seed)
    if task == "causal-lm":
        inputs = {"input_ids": lm_windows(tok, train_split, cfg.seq_len, None)}
    else:
        ids, mask, labels = encode_docs(tok, train_split, cfg.seq_len, None)
        inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    ev = Evaluator.of(model, tok, cfg, "heldout", cfg.eval_tokens)

    def evaluate(m):
        q = ev.measure(m, ALL).quality
        with neuron_oracle(m, 0.5):
            q_half = ev.measure(m, ALL).quality
        sp = measure_sparsity(m, ev.batches, cfg.bf16)
        return {
            "quality": q,
            "quality_top50": q_half,
            "near_zero": mean_sparsity(sp, "near_zero"),
            "zero": mean_sparsity(sp, "zero"),
            "layers": sp,
        }

    main = is_main_process()  # evaluations run on the main process only
    before = evaluate(model) if main else None
    if main:
        progress("held-out before", 1, 1, quality=before["quality"])
    st = SparsifyTask(task, inputs, cfg, evaluate, teacher)
    result = train_stage(model, st, cfg, art.meta["base"]["source"], out, progress, "sparsify")
    if not main:
        return {"task": task, "history": thin(result.history, 200)}, structure
    after = result.evals[-1]
    metrics = {
        "task": task,
        "metric": ev.metric,
        "quality_before": before["quality"],
        "quality_after": after["quality"],
        "quality_top50_before": before["quality_top50"],
        "quality_top50_after": after["quality_top50"],
        "head": "new" if "num_labels" in structure else "kept",
        "tokens_seen": cfg.steps * cfg.batch_size * inputs["input_ids"].shape[1],
        "train_examples": st.n_examples,
        "heldout_tokens": ev.tokens,
        "sparsity_before": {k: before[k] for k in ("zero", "near_zero", "layers")},
        "sparsity_after": {k: after[k] for k in ("zero", "near_zero", "layers")},
        "evals": [{k: v for k, v in e.items() if k != "layers"} for e in result.evals],
        "history": thin(result.history, 200),
        "resumed_from": result.resumed_from,
    }
    return metrics, structure


def replay(model, structure: dict) -> None:
    if structure.get("relu"):
        from d2d.nn.activations import relufy

        relufy(model)


def summary(record: dict) -> str:
    m, st = record["metrics"], record.get("structure") or {}
    sb, sa = m["sparsity_before"]["zero"], m["sparsity_after"]["zero"]
    return (
        f"{m['metric']} {m['quality_before']:.4g} -> {m['quality_after']:.4g}; "
        f"zeros {sb:.1%} -> {sa:.1%}" + ("; ReLU swap" if st.get("relu") else "")
    )


def sparsity_table(m: dict) -> Table:
    """Per layer: exact zeros and near zeros (< 1% of the token's max), before and after."""
    b, a = m["sparsity_before"], m["sparsity_after"]
    t = Table(
        "FFN activation sparsity on held-out tokens (zeros / |a| < 1% of token max)",
        ["layer", "zeros before", "zeros after", "near-zero before", "near-zero after"],
    )
    for i in b["layers"]:
        lb, la = b["layers"][i], a["layers"][i]
        t.add(i, pct(lb["zero"]), pct(la["zero"]), pct(lb["near_zero"]), pct(la["near_zero"]))
    t.add(
        "mean",
        pct(b["zero"]),
        pct(a["zero"]),
        pct(b["near_zero"]),
        pct(a["near_zero"]),
        style="bold",
    )
    return t


def view(record: dict) -> list:
    m = record["metrics"]
    head = " (new head: before = untrained)" if m.get("head") == "new" else ""
    return [
        sparsity_table(m),
        f"sparsify: {m['task']}, {m['tokens_seen']} training tokens; held-out "
        f"{m['metric']} {m['quality_before']:.4g} -> {m['quality_after']:.4g}{head}",
    ]


STAGE = Stage(
    "sparsify",
    SparsifyConfig,
    run,
    help="Fine-tune with a sparsity penalty on FFN activations (before convert).",
    must_precede=("convert",),
    takes_out=True,
    replay=replay,
    summary=summary,
    view=view,
)
