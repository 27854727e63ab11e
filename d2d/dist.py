"""Which process this is, under a multi-process launcher (accelerate launch, torchrun)."""

from __future__ import annotations

import os


def world() -> tuple[int, int]:
    """(rank, number of processes), from the launcher's environment; (0, 1) when alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    return world()[0] == 0
