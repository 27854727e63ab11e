"""Attention projections replaced by two-layer ReLU MLPs (D2DMoE's second half, step 1).

Each chosen projection (query, key, value, output; GPT-2's fused query-key-value) becomes
fc2(relu(fc1(x))), an MLP whose hidden activations can be made sparse and later split into
experts like an FFN's. With a hidden width of at least twice the projection's output the MLP
starts as the projection exactly: relu(z) - relu(-z) = z, so fc1 = [W; -W] and fc2 = [I, -I]
reproduce W x (and for every input, one of each pair of neurons is zero). A narrower MLP of
2r neurons starts as the best rank-r approximation of W in the same way (W's singular
directions in pairs, exact where W's rank is at most r). Training then moves it from there
(d2d.stages.attention_mlp).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from d2d import arch
from d2d.errors import D2DError


class ProjectionMLP(nn.Module):
    """fc2(relu(fc1(x))) in place of a linear projection d_in -> d_out."""

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden(x))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc1(x))

    def macs(self) -> int:
        """Multiply-accumulates per token, every neuron computed."""
        return self.fc1.weight.numel() + self.fc2.weight.numel()

    @torch.no_grad()
    def start_from(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        """Equal to the projection y = W x + b where the width allows (hidden >= 2 d_out):
        neuron pairs (W_i x, -W_i x) through ReLU and back with (+1, -1). Extra neurons start
        at zero output weight. A narrower MLP of 2r neurons starts as the best rank-r
        approximation of W (low_rank_start)."""
        d_out = w.shape[0]
        if self.fc1.out_features < 2 * d_out:
            self.low_rank_start(w, b)
            return
        self.fc1.weight.zero_()
        self.fc1.bias.zero_()
        self.fc2.weight.zero_()
        self.fc1.weight[:d_out] = w
        self.fc1.weight[d_out : 2 * d_out] = -w
        eye = torch.eye(d_out, dtype=w.dtype, device=w.device)
        self.fc2.weight[:, :d_out] = eye
        self.fc2.weight[:, d_out : 2 * d_out] = -eye
        self.fc2.bias.copy_(b if b is not None else torch.zeros_like(self.fc2.bias))
        extra = self.fc1.out_features - 2 * d_out
        if extra:  # a little random input weight, so that training can use them
            nn.init.normal_(self.fc1.weight[2 * d_out :], std=w.std().item())

    @torch.no_grad()
    def low_rank_start(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        """The best rank-r approximation of y = W x + b with r = hidden // 2 (Eckart-Young):
        W = U S V^T, neuron pairs (a_i . x, -a_i . x) with a_i = sqrt(s_i) v_i through ReLU
        and back with (+c_i, -c_i), c_i = sqrt(s_i) u_i. An odd neuron out starts at zero
        output weight."""
        r = min(self.fc1.out_features // 2, *w.shape)
        u, sv, vh = torch.linalg.svd(w.float(), full_matrices=False)
        root = sv[:r].sqrt()
        a = (root[:, None] * vh[:r]).to(w.dtype)
        c = (u[:, :r] * root[None, :]).to(w.dtype)
        self.fc1.weight.zero_()
        self.fc1.bias.zero_()
        self.fc2.weight.zero_()
        self.fc1.weight[:r] = a
        self.fc1.weight[r : 2 * r] = -a
        self.fc2.weight[:, :r] = c
        self.fc2.weight[:, r : 2 * r] = -c
        self.fc2.bias.copy_(b if b is not None else torch.zeros_like(self.fc2.bias))
        if self.fc1.out_features > 2 * r:
            nn.init.normal_(self.fc1.weight[2 * r :], std=w.std().item())


def projection_paths(fam: arch.Family, names: list[str] | None) -> list[tuple[str, str]]:
    """(name, path) of the projections to replace; `names` None means all of them."""
    table = dict(fam.attention)
    if not table:
        raise D2DError(f"the {fam.name} family has no attention projection table in d2d/arch")
    if names is None:
        return list(fam.attention)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise D2DError(
            f"unknown projection {unknown[0]!r} for the {fam.name} family: choose from "
            f"{', '.join(table)}"
        )
    return [(n, table[n]) for n in names]


def attention_projection(fam: arch.Family, block: nn.Module, index: int, name: str, path: str):
    """The module of one projection the family's table names, checked: a linear layer (or
    GPT-2's Conv1D) at that path, else a one-line error naming what d2d replaces."""
    try:
        mod = arch.get_path(block, path)
    except AttributeError:
        mod = None
    w = getattr(mod, "weight", None)
    if isinstance(mod, ProjectionMLP):
        return mod
    if not (isinstance(w, torch.Tensor) and w.dim() == 2):
        names = ", ".join(n for n, _ in fam.attention)
        raise D2DError(
            f"unsupported attention layout: block {index} has no linear {name} projection at "
            f"{path!r} (d2d replaces the {fam.name} family's {names} projections as separate "
            "linear layers); choose others with --projections"
        )
    return mod


