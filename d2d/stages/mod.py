"""`d2d mod`: insert Mixture-of-Depths routers (d2d.nn.depth) into a dense decoder and fine-tune
them in.

The model trains with its routers on the LM loss while the capacity of the routed blocks falls
from 1.0 (the dense model, exactly) to its target over the first `anneal` of the steps; an
auxiliary BCE loss trains the causal decision (the router's sign, or a small MLP predictor on
stop-gradient inputs) to agree with top-k membership, which generation needs. The training
loop is the one `sparsify` uses (d2d.train).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from d2d.errors import D2DError
from d2d.stages.base import (
    DistillFields,
    Stage,
    Table,
    agreement_text,
    at_least,
    corpus_of,
    one_of,
    pct,
    thin,
)

PREDICTORS = ("aux-loss", "mlp")


@dataclass
class ModConfig(DistillFields):
    capacity: float = field(
        default=0.125, metadata={"help": "Fraction of a sequence's tokens a routed block takes."}
    )
    every: int = field(
        default=2, metadata={"help": "Route every N-th block (the 2nd, 4th, ... for 2)."}
    )
    layers: str = field(
        default="",
        metadata={
            "help": "Blocks to route instead, e.g. '1,3,5' (not block 0), or auto: as many as "
            "--every gives, the blocks whose skipping costs least on calibration text."
        },
    )
    sensitivity_tokens: int = field(
        default=4096,
        metadata={"help": "Calibration tokens for --layers auto (one forward per block)."},
    )
    allocate: bool = field(
        default=False,
        metadata={
            "help": "With --layers auto: choose the routed blocks and each one's capacity "
            "(1.0, 0.75, 0.5, 0.25, --capacity) from each block's measured cost of skipping at "
            "those capacities, so that as many (token, block) pairs skip as --every and "
            "--capacity would make skip (allocated as calibrate allocates FFN budgets)."
        },
    )
    skip: str = field(
        default="block",
        metadata={
            "help": "What a routed block skips for the tokens it does not take: block (all of "
            "it), attention (the attention sub-layer; the MLP runs) or mlp (the reverse)."
        },
    )
    keep_kv: bool = field(
        default=False,
        metadata={
            "help": "With --skip block or attention: a skipped token still writes its key and "
            "value in the block (k and v run for every token), so later tokens keep the whole "
            "context; it skips its query, scores, output projection (and MLP for block)."
        },
    )
    sink: int = field(
        default=1,
        metadata={"help": "Leading positions every routed block processes (attention sink)."},
    )
    anneal: float = field(
        default=0.3,
        metadata={"help": "Fraction of the steps over which capacity falls from 1.0 to its value."},
    )
    routing: str = field(
        default="topk",
        metadata={
            "help": "How training picks tokens: topk (per sequence; generation then needs a "
            "causal predictor) or threshold (the logit against a running quantile threshold, "
            "which generation uses as it is: causal by construction, no predictor)."
        },
    )
    predictor: str = field(
        default="mlp",
        metadata={
            "help": "Causal decision for generation: aux-loss (BCE on the router) or mlp (a "
            "small predictor on stop-gradient inputs)."
        },
    )
    aux_weight: float = field(
        default=0.1, metadata={"help": "Weight of the BCE loss that trains the causal decision."}
    )
    freeze_base: bool = field(
        default=False,
        metadata={
            "help": "Train only the routers and predictors; every weight of the model "
            "stays as it was, so it keeps its function wherever it does not skip."
        },
    )
    lora_rank: int = field(
        default=0,
        metadata={
            "help": "With --freeze-base: also train LoRA adapters of this rank (PEFT) on the "
            "routed blocks' attention and MLP projections, merged into the weights at the end "
            "(0: none)."
        },
    )
    router_lr: float = field(
        default=2e-3,
        metadata={
            "help": "Peak learning rate of the new routers and predictors (the model's own "
            "weights use --lr)."
        },
    )

    def __post_init__(self):
        if not 0.0 < self.capacity <= 1.0:
            raise D2DError(f"capacity must be in (0, 1], got {self.capacity}")
        at_least(self, 1, "every")
        at_least(self, 0, "sink", "aux_weight", "lora_rank")
        at_least(self, 1, "sensitivity_tokens")
        if self.allocate and self.layers.strip().lower() != "auto":
            raise D2DError("--allocate chooses blocks from measured costs: add --layers auto")
        if self.lora_rank and not self.freeze_base:
            raise D2DError("--lora-rank trains adapters on a frozen base: add --freeze-base")
        if not 0.0 <= self.anneal <= 1.0:
            raise D2DError(f"anneal must be in [0, 1], got {self.anneal}")
        one_of("predictor", self.predictor, PREDICTORS)
        one_of("routing", self.routing, ("topk", "threshold"))
        one_of("skip", self.skip, ("block", "attention", "mlp"))  # d2d.nn.depth.SKIPS
        if self.keep_kv and self.skip == "mlp":
            raise D2DError("--keep-kv is for --skip block or attention (mlp keeps every KV entry)")
        if not self.router_lr > 0:
            raise D2DError(f"router-lr must be > 0, got {self.router_lr}")
        super().__post_init__()

    def capacity_at(self, step: int, target: float | None = None) -> float:
        """Capacity for optimizer step `step`: linear from 1.0 to `target` (default
        `capacity`) over the first `anneal` of the steps, so that the dense model is not
        shocked."""
        target = self.capacity if target is None else target
        span = self.anneal * self.steps
        if span <= 0 or step >= span:
            return target
        return 1.0 - (1.0 - target) * step / span


class ModTask:
    """The training loop's task: LM loss at the annealed capacity, plus the decision's BCE."""

    def __init__(
        self, blocks: dict, ids, cfg: ModConfig, evaluate_fn, teacher=None, capacities=None
    ):
        self.ids, self.cfg, self.evaluate_fn = ids, cfg, evaluate_fn
        self.blocks, self.teacher = blocks, teacher
        # each block's target capacity (--allocate), else --capacity for all
        self.capacities = capacities or {i: cfg.capacity for i in blocks}
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
        import torch
        import torch.nn.functional as F

        cap = self.cfg.capacity_at(step)
        mode = "threshold" if self.cfg.routing == "threshold" else "topk"
        for i, b in self.blocks.items():
            b.mode, b.capacity = mode, self.cfg.capacity_at(step, self.capacities[i])
        from d2d.train import next_token_loss, teacher_kl

        logits = model(**batch).logits
        lm = next_token_loss(logits, batch["input_ids"])
        if mode == "threshold":  # the decision is the router itself: nothing to imitate
            aux = torch.zeros((), device=lm.device)
        else:
            aux = torch.stack(
                [
                    F.binary_cross_entropy_with_logits(
                        b.last_causal[b.last_real].float(), b.last_choice[b.last_real].float()
                    )
                    for b in self.blocks.values()
                ]
            ).mean()
        logs = {"lm": float(lm.detach()), "aux": float(aux.detach()), "capacity": cap}
        loss = lm + self.cfg.aux_weight * aux
        if self.teacher is not None:
            kl = teacher_kl(self.teacher, logits, batch)
            logs["kl"] = float(kl.detach())
            loss = loss + self.cfg.distill_weight * kl
        return loss, logs

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


def run(art, cfg: ModConfig, progress, out=None):
    """Insert routers into art.model and fine-tune. Returns (metrics, structure)."""
    import torch

    from d2d import arch
    from d2d.data import lm_windows
    from d2d.dist import is_main_process
    from d2d.measure.evaluate import Evaluator
    from d2d.models import task_of
    from d2d.nn.depth import insert_mod, mod_blocks, routed_layers, set_mode
    from d2d.train import frozen_copy, train_stage

    model = art.model
    if task_of(model) != "causal-lm":
        raise D2DError("Mixture-of-Depths is for decoder LMs: give a causal language model")
    if mod_blocks(model):
        raise D2DError("this model already has Mixture-of-Depths routers")
    n_layers = len(arch.blocks(model, arch.detect(model)))
    sensitivity = allocation = None
    if cfg.allocate:
        allocation = allocate_depth(art, cfg, n_layers, progress)
        layers = sorted(allocation["capacities"])
    elif cfg.layers.strip().lower() == "auto":
        sensitivity = block_sensitivity(art, cfg, n_layers, progress)
        k = len(routed_layers(n_layers, cfg.every, None))
        layers = sorted(sorted(sensitivity, key=sensitivity.get)[:k])
    else:
        layers = routed_layers(n_layers, cfg.every, cfg.layers or None)
    if not layers:
        raise D2DError("no block to route: use --every or --layers to pick some")
    # each routed block's capacity: allocated, else --capacity for all
    capacities = allocation["capacities"] if allocation else {i: cfg.capacity for i in layers}
    ev = Evaluator.of(model, art.tokenizer, cfg, "heldout", cfg.eval_tokens)

    def evaluate(m) -> dict:
        set_capacities(m, capacities)
        set_mode(m, "causal")
        return {mode: depth_row(ev.measure(m, {"depth": mode})) for mode in ("topk", "causal")}

    dense = ev.measure(model, {"rule": "all"}).quality if is_main_process() else None
    teacher = frozen_copy(model) if cfg.distill else None
    if cfg.freeze_base:  # the routers and predictors inserted below are new and train
        model.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    insert_mod(model, layers, 1.0, cfg.sink, cfg.skip, cfg.keep_kv)
    hidden = None
    predictor = "threshold" if cfg.routing == "threshold" else cfg.predictor
    for b in mod_blocks(model).values():
        if predictor == "threshold":
            b.add_threshold()
        elif predictor == "mlp":
            hidden = max(16, model.config.hidden_size // 8)
            b.add_predictor(hidden)
    adapters = add_lora(model, layers, cfg.lora_rank) if cfg.lora_rank else []
    ids = lm_windows(art.tokenizer, corpus_of(cfg).split("train", cfg.seed), cfg.seq_len, None)
    task = ModTask(mod_blocks(model), ids, cfg, evaluate, teacher, capacities)
    try:
        result = train_stage(model, task, cfg, art.meta["base"]["source"], out, progress, "mod")
    finally:
        merge_lora(model, adapters)
        model.requires_grad_(True)
    set_capacities(model, capacities)
    set_mode(model, "causal")
    thresholds = None
    if predictor == "threshold":  # the running quantiles lag a moving router: fit them anew
        from d2d.measure.evaluate import batches_for
        from d2d.nn.depth import fit_thresholds

        calib = batches_for(
            model,
            art.tokenizer,
            cfg.data,
            "calib",
            cfg.seq_len,
            cfg.eval_tokens,
            cfg.seed,
            cfg.doc_split,
        )
        thresholds = fit_thresholds(model, calib)  # each block at its own capacity
        if is_main_process():
            result.evals.append({"step": cfg.steps, **evaluate(model)})
    structure = {
        "layers": layers,
        "capacity": cfg.capacity,
        "sink": cfg.sink,
        "skip": cfg.skip,
        "keep_kv": cfg.keep_kv,
        "predictor": predictor,
        "hidden": hidden,
    }
    if allocation:
        structure["capacities"] = {str(i): c for i, c in capacities.items()}
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
        "lora": {"rank": cfg.lora_rank, "modules": len(adapters)} if adapters else None,
        "history": thin(result.history, 200),
        "resumed_from": result.resumed_from,
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "thresholds": thresholds,
        "block_sensitivity": sensitivity,
        "allocation": allocation and {**allocation, "capacities": structure["capacities"]},
    }
    return metrics, structure


def set_capacities(model, capacities: dict) -> None:
    """Each routed block at its own capacity."""
    from d2d.nn.depth import mod_blocks

    for i, b in mod_blocks(model).items():
        b.capacity = capacities[i]


ALLOCATION_GRID = (0.75, 0.5, 0.25)


def allocate_depth(art, cfg: ModConfig, n_layers: int, progress) -> dict:
    """--allocate: each candidate block's cost of skipping at capacities 0.75, 0.5, 0.25 and
    --capacity (calibration text, the largest updates kept); then the per-block capacities
    (1.0: not routed) of least summed cost that skip as many (token, block) pairs as --every
    blocks at --capacity would (d2d.measure.sensitivity.allocate, calibrate's allocation).
    Returns {"capacities": {block: capacity}, "costs": {capacity: {block: nats}}, ...}."""
    import numpy as np

    from d2d.measure.sensitivity import allocate
    from d2d.nn.depth import routed_layers

    grid = sorted({*ALLOCATION_GRID, cfg.capacity}, reverse=True)
    calib = calibration_batches(art, cfg)  # one tokenisation for every capacity
    costs = {c: block_sensitivity(art, cfg, n_layers, progress, c, calib) for c in grid}
    blocks = sorted(costs[grid[0]])
    skipped = len(routed_layers(n_layers, cfg.every, None)) * (1.0 - cfg.capacity)
    budget = 1.0 - skipped / len(blocks)  # the mean share processed over the candidates
    table = {
        b: (np.array([1.0, *grid]), np.array([0.0, *(costs[c][b] for c in grid)]), [1.0, *grid])
        for b in blocks
    }
    chosen = allocate(table, budget)
    caps = {b: c for b, c in chosen.items() if c < 1.0}
    if not caps:
        raise D2DError("--allocate routed no block: raise --capacity's skipped share")
    return {
        "capacities": caps,
        "costs": {str(c): {str(b): v for b, v in costs[c].items()} for c in grid},
        "processed_budget": budget,
        "estimated_cost": float(sum(costs[c][b] for b, c in caps.items())),
    }


def calibration_batches(art, cfg: ModConfig) -> list[dict]:
    """--sensitivity-tokens of the calibration split, in --seq-len windows."""
    from d2d.measure.evaluate import batches_for

    return batches_for(
        art.model,
        art.tokenizer,
        cfg.data,
        "calib",
        cfg.seq_len,
        cfg.sensitivity_tokens,
        cfg.seed,
        cfg.doc_split,
    )


def block_sensitivity(
    art,
    cfg: ModConfig,
    n_layers: int,
    progress,
    capacity: float | None = None,
    calib: list[dict] | None = None,
) -> dict[int, float]:
    """Each block's cost of skipping at `capacity` (default --capacity), measured on
    calibration text (`calib`, default calibration_batches; d2d.measure.sensitivity.
    depth_sensitivity): what `--layers auto` ranks blocks by."""
    from d2d.measure.sensitivity import depth_sensitivity

    if n_layers < 2:
        raise D2DError("--layers auto needs a model of at least two blocks (block 0 stays dense)")
    capacity = cfg.capacity if capacity is None else capacity
    calib = calibration_batches(art, cfg) if calib is None else calib
    blocks = list(range(1, n_layers))
    return depth_sensitivity(art.model, calib, blocks, capacity, cfg.skip, cfg.sink, progress)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model, layers: list[int], rank: int) -> list[str]:
    """LoRA adapters (PEFT) of `rank` on the routed blocks' projections; everything else keeps
    its trainability (PEFT marks only adapters trainable: the routers are re-enabled).
    Returns the adapted modules' names."""
    from peft import LoraConfig, inject_adapter_in_model

    from d2d.nn.depth import mod_blocks

    blocks = "|".join(str(i) for i in layers)
    pattern = rf".*\.({blocks})\.block\..*\.({'|'.join(LORA_TARGETS)})"
    trainable = [p for p in model.parameters() if p.requires_grad]
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=pattern)
    inject_adapter_in_model(cfg, model)
    for p in trainable:
        p.requires_grad_(True)
    for b in mod_blocks(model).values():
        for m in (b.router, b.predictor):
            if m is not None:
                m.requires_grad_(True)
    names = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    if not names:
        raise D2DError("no projection of the routed blocks took a LoRA adapter")
    return names


