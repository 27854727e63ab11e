"""d2d: dense to dynamic-compute transformers (D2DMoE, Mixture-of-Depths)."""

__version__ = "0.1.0"


def load(path, trust_remote_code: bool = False):
    """Load a d2d artifact: structure replayed from d2d.json, weights loaded strictly."""
    return load_artifact(path, trust_remote_code).model


def load_artifact(path, trust_remote_code: bool = False):
    """Load an artifact with its tokenizer and lineage (an `Artifact`)."""
    from d2d.stages import load_artifact as _load_artifact  # the registry replays each stage

    return _load_artifact(path, trust_remote_code)
