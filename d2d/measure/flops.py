"""Analytic FLOPs per token (2 x multiply-accumulates), for the dense and the converted model.

Counted: attention projections, attention scores and weighted sum (average causal context for
decoders, full length for encoders), FFNs (executed experts only, plus router cost), and the LM
head. Embedding look-ups, norms and activations are ignored: they are small and the same for both.

Mixture-of-Depths: a routed block that processes a fraction f of the tokens costs f of its
projections and FFN, and about f^2 of its attention scores (chosen tokens attend to chosen tokens
only); its router (and causal predictor, when it decides) runs on every token. A block that
routes only its attention (skip "attention") counts f for the attention part and its whole FFN;
one that routes only its MLP (skip "mlp"), its whole attention and f of its FFN. With keep_kv
the k and v projections run for every token and the chosen queries attend to every key: f of
the q and o projections, all of k and v, and f of the scores.

Attention projections replaced by MLPs (d2d.nn.projection) cost their MLP's multiply-adds
instead of the projection's, every neuron counted; once split into experts (convert), the
experts they executed (router cost included), as FFN experts do. The dense model they are
compared with keeps its linear projections.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from d2d import arch
from d2d.nn.depth import mod_blocks, processed
from d2d.nn.moe import LayerStats, MoEFFN
from d2d.nn.policy import block_of
from d2d.nn.projection import extra_macs
from d2d.nn.structure import moe_layers


@dataclass
class FlopsBreakdown:
    attention: float
    ffn: float
    head: float
    routers: float = 0.0  # Mixture-of-Depths block routers (MoE routers count in ffn)

    @property
    def total(self) -> float:
        return self.attention + self.ffn + self.head + self.routers


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


def _attention_dims(model: nn.Module) -> tuple[int, int, int, int]:
    """(hidden size, query heads, key/value heads, head dimension) from the model's config."""
    d = _cfg(model, "hidden_size", "n_embd")
    heads = _cfg(model, "num_attention_heads", "n_head")
    kv = _cfg(model, "num_key_value_heads", default=heads)
    return d, heads, kv, _cfg(model, "head_dim", default=d // heads)


def _attention_macs(model: nn.Module, seq_len: int, causal: bool) -> tuple[float, float]:
    """One block's attention MACs per token: (projections, scores and weighted sum)."""
    d, heads, _, hd = _attention_dims(model)
    ctx = (seq_len + 1) / 2 if causal else seq_len
    return d * heads * hd * 2 + _kv_macs(model), 2 * heads * hd * ctx


def _kv_macs(model: nn.Module) -> int:
    """One block's k and v projection MACs per token."""
    d, _, kv, hd = _attention_dims(model)
    return 2 * d * kv * hd


def _head_macs(model: nn.Module, causal: bool) -> int:
    """The LM head's MACs per token (decoders only)."""
    return _cfg(model, "hidden_size", "n_embd") * _cfg(model, "vocab_size") if causal else 0


def dense_flops(model: nn.Module, seq_len: int, causal: bool) -> FlopsBreakdown:
    ffn = dense_ffn_macs(model)
    proj, scores = _attention_macs(model, seq_len, causal)
    return FlopsBreakdown(
        2.0 * len(ffn) * (proj + scores), 2.0 * sum(ffn), 2.0 * _head_macs(model, causal)
    )


def converted_flops(
    model: nn.Module,
    seq_len: int,
    causal: bool,
    stats: dict[int, LayerStats],
    processed: dict[int, float] | None = None,
) -> FlopsBreakdown:
    """FLOPs per token measured from execution statistics: MoE layers at the fraction of
    experts they ran (router cost included), routed blocks (Mixture-of-Depths) at the fraction
    of tokens `processed[i]` they took (their router cost included)."""
    moes, blocks = moe_layers(model), mod_blocks(model)
    processed = processed or {}
    proj, scores = _attention_macs(model, seq_len, causal)
    kv = _kv_macs(model)
    mlp_extra = extra_macs(model)  # attention projections replaced by MLPs (every neuron run)
    for k, m in moes.items():  # and those split into experts, at what they executed
        if isinstance(k, str):
            i = block_of(k)
            mlp_extra[i] = mlp_extra.get(i, 0) + m.token_macs(stats.get(k)) - m.d_model * m.d_out
    attn = ffn = routers = 0.0
    for i, macs in enumerate(dense_ffn_macs(model)):
        f_attn = f_ffn = 1.0  # the shares of tokens the sub-layers process
        f_keys = 1.0  # the share of tokens whose keys and values a query sees
        if i in blocks:
            f = processed.get(i, 1.0)
            skip = blocks[i].skip
            f_attn = f if skip in ("block", "attention") else 1.0
            f_ffn = f if skip in ("block", "mlp") else 1.0
            f_keys = 1.0 if blocks[i].keep_kv else f_attn
            routers += blocks[i].router_macs()
        always = (1.0 - f_attn) * kv if f_keys > f_attn else 0.0  # k, v of skipped tokens
        attn += f_attn * (proj + mlp_extra.get(i, 0)) + always + f_attn * f_keys * scores
        m = moes.get(i)
        if m is None:
            ffn += f_ffn * macs
            continue
        ffn += f_ffn * m.token_macs(stats.get(i))
    return FlopsBreakdown(2.0 * attn, 2.0 * ffn, 2.0 * _head_macs(model, causal), 2.0 * routers)


def converted_ffn_flops(model: nn.Module, stats: dict[int, LayerStats]) -> float:
    """FFN FLOPs per token measured from execution statistics (router cost included)."""
    return converted_flops(model, 1, True, stats).ffn


def fractions(
    model: nn.Module,
    seq_len: int,
    causal: bool,
    stats: dict[int, LayerStats],
    depth_stats: dict | None = None,
    head: bool = True,
) -> tuple[float, float]:
    """(FFN, whole-model) FLOPs per token as fractions of the dense model's, from execution
    statistics (`depth_stats`: Mixture-of-Depths counts from d2d.nn.depth.mod_stats). head=False:
    a prefill that computes the LM head for the last position only leaves the head out."""
    dense = dense_flops(model, seq_len, causal)
    conv = converted_flops(model, seq_len, causal, stats, processed(depth_stats or {}))
    cut = 0.0 if head else dense.head
    return conv.ffn / dense.ffn, (conv.total - cut) / (dense.total - cut)


def routed_fraction(model: nn.Module, stats: dict[int | str, LayerStats]) -> float:
    """The FLOPs of every MoE layer (converted FFNs and attention projections) as a fraction of
    the same layers with every expert run, from execution statistics (router cost included):
    the quantity calibrate's budgets allocate when attention projections are converted."""
    done = full = 0.0
    for k, m in moe_layers(model).items():
        done += m.token_macs(stats.get(k))
        full += m.expert_macs() * m.n_experts
    return done / full if full else 1.0
