"""Progress reporting without printing: the library calls a callback, the CLI draws bars."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, task: str, completed: int, total: int, **info: float) -> None: ...


def null_progress(task: str, completed: int, total: int, **info: float) -> None:
    return None
