"""Tiny random models of each supported family, for fast tests."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 96


def tiny(family: str, seed: int = 0, vocab: int = VOCAB):
    torch.manual_seed(seed)
    if family == "gated":
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            pad_token_id=0,
        )
        return LlamaForCausalLM(cfg).eval()
    if family == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=0
        )
        return GPT2LMHeadModel(cfg).eval()
    if family in ("bert", "bert-cls"):
        cfg = BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            num_labels=3,
        )
        return (BertModel if family == "bert" else BertForSequenceClassification)(cfg).eval()
    if family == "opt":  # an architecture d2d does not support
        from transformers import OPTConfig, OPTForCausalLM

        cfg = OPTConfig(
            vocab_size=vocab,
            hidden_size=32,
            word_embed_proj_dim=32,
            ffn_dim=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=128,
        )
        return OPTForCausalLM(cfg).eval()
    raise ValueError(family)


def outputs(model, ids, **kw):
    with torch.no_grad():
        out = model(input_ids=ids, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def tree_bytes(path) -> dict:
    """Every file below `path` (or the file itself) by relative name: equal before and after
    means nothing was touched."""
    from pathlib import Path

    path = Path(path)
    if path.is_file():
        return {"": path.read_bytes()}
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def cache_of(out):
    """The KV cache a forward returned (`cache` in newer transformers, `past_key_values` before)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def decode_step(model, ids, out):
    """One forward of `ids` on the KV cache that the earlier output `out` returned."""
    from d2d.nn.structure import cache_name

    return model(input_ids=ids, use_cache=True, **{cache_name(model): cache_of(out)})
