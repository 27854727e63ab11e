"""Quality and FLOPs of a model under a routing policy, on one data split.

Quality: perplexity for a causal LM, accuracy for a classifier, and for a bare encoder the
cosine similarity of its mean-pooled output to the dense model's (1.0 = unchanged).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from d2d.data import encode_docs, lm_windows, load_corpus
from d2d.device import use_bf16
from d2d.errors import D2DError
from d2d.measure.flops import dense_ffn_macs, fractions, routed_fraction
from d2d.models import task_of
from d2d.nn.depth import mod_stats, summarise
from d2d.nn.policy import ALL, RoutingPolicy
from d2d.nn.routing import collecting, routing
from d2d.nn.structure import moe_layers
from d2d.progress import Progress, null_progress

METRIC = {"causal-lm": "perplexity", "classification": "accuracy", "encoder": "cosine"}
HIGHER_IS_BETTER = {"perplexity": False, "accuracy": True, "cosine": True}
TOKENS_PER_BATCH = 2048
# a causal LM's logits (and, in calibration, their softmax and gradient) grow with the
# vocabulary: batches hold at most this many logit entries (512 MB in fp32), so that a model
# with a 262k-token vocabulary evaluates and calibrates 512 tokens at a time, not 2,048
LOGIT_ENTRIES = 2**27


def tokens_per_batch(model) -> int:
    """Tokens per evaluation batch: TOKENS_PER_BATCH, fewer for a causal LM whose vocabulary
    would make the logits of that many tokens larger than LOGIT_ENTRIES."""
    if task_of(model) != "causal-lm":
        return TOKENS_PER_BATCH
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    return max(1, min(TOKENS_PER_BATCH, LOGIT_ENTRIES // max(1, vocab)))


def batches_for(
    model,
    tokenizer,
    data: str,
    split: str,
    seq_len: int,
    tokens: int,
    seed: int = 0,
    doc_split: str = "auto",
) -> list[dict]:
    """Token batches (model kwargs) of about `tokens` tokens from a split of `data`."""
    task = task_of(model)
    corpus = load_corpus(data, doc_split).split(split, seed)
    n_seq = max(1, math.ceil(tokens / seq_len))
    bs = max(1, tokens_per_batch(model) // seq_len)
    if task == "causal-lm":
        ids = lm_windows(tokenizer, corpus, seq_len, n_seq)
        return [{"input_ids": ids[i : i + bs]} for i in range(0, len(ids), bs)]
    if task == "classification" and corpus.labels is None:
        raise D2DError(
            f"data {data} has no labels, which a classification model needs: "
            "use a folder of class sub-folders or a table with a 'label' column"
        )
    ids, mask, labels = encode_docs(tokenizer, corpus, seq_len, n_seq)
    out = []
    for i in range(0, len(ids), bs):
        b = {"input_ids": ids[i : i + bs], "attention_mask": mask[i : i + bs]}
        if labels is not None:
            b["labels_"] = labels[i : i + bs]
        out.append(b)
    return out


def first_batches(batches: list[dict], tokens: int) -> list[dict]:
    """The leading batches that reach `tokens` tokens (at least one)."""
    out, used = [], 0
    for b in batches:
        if used >= tokens:
            break
        out.append(b)
        used += int(b["input_ids"].numel())
    return out


def forward(model, batch: dict, bf16: bool):
    """No-grad forward of a batch (keys ending in "_" are not model inputs) on the model's
    device, under bf16 autocast when asked and the device runs it natively."""
    device = next(model.parameters()).device
    kw = {k: v.to(device) for k, v in batch.items() if not k.endswith("_")}
    on = use_bf16(bf16, device.type)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=on):
        return model(**kw)


def quality_drop(metric: str, q: float, q_dense: float) -> float:
    """Relative loss of quality (0 = as dense, 0.05 = 5% worse)."""
    if HIGHER_IS_BETTER[metric]:
        return (q_dense - q) / max(abs(q_dense), 1e-12)
    return q / q_dense - 1.0


def paired_drop(pred: torch.Tensor, dense: torch.Tensor, label: torch.Tensor) -> tuple:
    """Predictions against the dense model's on the same examples: (the share that changed,
    the share of the dense model's right answers they break, the standard error of the
    relative accuracy drop). Per example the difference dense-correct minus correct is -1, 0 or
    1; the drop's noise is that of their mean (the examples being independent), relative to
    the dense accuracy as quality_drop is. A break is a loss no gain elsewhere offsets: gains
    happen only where the dense model is wrong, which is rarer on text it classifies better."""
    if not pred.numel():
        return 0.0, 0.0, 0.0
    right, now = (dense == label).double(), (pred == label).double()
    d = right - now
    acc = max(float(right.mean()), 1e-12)
    var = max(float((d * d).mean() - d.mean() ** 2), 0.0)
    broken = float((right * (1 - now)).mean()) / acc
    return float((pred != dense).double().mean()), broken, math.sqrt(var / d.numel()) / acc


@dataclass
class Measurement:
    quality: float
    ffn_fraction: float
    model_fraction: float
    layer_fractions: dict = field(default_factory=dict)
    usage: dict = field(default_factory=dict)
    k_hist: dict = field(default_factory=dict)
    depth: dict = field(default_factory=dict)  # Mixture-of-Depths: processed fractions, accuracy
    # with attention projections converted to experts: the FLOPs of every MoE layer (FFNs and
    # projections) as a fraction of the same layers with every expert run; else None
    routed_fraction: float | None = None
    # classifiers, paired per example with the dense model (None for other tasks;
    # paired_drop): the share of predictions that changed, the share of the dense model's right
    # answers lost, and the standard error of the accuracy drop
    changed: float | None = None
    broken: float | None = None
    drop_se: float | None = None

    def paired(self) -> dict:
        """The pairing with the dense model as a record's fields ({} where not measured)."""
        if self.broken is None:
            return {}
        return {"changed": self.changed, "broken": self.broken, "drop_se": self.drop_se}