def merge_lora(model, names: list[str]) -> None:
    """Fold each adapter into its layer's weight and put the plain layer back, so that the
    artifact has the structure (and the weight names) of a model without adapters."""
    from d2d import arch

    for name in names:
        mod = model.get_submodule(name)
        mod.merge()
        arch.set_path(model, name, mod.get_base_layer())


def replay(model, structure: dict) -> None:
    from d2d.nn.depth import insert_mod, set_mode

    blocks = insert_mod(
        model,
        structure["layers"],
        structure["capacity"],
        structure.get("sink", 0),
        structure.get("skip", "block"),
        structure.get("keep_kv", False),
    )
    per_block = structure.get("capacities") or {}
    for i, b in blocks.items():
        if structure.get("predictor") == "mlp":
            b.add_predictor(structure["hidden"])
        elif structure.get("predictor") == "threshold":
            b.add_threshold()
        b.capacity = float(per_block.get(str(i), b.capacity))
    set_mode(model, "causal")  # generation needs the causal decision


def summary(record: dict) -> str:
    from d2d.nn.depth import skip_text

    m, st = record["metrics"], record.get("structure") or {}
    tk, ca = m["topk"], m["causal"]
    what = skip_text(st.get("skip", "block"), st.get("keep_kv", False))
    return (
        f"{capacity_text(st)} on {len(st['layers'])} blocks ({st['predictor']}, "
        f"skipping {what}); "
        f"perplexity {m['dense_perplexity']:.4g} dense, {tk['perplexity']:.4g} top-k, "
        f"{ca['perplexity']:.4g} causal; the causal decision agrees with "
        + "; with ".join(a for a in (agreement_text(tk), agreement_text(ca)) if a)
    )


