"""`d2d mod`: insert Mixture-of-Depths routers into a dense decoder and fine-tune them in.

The model trains with its routers on the LM loss while the capacity of the routed blocks falls
from 1.0 (the dense model, exactly) to its target over the first `anneal` of the steps; an
auxiliary BCE loss trains the causal decision (the router's sign, or a small MLP predictor on
stop-gradient inputs) to agree with top-k membership, which generation needs. The training
loop is the one `sparsify` uses (d2d/train.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from d2d import arch
from d2d.configs import ModConfig
from d2d.data import lm_windows, load_corpus
from d2d.dist import is_main_process
from d2d.errors import D2DError
from d2d.mod import insert_mod, mod_blocks, routed_layers, set_mode
from d2d.models import task_of
from d2d.progress import Progress, null_progress


class ModTask:
    def __init__(self, model, ids: torch.Tensor, cfg: ModConfig, evaluate_fn):
        self.ids, self.cfg, self.evaluate_fn = ids, cfg, evaluate_fn
        self.blocks = mod_blocks(model)
        self.n_examples = len(ids)

    def new_parameters(self):
        """The routers and predictors: new, so they train at their own learning rate."""
        params = [
            p
            for b in self.blocks.values()
            for m in (b.router, b.predictor)
            if m is not None
            for p in m.parameters()
        ]
        return params, self.cfg.router_lr

    def batch(self, indices) -> dict:
        return {"input_ids": self.ids[indices]}

    def loss(self, model, batch: dict, step: int):
        cap = self.cfg.capacity_at(step)
        for b in self.blocks.values():
            b.mode, b.capacity = "topk", cap
        ids = batch["input_ids"]
        logits = model(input_ids=ids).logits[:, :-1]
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        aux = torch.stack(
            [
                F.binary_cross_entropy_with_logits(
                    b.last_causal[b.last_real].float(), b.last_choice[b.last_real].float()
                )
                for b in self.blocks.values()
            ]
        ).mean()
        logs = {"lm": float(lm.detach()), "aux": float(aux.detach()), "capacity": cap}
        return lm + self.cfg.aux_weight * aux, logs

    def evaluate(self, model) -> dict:
        return self.evaluate_fn(model)


def depth_row(m) -> dict:
    """A measurement's Mixture-of-Depths summary: perplexity, FLOPs, processed fractions."""
    return {
        "perplexity": m.quality,
        "model_fraction": m.model_fraction,
        "ffn_fraction": m.ffn_fraction,
        **m.depth,
    }


def evaluator_for(art, cfg: ModConfig):
    from d2d.evaluate import Evaluator

    ev = Evaluator(
        art.model, art.tokenizer, cfg.data, "heldout", cfg.seq_len, cfg.eval_tokens, cfg.seed,
        cfg.bf16,
    )  # fmt: skip

    def evaluate(model) -> dict:
        set_mode(model, "causal", cfg.capacity)
        return {mode: depth_row(ev.measure(model, {"depth": mode})) for mode in ("topk", "causal")}

    return ev, evaluate


def mod(art, cfg: ModConfig, progress: Progress = null_progress, out=None):
    """Insert routers into art.model and fine-tune. Returns (metrics, structure)."""
    from d2d.train import train_stage

    model = art.model
    if task_of(model) != "causal-lm":
        raise D2DError("Mixture-of-Depths is for decoder LMs: give a causal language model")
    if mod_blocks(model):
        raise D2DError("this model already has Mixture-of-Depths routers")
    n_layers = len(arch.blocks(model, arch.detect(model)))
    layers = routed_layers(n_layers, cfg.every, cfg.layers or None)
    if not layers:
        raise D2DError("no block to route: use --every or --layers to pick some")
    ev, evaluate = evaluator_for(art, cfg)
    dense = ev.measure(model, {"rule": "all"}).quality if is_main_process() else None
    torch.manual_seed(cfg.seed)
    insert_mod(model, layers, 1.0, cfg.sink)
    hidden = None
    if cfg.predictor == "mlp":
        hidden = max(16, model.config.hidden_size // 8)
        for b in mod_blocks(model).values():
            b.add_predictor(hidden)
    corpus = load_corpus(cfg.data)
    ids = lm_windows(art.tokenizer, corpus.split("train", cfg.seed), cfg.seq_len, None)
    task = ModTask(model, ids, cfg, evaluate)
    result = train_stage(model, task, cfg, art.meta["base"]["source"], out, progress, "mod")
    set_mode(model, "causal", cfg.capacity)
    structure = {
        "layers": layers,
        "capacity": cfg.capacity,
        "sink": cfg.sink,
        "predictor": cfg.predictor,
        "hidden": hidden,
    }
    if not is_main_process():
        return {"history": result.history[-1:]}, structure
    after = result.evals[-1]
    metrics = {
        "metric": "perplexity",
        "dense_perplexity": dense,
        "routed_layers": layers,
        "capacity": cfg.capacity,
        "topk": after["topk"],
        "causal": after["causal"],
        "evals": result.evals,
        "history": result.history[:: max(1, len(result.history) // 200)],
        "resumed_from": result.resumed_from,
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
    }
    return metrics, structure
