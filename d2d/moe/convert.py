"""`convert`: split every FFN into equal-size experts (structure only, same function)."""

from __future__ import annotations

import torch
from torch import nn

from d2d import arch
from d2d.configs import ConvertConfig, parse_layers
from d2d.errors import D2DError
from d2d.moe.cluster import balanced_kmeans, permutation_from_labels
from d2d.moe.layer import MoEFFN, RoutingContext
from d2d.progress import Progress, null_progress


def moe_layers(model: nn.Module) -> dict[int, MoEFFN]:
    """Index of the block -> its MoE FFN, for every converted block."""
    fam = arch.detect(model)
    out = {}
    for i, block in enumerate(arch.blocks(model, fam)):
        mod = arch.get_path(block, fam.slot)
        if isinstance(mod, MoEFFN):
            out[i] = mod
    return out


def install_context(model: nn.Module) -> RoutingContext:
    """One RoutingContext per model, filled before each forward with token positions."""
    ctx = getattr(model, "_d2d_context", None)
    if ctx is not None:
        return ctx
    ctx = RoutingContext()

    def pre_hook(mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            return
        b, t = ids.shape[0], ids.shape[1]
        # the KV cache: `cache` in newer transformers (generate passes it so), else the old name
        past = kwargs.get("cache")
        if past is None:
            past = kwargs.get("past_key_values")
        past_len = (
            int(past.get_seq_length())
            if past is not None and hasattr(past, "get_seq_length")
            else 0
        )
        am = kwargs.get("attention_mask")
        if am is not None and am.dim() == 2 and am.shape[1] == past_len + t:
            pos = (am.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
            ctx.token_mask = am[:, -t:]
        else:
            pid = kwargs.get("position_ids")
            if pid is not None and pid.dim() == 2 and pid.shape[-1] == t:
                pos = pid.expand(b, t)
            else:
                pos = torch.arange(past_len, past_len + t, device=ids.device).expand(b, t)
            ctx.token_mask = am if am is not None and am.shape == (b, t) else None
        ctx.positions = pos
        ctx.min_position = int(pos.min()) if pos.numel() else 0

    model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    model._d2d_context = ctx
    return ctx


def build_structure(model: nn.Module, layers: list[int], n_experts: int) -> dict[int, MoEFFN]:
    """Replace the FFN of each listed block by an empty MoEFFN of the right shape.

    Used both by `convert` (which then fills the weights) and by `d2d.load` (which loads them).
    """
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise D2DError(f"the number of experts must be an integer >= 1, got {n_experts!r}")
    fam = arch.detect(model)
    blist = arch.blocks(model, fam)
    ctx = install_context(model)
    made = {}
    for i in layers:
        block = blist[i]
        w = arch.read_ffn(block, fam)
        f, d = w.w_in.shape
        if f % n_experts:
            raise D2DError(
                f"{n_experts} experts do not divide the FFN width {f} of layer {i}: "
                f"choose a divisor of {f} (or --expert-size)"
            )
        moe = MoEFFN(
            d,
            n_experts,
            f // n_experts,
            w.act,
            gated=w.w_gate is not None,
            bias_in=w.b_in is not None,
            bias_out=w.b_out is not None,
            dtype=w.w_in.dtype,
            device=w.w_in.device,
        )
        moe.context = ctx
        arch.set_path(block, fam.slot, moe)
        if fam.passthrough:
            arch.set_path(block, fam.passthrough, nn.Identity())
        made[i] = (moe, w)
    if not made:
        raise D2DError("no FFN was converted: the layer list selected no layer")
    return made


def resolve_n_experts(model: nn.Module, cfg: ConvertConfig) -> int:
    fam = arch.detect(model)
    f = arch.read_ffn(arch.blocks(model, fam)[0], fam).w_in.shape[0]
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


@torch.no_grad()
def convert(model: nn.Module, cfg: ConvertConfig, progress: Progress = null_progress) -> dict:
    """Split the FFNs of `model` in place. Returns the structure to record in the lineage."""
    if moe_layers(model):
        raise D2DError("this model is already converted: convert the dense model instead")
    fam = arch.detect(model)
    n_layers = len(arch.blocks(model, fam))
    layers = parse_layers(cfg.layers, n_layers)
    n_experts = resolve_n_experts(model, cfg)
    made = build_structure(model, layers, n_experts)
    sizes = []
    for j, (i, (moe, w)) in enumerate(made.items()):
        keys = (w.w_gate if w.w_gate is not None else w.w_in).float().cpu().numpy()
        labels = balanced_kmeans(keys, n_experts, seed=cfg.seed + i)
        perm = torch.from_numpy(permutation_from_labels(labels)).to(w.w_in.device)
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
        sizes.append(int(labels.max()) + 1)
        progress("clustering FFN neurons", j + 1, len(made))
    return {"layers": layers, "n_experts": n_experts, "expert_size": moe.expert_size}