def view(record: dict) -> list:
    from d2d.nn.depth import RUN_LABEL, skip_text

    m, st = record["metrics"], record.get("structure") or {}
    skip = st.get("skip", "block")
    run = RUN_LABEL[skip]
    t = Table(
        f"held-out perplexity, {capacity_text({**st, 'capacity': m['capacity']})} on blocks "
        f"{','.join(str(i) for i in m['routed_layers'])}, skipping "
        f"{skip_text(skip, st.get('keep_kv', False))}",
        ["routing", "perplexity", run, f"{run} in routed blocks", "model FLOPs"]
        + ["causal decision agrees with"],
    )
    t.add("dense", f"{m['dense_perplexity']:.4g}", "100.0%", "100.0%", "100.0%", "")
    for mode, name in (("topk", "top-k"), ("causal", "causal predictor")):
        r = m[mode]
        t.add(
            name,
            f"{r['perplexity']:.4g}",
            pct(r["block_fraction"]),
            pct(r["routed_block_fraction"]),
            pct(r["model_fraction"]) if "model_fraction" in r else "",
            agreement_text(r),
        )
    alloc = m.get("allocation")
    if alloc:
        grid = list(alloc["costs"])
        a = Table(
            "--allocate: each block's cost of skipping (nats; calibration text, the largest "
            f"updates kept) and the capacity chosen; mean processed share <= "
            f"{alloc['processed_budget']:.3f}",
            ["block", *(f"capacity {c}" for c in grid), "chosen"],
        )
        for b in sorted(alloc["costs"][grid[0]], key=int):
            chosen = alloc["capacities"].get(b)
            a.add(
                b,
                *(f"{alloc['costs'][c][b]:+.4f}" for c in grid),
                "" if chosen is None else f"{chosen:g}",
            )
        return [t, a]
    sens = m.get("block_sensitivity")
    if not sens:
        return [t]
    routed = set(m["routed_layers"])
    s = Table(
        f"--layers auto: each block's cost of skipping at capacity {m['capacity']:g} "
        "(calibration text, the largest updates kept)",
        ["block", "loss increase (nats)", "routed"],
    )
    for i, v in sorted(sens.items(), key=lambda kv: int(kv[0])):
        s.add(str(i), f"{v:+.4f}", "yes" if int(i) in routed else "")
    return [t, s]


