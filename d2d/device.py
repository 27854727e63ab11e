"""What the machine computes fast: bf16 autocast only where the hardware has it.

On a CPU without native bf16 (AVX2 only, no AVX512-BF16 or AMX), PyTorch's bf16 matrix
products fall back to a path about 200x slower than fp32 (measured: three 2048^3 products took
214 s against 1.1 s), so "bf16 where supported" must mean where the hardware supports it.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def bf16_native(device_type: str = "cpu") -> bool:
    """Whether bf16 matrix products run natively (fast) on this device type."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # x86; others: fp32
    return any(getattr(torch.cpu, c, lambda: False)() for c in checks)


def device_type() -> str:
    """Where the stages compute: "cuda" when a GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def use_bf16(requested: bool, device_type: str = "cpu") -> bool:
    """bf16 autocast when it was asked for and the device runs it natively."""
    return bool(requested) and bf16_native(device_type)
