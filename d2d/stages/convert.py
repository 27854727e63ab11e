"""`convert`: split every FFN into equal-size experts (structure only, same function).

Neurons are grouped by balanced k-means, on their gate (or up) projection rows (`weights`) or
on their co-activation profiles over tokens of the training split (`coactivation`: neurons
that fire on the same tokens share an expert, so a token's contribution concentrates in fewer
experts). Each expert owns a contiguous block of the permuted FFN, so executing every expert
is the dense FFN exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from d2d.errors import D2DError
from d2d.options import parse_layers
from d2d.progress import Progress, null_progress
from d2d.stages.base import SampleFields, Stage, one_of

CLUSTERINGS = ("weights", "coactivation")


@dataclass
class ConvertConfig(SampleFields):
    n_experts: int | None = field(
        default=None, metadata={"help": "Experts per FFN (must divide the FFN width)."}
    )
    expert_size: int = field(
        default=16, metadata={"help": "Neurons per expert, used when n_experts is not given."}
    )
    layers: str = field(
        default="all", metadata={"help": "Layers to convert: 'all' or a list like '0-5,8'."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the clustering."})
    clustering: str = field(
        default="weights",
        metadata={
            "help": "What groups neurons: weights (k-means on gate or up rows) or "
            "coactivation (k-means on each neuron's activation profile over --tokens tokens "
            "of the training split of --data)."
        },
    )
    tokens: int = field(
        default=8192, metadata={"help": "Tokens whose activations group neurons (coactivation)."}
    )
    attention: bool = field(
        default=True,
        metadata={
            "help": "Also split the attention projections that attention-mlp made MLPs into "
            "experts (routed like the FFNs' in every later stage)."
        },
    )
    attention_expert_size: int | None = field(
        default=None,
        metadata={
            "help": "Neurons per expert in the attention projections' MLPs (default: "
            "--expert-size)."
        },
    )

    def __post_init__(self):
        one_of("clustering", self.clustering, CLUSTERINGS)
        super().__post_init__()
        if self.n_experts is not None and self.n_experts < 1:
            raise D2DError(f"n_experts must be >= 1, got {self.n_experts}")
        if self.expert_size < 1:
            raise D2DError(f"expert_size must be >= 1, got {self.expert_size}")
        if self.attention_expert_size is not None and self.attention_expert_size < 1:
            raise D2DError(f"attention_expert_size must be >= 1, got {self.attention_expert_size}")
        parse_layers(self.layers, 10**6)  # syntax check


def resolve_n_experts(ffn_width: int, cfg: ConvertConfig) -> int:
    f = ffn_width
    if cfg.n_experts is not None:
        n = cfg.n_experts
    else:
        if f % cfg.expert_size:
            raise D2DError(
                f"expert size {cfg.expert_size} does not divide the FFN width {f}: "
                f"choose a divisor of {f}"
            )
        n = f // cfg.expert_size
    if f % n:
        raise D2DError(f"{n} experts do not divide the FFN width {f}: choose a divisor of {f}")
    return n


def coactivation_features(
    model,
    tokenizer,
    cfg: ConvertConfig,
    layers: list[int],
    progress: Progress = null_progress,
    projections: dict | None = None,
) -> dict:
    """{layer: [f, dims] normalised co-activation profile sketches} from `cfg.tokens` tokens of
    the training split of `cfg.data` (padding left out), streamed batch by batch; also for
    each projection MLP in `projections` ({key: ProjectionMLP}), under its key."""
    import numpy as np
    import torch

    from d2d.cluster import SKETCH_DIMS, ProfileSketch, projection_rows
    from d2d.device import use_bf16
    from d2d.measure.evaluate import batches_for
    from d2d.nn.activations import tapped

    if tokenizer is None:
        raise D2DError("--clustering coactivation needs the model's tokenizer files")
    batches = batches_for(
        model, tokenizer, cfg.data, "train", cfg.seq_len, cfg.tokens, cfg.seed, cfg.doc_split
    )
    rng = np.random.default_rng(cfg.seed)
    sketches: dict[int | str, ProfileSketch] = {}
    taps: dict[str, torch.Tensor] = {}
    handles = [
        mlp.act.register_forward_hook(lambda mod, a, out, k=k: taps.__setitem__(k, out))
        for k, mlp in (projections or {}).items()
    ]
    with torch.no_grad(), tapped(model) as acts:
        for j, b in enumerate(batches):
            acts.clear()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16(cfg.bf16)):
                model(**b)
            real = b.get("attention_mask")
            real = None if real is None else real.reshape(-1).bool()
            proj = None
            found = {i: acts[i] for i in layers} | taps
            for i, t in found.items():
                a = t.reshape(-1, t.shape[-1]).float()
                a = (a if real is None else a[real]).numpy()
                if proj is None:  # one projection per batch, shared by every layer
                    proj = projection_rows(a.shape[0], SKETCH_DIMS, rng)
                sketches.setdefault(i, ProfileSketch(a.shape[1], SKETCH_DIMS)).add(a, proj)
            progress("measuring co-activation", j + 1, len(batches))
    for h in handles:
        h.remove()
    return {i: sk.features() for i, sk in sketches.items()}


def convert(model, cfg: ConvertConfig, progress: Progress = null_progress, tokenizer=None) -> dict:
    """Split the FFNs of `model` in place. Returns the structure to record in the lineage.
    `tokenizer`: needed by --clustering coactivation (it reads text)."""
    import torch

    from d2d import arch
    from d2d.nn.projection import projection_mlps
    from d2d.nn.structure import build_structure, moe_layers

    if moe_layers(model):
        raise D2DError("this model is already converted: convert the dense model instead")
    fam = arch.detect(model)
    blocks = arch.blocks(model, fam)
    layers = parse_layers(cfg.layers, len(blocks))
    width = arch.read_ffn(blocks[0], fam).w_in.shape[0]
    n_experts = resolve_n_experts(width, cfg)
    mlps = {}
    if cfg.attention:
        mlps = {f"{i}_{n}": m for (i, n), m in projection_mlps(model).items()}
    counts = _projection_experts(mlps, cfg.attention_expert_size or cfg.expert_size)
    profiles = None  # one expert, or one neuron per expert: nothing to group
    if cfg.clustering == "coactivation":  # one pass for the FFNs and the projections
        ffn = layers if n_experts not in (1, width) else []
        grouped = {k: m for k, m in mlps.items() if counts[k] not in (1, m.fc1.out_features)}
        if ffn or grouped:
            profiles = coactivation_features(model, tokenizer, cfg, ffn, progress, grouped)
    made = build_structure(model, layers, n_experts)
    with torch.no_grad():
        for j, (i, (moe, w)) in enumerate(made.items()):
            if profiles is not None and i in profiles:
                keys = profiles[i]
            else:
                keys = (w.w_gate if w.w_gate is not None else w.w_in).float().cpu().numpy()
            perm = _grouping(keys, n_experts, cfg.seed + i, w.w_in.device)
            moe.w_in.copy_(w.w_in[perm])
            moe.w_out.copy_(w.w_out[:, perm].t())
            if moe.w_gate is not None:
                moe.w_gate.copy_(w.w_gate[perm])
            if moe.b_in is not None:
                moe.b_in.copy_(w.b_in[perm])
            if moe.b_gate is not None:
                moe.b_gate.copy_(w.b_gate[perm])
            if moe.b_out is not None:
                moe.b_out.copy_(w.b_out)
            moe.perm.copy_(perm)
            progress("clustering FFN neurons", j + 1, len(made))
    structure = {"layers": layers, "n_experts": n_experts, "expert_size": moe.expert_size}
    if counts:
        convert_projections(model, counts, cfg.seed, profiles or {}, progress)
        structure["projections"] = counts
    return structure


def _grouping(keys, n_experts: int, seed: int, device):
    """The neuron permutation that makes each expert a contiguous block: balanced k-means of
    the rows of `keys` [f, dims] into `n_experts` groups."""
    import torch

    from d2d.cluster import balanced_kmeans, permutation_from_labels

    labels = balanced_kmeans(keys, n_experts, seed=seed)
    return torch.from_numpy(permutation_from_labels(labels)).to(device)


def _projection_experts(mlps: dict, size: int) -> dict[str, int]:
    """{key: experts} for projection MLPs split into experts of `size` neurons."""
    counts = {}
    for k, m in mlps.items():
        hidden = m.fc1.out_features
        if hidden % size:
            raise D2DError(
                f"expert size {size} does not divide the {hidden}-neuron MLP of projection "
                f"{k}: choose a divisor of {hidden} (--attention-expert-size)"
            )
        counts[k] = hidden // size
    return counts


def convert_projections(
    model, counts: dict[str, int], seed: int, profiles: dict, progress: Progress = null_progress
) -> None:
    """Split the attention projection MLPs (d2d attention-mlp) named in `counts` into that
    many experts each, neurons grouped by balanced k-means on their co-activation profiles
    where `profiles` has them, else on the MLP's first-layer rows."""
    import torch

    from d2d.nn.structure import build_projection_structure

    made = build_projection_structure(model, counts)
    with torch.no_grad():
        for j, (k, (moe, mlp)) in enumerate(made.items()):
            w1 = mlp.fc1.weight
            if counts[k] in (1, w1.shape[0]):  # one expert, or one neuron each
                perm = torch.arange(w1.shape[0], device=w1.device)
            else:
                keys = profiles[k] if k in profiles else w1.float().cpu().numpy()
                perm = _grouping(keys, counts[k], seed + j, w1.device)
            moe.w_in.copy_(w1[perm])
            moe.b_in.copy_(mlp.fc1.bias[perm])
            moe.w_out.copy_(mlp.fc2.weight[:, perm].t())
            moe.b_out.copy_(mlp.fc2.bias)
            moe.perm.copy_(perm)
            progress("clustering projection MLP neurons", j + 1, len(made))