def capacity_text(st: dict) -> str:
    """ "capacity 0.5", or each block's where --allocate chose them ("capacities 3:0.25, ...")."""
    per = st.get("capacities")
    if not per:
        return f"capacity {st['capacity']:g}"
    return "capacities " + ", ".join(f"{b}:{c:g}" for b, c in per.items()) + " (allocated)"


def about(meta: dict) -> dict | None:
    from d2d.lineage import last_stage

    mod = last_stage(meta, "mod")
    if mod is None:
        return None
    st = mod.get("structure") or {}
    keys = ("layers", "capacity", "capacities", "sink", "skip", "keep_kv", "predictor", "hidden")
    return {"mod": {k: st.get(k) for k in keys}}


def about_lines(described: dict) -> list[str]:
    from d2d.nn.depth import skip_text

    if not described.get("mod"):
        return []
    mod = described["mod"]
    pred = {"mlp": "MLP predictor", "threshold": "router logit against its threshold"}.get(
        mod["predictor"], "the router's sign"
    )
    what = skip_text(mod.get("skip") or "block", bool(mod.get("keep_kv")))
    return [
        f"  Mixture-of-Depths: blocks {','.join(str(i) for i in mod['layers'] or [])} routed "
        f"(skipping {what}) at {capacity_text(mod)} (top-k), "
        f"sink {mod.get('sink') or 0}; generation "
        f"decides causally ({pred})"
    ]


STAGE = Stage(
    "mod",
    ModConfig,
    run,
    help="Mixture-of-Depths: insert block routers into a decoder and fine-tune them in.",
    takes_out=True,
    replay=replay,
    summary=summary,
    view=view,
    about=about,
    about_lines=about_lines,
)
