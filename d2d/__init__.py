"""d2d: dense to dynamic-compute transformers (D2DMoE, Mixture-of-Depths)."""

__version__ = "0.1.0"


def load(path, trust_remote_code: bool = False):
    """Load a d2d artifact: structure replayed from d2d.json, weights loaded strictly."""
    from d2d.artifact import load as _load

    return _load(path, trust_remote_code)


def load_artifact(path, trust_remote_code: bool = False):
    """Load an artifact with its tokenizer and lineage (an `Artifact`)."""
    from d2d.artifact import load_artifact as _load_artifact

    return _load_artifact(path, trust_remote_code)
