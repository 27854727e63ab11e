"""FFN activation sparsity of a model on token batches (exact zeros and near zeros)."""

from __future__ import annotations

import torch
from torch import nn

from d2d.measure.evaluate import forward
from d2d.nn.activations import sparsity_stats, tapped


@torch.no_grad()
def measure_sparsity(model: nn.Module, batches: list[dict], bf16: bool) -> dict:
    """{layer: {"zero": fraction of exact zeros, "near_zero": fraction < 1% of the token max}}."""
    totals = None
    for b in batches:
        with tapped(model) as acts:
            forward(model, b, bf16)
        mask = b.get("attention_mask")
        stats = sparsity_stats(acts, None if mask is None else mask.to(acts[0].device))
        if totals is None:
            totals = stats
        else:
            totals = [
                [x + y for x, y in zip(t, s, strict=True)]
                for t, s in zip(totals, stats, strict=True)
            ]
    return {
        str(i): {"zero": z / max(n, 1), "near_zero": nz / max(n, 1)}
        for i, (z, nz, n) in enumerate(totals or [])
    }


def mean_sparsity(per_layer: dict, key: str) -> float:
    vals = [v[key] for v in per_layer.values()]
    return sum(vals) / max(1, len(vals))