def run(art, cfg: ConvertConfig, progress):
    structure = convert(art.model, cfg, progress, art.tokenizer)
    metrics = {
        "converted_layers": len(structure["layers"]),
        "n_experts": structure["n_experts"],
        "expert_size": structure["expert_size"],
        "clustering": cfg.clustering,
    }
    if structure.get("projections"):
        metrics["converted_projections"] = len(structure["projections"])
        metrics["attention_expert_size"] = cfg.attention_expert_size or cfg.expert_size
    return metrics, structure


def replay(model, structure: dict) -> None:
    from d2d.nn.structure import build_projection_structure, build_structure

    build_structure(model, structure["layers"], structure["n_experts"])
    if structure.get("projections"):
        build_projection_structure(model, structure["projections"])


def summary(record: dict) -> str:
    m = record["metrics"]
    return (
        f"{m['converted_layers']} layers x {m['n_experts']} experts of {m['expert_size']} neurons"
        + _projection_text(m)
    )


def _projection_text(m: dict) -> str:
    if not m.get("converted_projections"):
        return ""
    return (
        f"; {m['converted_projections']} attention projection MLPs in experts of "
        f"{m['attention_expert_size']} neurons"
    )


def view(record: dict) -> list:
    m = record["metrics"]
    return [
        f"convert: {m['converted_layers']} layers, {m['n_experts']} experts "
        f"of {m['expert_size']} neurons each, grouped by {m.get('clustering', 'weights')}"
        + _projection_text(m)
    ]


