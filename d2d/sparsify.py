"""`sparsify`: fine-tune a dense model so that few FFN neurons fire per token (D2DMoE, step 1).

Loss = task loss + w(t) x penalty, the penalty averaged over the FFN layers and over the real
(non-padding) tokens of the batch. The FFN's intermediate activations are the input of its down
projection (act(gate) * up for gated FFNs), read by a forward pre-hook.

- square Hoyer (default): ||a||_1^2 / ||a||_2^2 per token, between 1 (one active neuron) and
  the FFN width (all equal);
- L1: ||a||_1 per token.

Optionally the activation is swapped for ReLU first ("relufication"), so that inactive neurons
give exact zeros; the model config then names ReLU, and d2d.json records the swap.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from d2d import arch
from d2d.configs import SparsifyConfig
from d2d.data import encode_docs, lm_windows, load_corpus
from d2d.dist import is_main_process
from d2d.errors import D2DError
from d2d.evaluate import forward
from d2d.models import task_of
from d2d.progress import Progress, null_progress

EPS = 1e-8
NEAR_ZERO = 0.01  # |a| below this fraction of the token's max |a| counts as near zero
ACT_CONFIG_FIELDS = ("hidden_act", "hidden_activation", "activation_function")


# --- penalties --------------------------------------------------------------------------


def hoyer(a: torch.Tensor) -> torch.Tensor:
    """Square Hoyer measure per token: ||a||_1^2 / ||a||_2^2 over the last dimension."""
    a = a.float()
    return a.abs().sum(-1).pow(2) / (a.pow(2).sum(-1) + EPS)


def l1(a: torch.Tensor) -> torch.Tensor:
    return a.float().abs().sum(-1)


PENALTIES = {"hoyer": hoyer, "l1": l1}


def penalty(acts: list[torch.Tensor], kind: str, mask: torch.Tensor | None = None):
    """Mean over layers of the mean over real tokens of the per-token penalty."""
    fn = PENALTIES[kind]
    per_layer = []
    for a in acts:
        v = fn(a)  # [B, T]
        if mask is not None:
            m = mask.to(v.dtype)
            per_layer.append((v * m).sum() / m.sum().clamp_min(1))
        else:
            per_layer.append(v.mean())
    return torch.stack(per_layer).mean()


def weight_at(step: int, steps: int, weight: float, schedule: str, warmup: float) -> float:
    """Penalty weight for optimizer step `step` (0-based): linear warm-up to `weight` by
    `warmup` x steps, or constant."""
    if schedule == "constant" or warmup <= 0:
        return weight
    ramp = max(1, math.ceil(warmup * steps))
    return weight * min(1.0, (step + 1) / ramp)


# --- reading and changing the FFN activations ---------------------------------------------


@contextmanager
def tapped(model: nn.Module):
    """Collect each block's FFN intermediate activations (graph kept) during forwards."""
    model = getattr(model, "module", model)  # under DDP, the wrapped model
    fam = arch.detect(model)
    acts: list[torch.Tensor] = []
    handles = []
    for block in arch.blocks(model, fam):
        down = arch.get_path(block, fam.w_out)

        def hook(mod, args):
            acts.append(args[0])

        handles.append(down.register_forward_pre_hook(hook))
    try:
        yield acts
    finally:
        for h in handles:
            h.remove()


