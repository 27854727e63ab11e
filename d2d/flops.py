"""Analytic FLOPs per token (2 x multiply-accumulates), for the dense and the converted model.

Counted: attention projections, attention scores and weighted sum (average causal context for
decoders, full length for encoders), FFNs (executed experts only, plus router cost), and the LM
head. Embedding look-ups, norms and activations are ignored: they are small and the same for both.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from d2d import arch
from d2d.moe.layer import LayerStats, MoEFFN


@dataclass
class FlopsBreakdown:
    attention: float
    ffn: float
    head: float

    @property
    def total(self) -> float:
        return self.attention + self.ffn + self.head


def _cfg(model: nn.Module, *names, default=None):
    for n in names:
        v = getattr(model.config, n, None)
        if v is not None:
            return v
    return default


def dense_ffn_macs(model: nn.Module) -> list[int]:
    """Per block: MACs of its FFN when dense (converted blocks count every expert)."""
    fam = arch.detect(model)
    out = []
    for block in arch.blocks(model, fam):
        mod = arch.get_path(block, fam.slot)
        if isinstance(mod, MoEFFN):
            out.append(mod.expert_macs() * mod.n_experts)
        else:
            w = arch.read_ffn(block, fam)
            out.append((3 if w.w_gate is not None else 2) * w.w_in.numel())
    return out


def dense_flops(model: nn.Module, seq_len: int, causal: bool) -> FlopsBreakdown:
    d = _cfg(model, "hidden_size", "n_embd")
    heads = _cfg(model, "num_attention_heads", "n_head")
    kv = _cfg(model, "num_key_value_heads", default=heads)
    hd = _cfg(model, "head_dim", default=d // heads)
    n_layers = len(dense_ffn_macs(model))
    ctx = (seq_len + 1) / 2 if causal else seq_len
    attn = n_layers * (d * heads * hd * 2 + 2 * d * kv * hd + 2 * heads * hd * ctx)
    head = d * _cfg(model, "vocab_size") if causal else 0
    return FlopsBreakdown(2.0 * attn, 2.0 * sum(dense_ffn_macs(model)), 2.0 * head)


def converted_ffn_flops(model: nn.Module, stats: dict[int, LayerStats]) -> float:
    """FFN FLOPs per token measured from execution statistics (router cost included)."""
    from d2d.moe.convert import moe_layers

    moes = moe_layers(model)
    total = 0.0
    for i, macs in enumerate(dense_ffn_macs(model)):
        m = moes.get(i)
        if m is None:
            total += macs
            continue
        frac = stats[i].fraction(m.n_experts) if i in stats and stats[i].tokens else 1.0
        total += frac * macs + m.router_macs()
    return 2.0 * total
