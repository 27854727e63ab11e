"""Reading an artifact's lineage (the stage records of d2d.json), without loading anything."""

from __future__ import annotations


def last_stage(meta: dict, name: str) -> dict | None:
    """The latest record of stage `name` in a lineage, or None."""
    return next((s for s in reversed(meta.get("stages", [])) if s["stage"] == name), None)