class Evaluator:
    """Holds a split's batches; measures a model under any routing policy on them.

    `Evaluator.of(model, tokenizer, cfg, split)` takes data, seq_len, tokens, seed and bf16 from
    a stage config (d2d.stages.base.DataFields)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        data: str,
        split: str,
        seq_len: int,
        tokens: int,
        seed: int = 0,
        bf16: bool = True,
        doc_split: str = "auto",
    ):
        self.task = task_of(model)
        self.metric = METRIC[self.task]
        self.batches = batches_for(model, tokenizer, data, split, seq_len, tokens, seed, doc_split)
        self.seq_len = seq_len
        self.bf16 = bf16
        self.tokens = sum(int(b["input_ids"].numel()) for b in self.batches)
        self._reference: list[torch.Tensor] | None = None
        self._dense_pred: torch.Tensor | None = None  # classifiers: labels, every expert run
        self._dense_logp: list[torch.Tensor] | None = None  # log-probabilities, every expert

    @classmethod
    def of(cls, model, tokenizer, cfg, split: str, tokens: int | None = None) -> Evaluator:
        """An evaluator on `split` of a stage config's data (`tokens` overrides its count)."""
        return cls(
            model,
            tokenizer,
            data=cfg.data,
            split=split,
            seq_len=cfg.seq_len,
            tokens=cfg.tokens if tokens is None else tokens,
            seed=cfg.seed,
            bf16=getattr(cfg, "bf16", True),
            doc_split=getattr(cfg, "doc_split", "auto"),
        )

    def _forward(self, model, b):
        return forward(model, b, self.bf16)

    @staticmethod
    def pooled(out, mask):
        h = out.last_hidden_state.float().cpu()
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1)

    def reference(self, model) -> list[torch.Tensor]:
        if self._reference is None:
            with routing(model, ALL):
                self._reference = [
                    self.pooled(self._forward(model, b), b["attention_mask"]) for b in self.batches
                ]
        return self._reference

    def dense_predictions(self, model) -> torch.Tensor:
        """A classifier's predicted labels with every expert run, per example (cached)."""
        if self._dense_pred is None:
            with routing(model, ALL), torch.no_grad():
                self._dense_pred = torch.cat(
                    [self._forward(model, b).logits.argmax(-1).cpu() for b in self.batches]
                )
        return self._dense_pred

    def first(self, tokens: int) -> Evaluator:
        """The same split cut to its first batches, as many as reach `tokens` tokens (at least
        one batch): the sample the per-layer sensitivity passes read."""
        sub = copy.copy(self)
        sub.batches = first_batches(self.batches, tokens)
        sub.tokens = sum(int(b["input_ids"].numel()) for b in sub.batches)
        sub._reference = sub._dense_pred = sub._dense_logp = None
        return sub

    def _log_probs(self, model, b) -> torch.Tensor:
        """[rows, classes] log-probabilities of a batch's real positions (a causal LM: every
        position's next-token distribution; a classifier: each example's labels)."""
        logits = self._forward(model, b).logits.float().cpu()
        if logits.dim() == 3:  # per token
            keep = b.get("attention_mask")
            logits = logits.reshape(-1, logits.shape[-1])
            if keep is not None:
                logits = logits[keep.reshape(-1).bool()]
        return F.log_softmax(logits, -1)

    def divergence(self, model, policy: RoutingPolicy | dict) -> float:
        """The KL divergence of the model's output distribution under `policy` from its own
        with every expert run, summed over the split's real positions: a routing's measured
        cost, finer-grained than the difference of two qualities on a few tokens. The dense
        log-probabilities are computed once (they take tokens x vocabulary floats)."""
        if self.task == "encoder":
            raise D2DError(
                "a routing's divergence needs a model with output logits (a causal LM or a "
                "classifier), not a bare encoder"
            )
        if self._dense_logp is None:
            with routing(model, ALL):
                self._dense_logp = [self._log_probs(model, b) for b in self.batches]
        total = 0.0
        with routing(model, policy):
            for b, ref in zip(self.batches, self._dense_logp, strict=True):
                lp = self._log_probs(model, b)
                total += float((ref.exp() * (ref - lp)).sum())
        return total

    def measure(
        self,
        model,
        policy: RoutingPolicy | dict,
        progress: Progress = null_progress,
        label: str = "evaluating",
    ) -> Measurement:
        ref = self.reference(model) if self.task == "encoder" else None
        nll, count, correct, cos = 0.0, 0, 0, 0.0
        preds, labels = [], []
        with routing(model, policy), collecting(model) as stats, mod_stats(model) as dstats:
            for j, b in enumerate(self.batches):
                out = self._forward(model, b)
                if self.task == "causal-lm":
                    logits = out.logits[:, :-1].float().cpu()
                    tgt = b["input_ids"][:, 1:]
                    nll += float(
                        F.cross_entropy(
                            logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum"
                        )
                    )
                    count += tgt.numel()
                elif self.task == "classification":
                    preds.append(out.logits.argmax(-1).cpu())
                    labels.append(b["labels_"])
                    correct += int((preds[-1] == labels[-1]).sum())
                    count += len(b["labels_"])
                else:
                    p = self.pooled(out, b["attention_mask"])
                    cos += float(F.cosine_similarity(p, ref[j], dim=-1).sum())
                    count += p.shape[0]
                progress(label, j + 1, len(self.batches))
            flops = self._flops(model, stats, dstats)  # inside: router cost depends on the policy
        if self.task == "causal-lm":
            q = math.exp(nll / count)
        elif self.task == "classification":
            q = correct / count
            pred, label = torch.cat(preds), torch.cat(labels)
            if self._dense_pred is None and RoutingPolicy.of(policy).dense:
                self._dense_pred = pred  # this was the dense model: no second pass
            paired = paired_drop(pred, self.dense_predictions(model), label)
            flops.changed, flops.broken, flops.drop_se = paired
        else:
            q = cos / count
        flops.quality = q
        return flops

    def layer_errors(
        self, model, policy: RoutingPolicy | dict, progress: Progress = null_progress
    ) -> dict[str, float]:
        """Per converted layer (FFNs and attention projections): the relative squared error
        sum ||y - y_all||^2 / sum ||y_all||^2 of its output under `policy` against the same
        layer with every expert on the same input, over the real tokens, the model routed
        throughout (each layer's input carries the routing before it): where a routing's
        loss comes from."""
        moes = moe_layers(model)
        acc = {k: [0.0, 0.0] for k in moes}

        def make(k):
            def hook(mod, args, y):
                x = args[0].reshape(-1, mod.d_model)
                with torch.no_grad():
                    full = mod.down(mod.hidden(x)).float()
                    err = (y.reshape(full.shape).float() - full).pow(2).sum(-1)
                    ref = full.pow(2).sum(-1)
                    tm = mod.context.token_mask
                    if tm is not None and tm.numel() == err.numel():
                        real = tm.reshape(-1).bool()
                        err, ref = err[real], ref[real]
                acc[k][0] += float(err.sum())
                acc[k][1] += float(ref.sum())

            return hook

        handles = [m.register_forward_hook(make(k)) for k, m in moes.items()]
        try:
            with routing(model, policy):
                for j, b in enumerate(self.batches):
                    self._forward(model, b)
                    progress("layer errors", j + 1, len(self.batches))
        finally:
            for h in handles:
                h.remove()
        return {str(k): e / max(r, 1e-30) for k, (e, r) in acc.items()}

    def _flops(self, model, stats, dstats) -> Measurement:
        causal = self.task == "causal-lm"
        blocks = summarise(dstats, len(dense_ffn_macs(model))) if dstats else {}
        ffn_fraction, model_fraction = fractions(model, self.seq_len, causal, stats, dstats)
        moes = moe_layers(model)
        attention = any(isinstance(k, str) for k in moes)
        return Measurement(
            quality=float("nan"),
            ffn_fraction=ffn_fraction,
            model_fraction=model_fraction,
            layer_fractions={str(i): s.fraction(moes[i].n_experts) for i, s in stats.items()},
            usage={str(i): s.usage.tolist() for i, s in stats.items() if s.usage is not None},
            k_hist={str(i): s.k_hist.tolist() for i, s in stats.items() if s.k_hist is not None},
            depth=blocks,
            routed_fraction=routed_fraction(model, stats) if attention else None,
        )