def replace_projections(
    model: nn.Module, layers: list[int], names: list[str] | None, hidden: dict[str, int]
) -> dict[tuple[int, str], tuple[ProjectionMLP, torch.Tensor, torch.Tensor | None]]:
    """Put a ProjectionMLP (hidden width per projection name) in place of each chosen
    projection of each layer. Returns {(layer, name): (mlp, original W [out, in], bias)}."""
    fam = arch.detect(model)
    blocks = arch.blocks(model, fam)
    out = {}
    for i in layers:
        for name, path in projection_paths(fam, names):
            mod = attention_projection(fam, blocks[i], i, name, path)
            if isinstance(mod, ProjectionMLP):
                raise D2DError(f"layer {i}'s {name} projection is already an MLP")
            w, b = arch.read_linear(mod, fam.conv1d)
            ref = next(mod.parameters())
            mlp = ProjectionMLP(w.shape[1], hidden[name], w.shape[0])
            mlp = mlp.to(device=ref.device, dtype=ref.dtype)
            arch.set_path(blocks[i], path, mlp)
            out[(i, name)] = (mlp, w, b)
    return out


def projection_slots(model: nn.Module):
    """(block index, name, block, path, module) of every attention projection the family's
    table names and this model has, in block order."""
    fam = arch.detect(model)
    for i, block in enumerate(arch.blocks(model, fam)):
        for name, path in fam.attention:
            try:
                mod = arch.get_path(block, path)
            except AttributeError:
                continue
            yield i, name, block, path, mod


def projection_mlps(model: nn.Module) -> dict[tuple[int, str], ProjectionMLP]:
    """Every replaced projection: {(layer, name): mlp}."""
    return {
        (i, name): mod
        for i, name, _, _, mod in projection_slots(model)
        if isinstance(mod, ProjectionMLP)
    }


@contextmanager
def tapped_projections(model: nn.Module):
    """Collect the hidden activations (graph kept) of every projection MLP during forwards:
    what a sparsity penalty on them reads."""
    acts: list[torch.Tensor] = []
    handles = [
        m.act.register_forward_hook(lambda mod, args, out: acts.append(out))
        for m in projection_mlps(getattr(model, "module", model)).values()
    ]
    try:
        yield acts
    finally:
        for h in handles:
            h.remove()


def extra_macs(model: nn.Module) -> dict[int, int]:
    """Per layer: multiply-accumulates per token the replacement MLPs add over the projections
    they replaced (negative where an MLP is cheaper)."""
    out: dict[int, int] = {}
    for (i, _), m in projection_mlps(model).items():
        linear = m.fc1.in_features * m.fc2.out_features
        out[i] = out.get(i, 0) + m.macs() - linear
    return out


def replaced_projections(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(block, path, module) of every projection d2d replaced: by an MLP, or by experts."""
    from d2d.nn.moe import MoEFFN

    return [
        (block, path, mod)
        for _, _, block, path, mod in projection_slots(model)
        if isinstance(mod, (ProjectionMLP, MoEFFN))
    ]


def _shape(mod: nn.Module) -> tuple[int, int]:
    if isinstance(mod, ProjectionMLP):
        return mod.fc1.in_features, mod.fc2.out_features
    return mod.d_model, mod.d_out


def replacement_bytes(model: nn.Module) -> int:
    """Bytes the replaced projections hold beyond the linear projections they replaced."""
    extra = 0
    for _, _, mod in replaced_projections(model):
        d_in, d_out = _shape(mod)
        size = next(mod.parameters()).element_size()
        held = sum(  # routers are counted apart (bench's memory line)
            t.numel() * t.element_size()
            for n, t in mod.named_parameters()
            if not n.startswith("router.")
        )
        extra += held - (d_in * d_out + d_out) * size
    return extra


@contextmanager
def linear_projections(model: nn.Module):
    """Inside, every replaced projection is a linear layer of its original shape again, so
    that the model costs what the dense model did (bench times its dense reference so). The
    weights are random: the artifact no longer holds the originals; for timing only."""
    found = replaced_projections(model)
    cache = model.__dict__.setdefault("_d2d_linear_projections", {})
    for block, path, mod in found:
        key = (id(block), path)
        if key not in cache:
            ref = next(mod.parameters())
            d_in, d_out = _shape(mod)
            cache[key] = nn.Linear(d_in, d_out).to(device=ref.device, dtype=ref.dtype)
        arch.set_path(block, path, cache[key])
    try:
        yield
    finally:
        for block, path, mod in found:
            arch.set_path(block, path, mod)
