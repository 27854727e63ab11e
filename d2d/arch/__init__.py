"""Where each architecture family keeps its FFN.

Adding a family is one entry in FAMILIES: the paths below are relative to one transformer block.
The MoE module replaces `slot`; BERT's intermediate projection lives in a separate module, which
`passthrough` names and which becomes an identity so that the MoE sees the block's hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from d2d.errors import D2DError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layer_lists: tuple[str, ...]  # candidate paths (from the model root) to the list of blocks
    slot: str  # module replaced by the MoE FFN
    w_in: str  # up projection (plain FFN: the only input projection)
    w_out: str  # down projection
    act: str  # activation module
    w_gate: str | None = None  # gated FFNs: act(gate(x)) * up(x)
    conv1d: bool = False  # GPT-2's Conv1D stores weights as [in, out]
    passthrough: str | None = None  # module turned into an identity (BERT's intermediate)
    # attention projections by name (GPT-2 fuses query, key and value into one)
    attention: tuple[tuple[str, str], ...] = ()


FAMILIES: dict[str, Family] = {
    "gated": Family(
        name="gated",
        model_types=(
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "granite",
            "smollm3",
        ),
        layer_lists=("model.layers", "layers", "model.language_model.layers"),
        slot="mlp",
        w_in="mlp.up_proj",
        w_gate="mlp.gate_proj",
        w_out="mlp.down_proj",
        act="mlp.act_fn",
        attention=(
            ("q", "self_attn.q_proj"),
            ("k", "self_attn.k_proj"),
            ("v", "self_attn.v_proj"),
            ("o", "self_attn.o_proj"),
        ),
    ),
    "bert": Family(
        name="bert",
        model_types=("bert", "roberta", "xlm-roberta", "camembert"),
        layer_lists=(
            "encoder.layer",
            "bert.encoder.layer",
            "roberta.encoder.layer",
            "model.encoder.layer",
        ),
        slot="output.dense",
        w_in="intermediate.dense",
        w_out="output.dense",
        act="intermediate.intermediate_act_fn",
        passthrough="intermediate",
        attention=(
            ("q", "attention.self.query"),
            ("k", "attention.self.key"),
            ("v", "attention.self.value"),
            ("o", "attention.output.dense"),
        ),
    ),
    "gpt2": Family(
        name="gpt2",
        model_types=("gpt2",),
        layer_lists=("transformer.h", "h"),
        slot="mlp",
        w_in="mlp.c_fc",
        w_out="mlp.c_proj",
        act="mlp.act",
        conv1d=True,
        attention=(("qkv", "attn.c_attn"), ("o", "attn.c_proj")),
    ),
}


def supported() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES.values())


def get_path(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def set_path(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_path(root, parent) if parent else root, name, new)


def _has(root: nn.Module, path: str) -> bool:
    try:
        get_path(root, path)
    except AttributeError:
        return False
    return True


def detect(model: nn.Module) -> Family:
    """The family of `model`, by model_type, else by the shape of its first block's FFN."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    for fam in FAMILIES.values():  # same FFN layout under another model_type name
        for lp in fam.layer_lists:
            if _has(model, lp) and len(get_path(model, lp)) > 0:
                block = get_path(model, lp)[0]
                names = [fam.w_in, fam.w_out, fam.act] + ([fam.w_gate] if fam.w_gate else [])
                if all(_has(block, n) for n in names):
                    return fam
    raise D2DError(
        f"unsupported architecture {model_type!r}: d2d supports {supported()}; "
        "add a family table in d2d/arch to support it"
    )


def block_list(model: nn.Module, fam: Family) -> nn.ModuleList:
    """The model's own list of blocks (entries may be wrappers such as Mixture-of-Depths)."""
    for lp in fam.layer_lists:
        if _has(model, lp):
            return get_path(model, lp)
    raise D2DError(f"could not find the transformer blocks of this {fam.name} model")


def blocks(model: nn.Module, fam: Family) -> list[nn.Module]:
    """The transformer blocks, seen through wrappers (a routed Mixture-of-Depths block is its
    inner block here), so that FFN stages find their FFNs inside routed blocks too."""
    return [getattr(b, "wrapped_block", b) for b in block_list(model, fam)]


@dataclass
class FFNWeights:
    """One FFN in [out, in] (nn.Linear) layout, whatever the storage of the family."""

    w_in: torch.Tensor  # [f, d]
    b_in: torch.Tensor | None
    w_out: torch.Tensor  # [d, f]
    b_out: torch.Tensor | None
    act: nn.Module
    w_gate: torch.Tensor | None = None  # [f, d]
    b_gate: torch.Tensor | None = None


def read_linear(mod: nn.Module, conv1d: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A projection's weight in [out, in] (nn.Linear) layout and its bias."""
    w = mod.weight.detach()
    if conv1d:
        w = w.t()
    b = mod.bias.detach() if getattr(mod, "bias", None) is not None else None
    return w.contiguous(), b


def read_ffn(block: nn.Module, fam: Family) -> FFNWeights:
    w_in, b_in = read_linear(get_path(block, fam.w_in), fam.conv1d)
    w_out, b_out = read_linear(get_path(block, fam.w_out), fam.conv1d)
    w_gate = b_gate = None
    if fam.w_gate:
        w_gate, b_gate = read_linear(get_path(block, fam.w_gate), fam.conv1d)
    return FFNWeights(w_in, b_in, w_out, b_out, get_path(block, fam.act), w_gate, b_gate)