@contextmanager
def neuron_oracle(model: nn.Module, keep: float):
    """Keep only each token's `keep` fraction of FFN neurons with the largest |a| (the rest
    become zero): the quality an ideal router could reach at that fraction of FFN FLOPs."""
    fam = arch.detect(model)
    handles = []

    def hook(mod, args):
        a = args[0]
        k = max(1, round(keep * a.shape[-1]))
        idx = a.abs().topk(k, dim=-1).indices
        return (torch.zeros_like(a).scatter(-1, idx, a.gather(-1, idx)),) + args[1:]

    for block in arch.blocks(model, fam):
        handles.append(arch.get_path(block, fam.w_out).register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def relufy(model: nn.Module) -> None:
    """Swap every FFN activation for ReLU (gated FFNs: the gate's activation)."""
    fam = arch.detect(model)
    for block in arch.blocks(model, fam):
        arch.set_path(block, fam.act, nn.ReLU())
    for name in ACT_CONFIG_FIELDS:
        if getattr(model.config, name, None) is not None:
            setattr(model.config, name, "relu")


def sparsity_stats(acts: list[torch.Tensor], mask: torch.Tensor | None) -> list[list[float]]:
    """Per layer [exact zeros, near zeros, tokens] over the real tokens."""
    out = []
    for a in acts:
        a = a.detach().float().abs()
        if mask is not None:
            a = a[mask.bool()]
        a = a.reshape(-1, a.shape[-1])
        zero = (a == 0).float().mean(-1).sum()
        near = (a < NEAR_ZERO * a.amax(-1, keepdim=True)).float().mean(-1).sum()
        out.append([float(zero), float(near), a.shape[0]])
    return out


@torch.no_grad()
def measure_sparsity(model: nn.Module, batches: list[dict], bf16: bool) -> dict:
    """{layer: {"zero": fraction of exact zeros, "near_zero": fraction < 1% of the token max}}."""
    totals = None
    for b in batches:
        with tapped(model) as acts:
            forward(model, b, bf16)
        mask = b.get("attention_mask")
        stats = sparsity_stats(acts, None if mask is None else mask.to(acts[0].device))
        if totals is None:
            totals = stats
        else:
            totals = [
                [x + y for x, y in zip(t, s, strict=True)]
                for t, s in zip(totals, stats, strict=True)
            ]
    return {
        str(i): {"zero": z / max(n, 1), "near_zero": nz / max(n, 1)}
        for i, (z, nz, n) in enumerate(totals or [])
    }


def mean_sparsity(per_layer: dict, key: str) -> float:
    vals = [v[key] for v in per_layer.values()]
    return sum(vals) / max(1, len(vals))


# --- tasks ----------------------------------------------------------------------------------


def resolve_task(model: nn.Module, cfg: SparsifyConfig, has_labels: bool) -> str:
    current = task_of(model)
    task = cfg.task
    if task == "auto":
        if current == "causal-lm":
            return "causal-lm"
        if current == "classification" or has_labels:
            return "classification"
        raise D2DError(
            f"{type(model).__name__} is a bare encoder and data {cfg.data} has no labels: "
            "give labelled data (class sub-folders or a 'label' column) for classification"
        )
    if task == "causal-lm" and current != "causal-lm":
        raise D2DError(
            f"--task causal-lm needs a causal language model, not {type(model).__name__}"
        )
    if task == "classification":
        if current == "causal-lm":
            raise D2DError("--task classification needs an encoder, not a causal language model")
        if not has_labels:
            raise D2DError(
                f"data {cfg.data} has no labels, which --task classification needs: use a "
                "folder of class sub-folders or a table with a 'label' column"
            )
    return task


def with_classification_head(model: nn.Module, label_names: list[str], seed: int) -> nn.Module:
    """The encoder under a new sequence-classification head (seeded init); an existing
    classifier is kept if its labels match."""
    from transformers import AutoModelForSequenceClassification

    n = len(label_names)
    if task_of(model) == "classification":
        if model.config.num_labels != n:
            raise D2DError(
                f"the model classifies {model.config.num_labels} labels but the data has {n}: "
                "use matching data or the bare encoder"
            )
        return model
    config = model.config
    config.num_labels = n
    config.id2label = dict(enumerate(label_names))
    config.label2id = {name: i for i, name in enumerate(label_names)}
    torch.manual_seed(seed)
    clf = AutoModelForSequenceClassification.from_config(config)
    body = getattr(clf, clf.base_model_prefix)
    missing, unexpected = body.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise D2DError(
            f"could not put a classification head on {type(model).__name__}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    clf.config.architectures = [type(clf).__name__]
    return clf.float()


@dataclass
class SparsifyTask:
    """Examples and loss for the loop: task loss + scheduled penalty."""

    kind: str  # causal-lm | classification
    inputs: dict  # name -> tensor [N, ...]
    cfg: SparsifyConfig
    evaluate_fn: object

    @property
    def n_examples(self) -> int:
        return int(self.inputs["input_ids"].shape[0])

    def batch(self, indices: torch.Tensor) -> dict:
        return {k: v[indices] for k, v in self.inputs.items()}

    def loss(self, model, batch, step):
        w = weight_at(
            step, self.cfg.steps, self.cfg.weight, self.cfg.schedule, self.cfg.weight_warmup
        )
        kw = dict(batch)
        if self.kind == "causal-lm":
            kw["labels"] = kw["input_ids"]
        with tapped(model) as acts:
            out = model(**kw)
        mask = batch.get("attention_mask")
        pen = penalty(acts, self.cfg.penalty, mask)
        task_loss = out.loss.float()
        loss = task_loss + w * pen if w > 0 else task_loss
        stats = sparsity_stats(acts, mask)
        zero = sum(z for z, _, _ in stats) / max(1, sum(n for _, _, n in stats))
        near = sum(nz for _, nz, _ in stats) / max(1, sum(n for _, _, n in stats))
        logs = {
            "loss": float(task_loss.detach()),
            "penalty": float(pen.detach()),
            "weight": w,
            "sparsity": near,
            "zeros": zero,
        }
        return loss, logs

    def evaluate(self, model) -> dict:
        return self.evaluate_fn(model)


def sparsify(art, cfg: SparsifyConfig, progress: Progress = null_progress, out=None):
    """Fine-tune art.model (replaced when a head is added). Returns (metrics, structure)."""
    from d2d.evaluate import Evaluator
    from d2d.moe.convert import moe_layers
    from d2d.train import train_stage

    if moe_layers(art.model):
        raise D2DError("sparsify runs on a dense model: sparsify first, then d2d convert")
    corpus = load_corpus(cfg.data)
    task = resolve_task(art.model, cfg, corpus.labels is not None)
    structure: dict = {"task": task, "relu": cfg.relu}
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
    ev = Evaluator(
        model, tok, cfg.data, "heldout", cfg.seq_len, cfg.eval_tokens, cfg.seed, cfg.bf16
    )

    def evaluate(m):
        q = ev.measure(m, {"rule": "all"}).quality
        with neuron_oracle(m, 0.5):
            q_half = ev.measure(m, {"rule": "all"}).quality
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
    st = SparsifyTask(task, inputs, cfg, evaluate)
    result = train_stage(model, st, cfg, art.meta["base"]["source"], out, progress, "sparsify")
    if not main:
        return {"task": task, "history": _thin(result.history, 200)}, structure
    after = result.evals[-1]
    per_seq = inputs["input_ids"].shape[1]
    metrics = {
        "task": task,
        "metric": ev.metric,
        "quality_before": before["quality"],
        "quality_after": after["quality"],
        "quality_top50_before": before["quality_top50"],
        "quality_top50_after": after["quality_top50"],
        "head": "new" if "num_labels" in structure else "kept",
        "tokens_seen": cfg.steps * cfg.batch_size * per_seq,
        "train_examples": st.n_examples,
        "heldout_tokens": ev.tokens,
        "sparsity_before": {k: before[k] for k in ("zero", "near_zero", "layers")},
        "sparsity_after": {k: after[k] for k in ("zero", "near_zero", "layers")},
        "evals": [{k: v for k, v in e.items() if k != "layers"} for e in result.evals],
        "history": _thin(result.history, 200),
        "resumed_from": result.resumed_from,
    }
    return metrics, structure


def _thin(rows: list[dict], n: int) -> list[dict]:
    if len(rows) <= n:
        return rows
    stride = math.ceil(len(rows) / n)
    return rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])
