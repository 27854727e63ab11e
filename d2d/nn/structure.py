"""Structural changes d2d makes to a model: FFNs become MoE layers, routers are attached.

These functions build structure only (empty modules of the right shapes): `convert` fills the
weights from the dense FFN, `d2d.load` from the artifact's file.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from d2d import arch
from d2d.errors import D2DError
from d2d.nn.moe import MoEFFN, Router, RoutingContext
from d2d.nn.projection import ProjectionMLP, projection_slots


def moe_layers(model: nn.Module, kind: str = "all") -> dict[int | str, MoEFFN]:
    """Every MoE layer, in block order: a converted FFN under its block's index, a converted
    attention projection under "<block>_<name>" (e.g. "3_q"). kind: "all", "ffn" or
    "attention"."""
    fam = arch.detect(model)
    projections: dict[int, list] = {}  # block -> its converted projections, in table order
    if kind != "ffn":
        for i, name, _, _, mod in projection_slots(model):
            if isinstance(mod, MoEFFN):
                projections.setdefault(i, []).append((f"{i}_{name}", mod))
    out = {}
    for i, block in enumerate(arch.blocks(model, fam)):
        mod = arch.get_path(block, fam.slot)
        if isinstance(mod, MoEFFN) and kind in ("all", "ffn"):
            out[i] = mod
        out.update(projections.get(i, ()))
    return out


def cache_name(module: nn.Module) -> str:
    """The keyword under which `module.forward` takes the KV cache: `cache` in newer
    transformers, `past_key_values` before."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


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
        moe.context, moe.index = ctx, i
        arch.set_path(block, fam.slot, moe)
        if fam.passthrough:
            arch.set_path(block, fam.passthrough, nn.Identity())
        made[i] = (moe, w)
    if not made:
        raise D2DError("no FFN was converted: the layer list selected no layer")
    return made


def attach_routers(
    moes: dict[int | str, MoEFFN], hidden: int, attention_hidden: int | None = None
) -> None:
    """A router of `hidden` width on each MoE layer; converted attention projections (keys
    like "3_q") get `attention_hidden` where it is given."""
    for k, m in moes.items():
        width = attention_hidden if isinstance(k, str) and attention_hidden else hidden
        m.router = Router(m.d_model, m.n_experts, width).to(
            device=m.w_in.device, dtype=torch.float32
        )


def build_projection_structure(model: nn.Module, n_experts: dict[str, int]) -> dict:
    """Replace each projection MLP named in `n_experts` ("<block>_<name>" -> experts) by an
    empty MoEFFN of the right shape (a ReLU MLP d_in -> hidden -> d_out split into experts).
    Returns {key: (moe, mlp)}. Used by `convert` and by `d2d.load`."""
    fam = arch.detect(model)
    blist = arch.blocks(model, fam)
    paths = dict(fam.attention)
    ctx = install_context(model)
    made = {}
    for key, n in n_experts.items():
        block, _, name = key.partition("_")
        path = paths.get(name)
        mlp = None if path is None else arch.get_path(blist[int(block)], path)
        if not isinstance(mlp, ProjectionMLP):
            raise D2DError(
                f"layer {block}'s {name} projection is not an MLP: run d2d attention-mlp first"
            )
        hidden = mlp.fc1.out_features
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or hidden % n:
            raise D2DError(
                f"{n!r} experts do not divide the {hidden}-neuron MLP of projection {key}: "
                f"choose an expert size that divides {hidden}"
            )
        w = mlp.fc1.weight
        moe = MoEFFN(
            mlp.fc1.in_features,
            n,
            hidden // n,
            nn.ReLU(),
            gated=False,
            bias_in=True,
            bias_out=True,
            dtype=w.dtype,
            device=w.device,
            d_out=mlp.fc2.out_features,
        )
        moe.context, moe.index = ctx, key
        arch.set_path(blist[int(block)], path, moe)
        made[key] = (moe, mlp)
    return made