def about(meta: dict) -> dict | None:
    """inspect's "moe" facts: converted layers, experts, routers."""
    from d2d.lineage import last_stage

    convert = last_stage(meta, "convert")
    if convert is None:
        return None
    st = convert.get("structure") or {}
    routers = last_stage(meta, "train-routers")
    return {
        "moe": {
            "layers": st.get("layers"),
            "n_experts": st.get("n_experts"),
            "expert_size": (convert.get("metrics") or {}).get("expert_size"),
            "projections": st.get("projections") or {},
            "routers": None
            if routers is None
            else {
                "hidden": (routers.get("structure") or {}).get("hidden"),
                "mean_r2": (routers.get("metrics") or {}).get("mean_r2"),
            },
        }
    }


def about_lines(described: dict) -> list[str]:
    if not described.get("moe"):
        return []
    moe, w = described["moe"], described["weights"]
    r = moe["routers"]
    if r is None:
        routers = "none (run d2d train-routers)"
    elif isinstance(r.get("mean_r2"), (int, float)):
        routers = f"MLP hidden {r['hidden']}, mean held-out R^2 {r['mean_r2']:.3f}"
    else:
        routers = f"MLP hidden {r['hidden']}"
    proj = moe.get("projections") or {}
    lines = [
        f"  experts: {len(moe['layers'] or [])} layers x {moe['n_experts']} experts of "
        f"{moe['expert_size']} neurons ({w['experts_parameters'] / 1e6:.2f}M parameters"
        f"{', attention projections included' if proj else ''}); routers: {routers} "
        f"({w['routers_parameters'] / 1e6:.3f}M parameters)"
    ]
    if proj:
        names = sorted({k.partition("_")[2] for k in proj})
        blocks = sorted({int(k.partition("_")[0]) for k in proj})
        counts = sorted(set(proj.values()))
        lines.append(
            f"  attention projections as experts: {', '.join(names)} in {len(blocks)} blocks, "
            f"{'/'.join(map(str, counts))} experts each"
        )
    return lines


STAGE = Stage(
    "convert",
    ConvertConfig,
    run,
    help="Split every FFN into equal-size experts (same function, new structure).",
    replay=replay,
    summary=summary,
    view=view,
    about=about,
    about_lines=about_lines,
)
