"""FFN activations: reading them (taps), changing them (ReLU swap, neuron oracle), and the
sparsity penalties computed on them.

The FFN's intermediate activations are the input of its down projection (act(gate) * up for
gated FFNs), read by a forward pre-hook.

- square Hoyer: ||a||_1^2 / ||a||_2^2 per token, between 1 (one active neuron) and the FFN
  width (all equal);
- L1: ||a||_1 per token.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from d2d import arch

EPS = 1e-8
NEAR_ZERO = 0.01  # |a| below this fraction of the token's max |a| counts as near zero
ACT_CONFIG_FIELDS = ("hidden_act", "hidden_activation", "activation_function")


# --- penalties --------------------------------------------------------------------------


def hoyer(a: torch.Tensor) -> torch.Tensor:
    """Square Hoyer measure per token: ||a||_1^2 / ||a||_2^2 over the last dimension."""
    a = a.float()
    return a.abs().sum(-1).pow(2) / (a.pow(2).sum(-1) + EPS)


def l1(a: torch.Tensor) -> torch.Tensor:
    return a.float().abs().sum(-1)


PENALTIES = {"hoyer": hoyer, "l1": l1}


def penalty(acts: list[torch.Tensor], kind: str, mask: torch.Tensor | None = None):
    """Mean over layers of the mean over real tokens of the per-token penalty."""
    fn = PENALTIES[kind]
    per_layer = []
    for a in acts:
        v = fn(a)  # [B, T]
        if mask is not None:
            m = mask.to(v.dtype)
            per_layer.append((v * m).sum() / m.sum().clamp_min(1))
        else:
            per_layer.append(v.mean())
    return torch.stack(per_layer).mean()


# --- reading and changing the FFN activations ---------------------------------------------


TAP_TARGETS = ("hidden", "gate")


@contextmanager
def tapped(model: nn.Module, target: str = "hidden"):
    """Collect each block's FFN activations (graph kept) during forwards. `target`: "hidden",
    the down projection's input (act(gate) * up where the FFN is gated), or "gate", the
    activation function's output (act(gate) alone; the same as "hidden" where not gated)."""
    model = getattr(model, "module", model)  # under DDP, the wrapped model
    fam = arch.detect(model)
    acts: list[torch.Tensor] = []
    handles = []
    seen: set[int] = set()  # an activation module shared by blocks is hooked once

    def pre_hook(mod, args):
        acts.append(args[0])

    def post_hook(mod, args, out):
        acts.append(out)

    for block in arch.blocks(model, fam):
        if target == "gate":
            act = arch.get_path(block, fam.act)
            if id(act) not in seen:
                seen.add(id(act))
                handles.append(act.register_forward_hook(post_hook))
        else:
            handles.append(arch.get_path(block, fam.w_out).register_forward_pre_hook(pre_hook))
    try:
        yield acts
    finally:
        for h in handles:
            h.remove()


@contextmanager
def neuron_oracle(model: nn.Module, keep: float):
    """Keep only each token's `keep` fraction of FFN neurons with the largest |a| (the rest
    become zero): the quality an ideal router could reach at that fraction of FFN FLOPs."""
    fam = arch.detect(model)
    handles = []

    def hook(mod, args):
        a = args[0]
        k = max(1, round(keep * a.shape[-1]))
        idx = a.abs().topk(k, dim=-1).indices
        return (torch.zeros_like(a).scatter(-1, idx, a.gather(-1, idx)),) + args[1:]

    for block in arch.blocks(model, fam):
        handles.append(arch.get_path(block, fam.w_out).register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def relufy(model: nn.Module) -> None:
    """Swap every FFN activation for ReLU (gated FFNs: the gate's activation)."""
    fam = arch.detect(model)
    for block in arch.blocks(model, fam):
        arch.set_path(block, fam.act, nn.ReLU())
    for name in ACT_CONFIG_FIELDS:
        if getattr(model.config, name, None) is not None:
            setattr(model.config, name, "relu")


def pooled_shares(stats: list[list[float]]) -> tuple[float, float]:
    """(exact zeros, near zeros) over every layer's tokens of sparsity_stats' counts."""
    n = max(1, sum(k for _, _, k in stats))
    return sum(z for z, _, _ in stats) / n, sum(nz for _, nz, _ in stats) / n


def sparsity_stats(acts: list[torch.Tensor], mask: torch.Tensor | None) -> list[list[float]]:
    """Per layer [exact zeros, near zeros, tokens] over the real tokens."""
    out = []
    for a in acts:
        a = a.detach().float().abs()
        if mask is not None:
            a = a[mask.bool()]
        a = a.reshape(-1, a.shape[-1])
        zero = (a == 0).float().mean(-1).sum()
        near = (a < NEAR_ZERO * a.amax(-1, keepdim=True)).float().mean(-1).sum()
        out.append([float(zero), float(near), a.shape[0]])
    return out
