import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from d2d.models import resolve_path

    path, _ = resolve_path("minilm-l6")
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """Tiny random models of each family saved as HF folders with a real tokenizer."""
    from tiny import tiny

    root = tmp_path_factory.mktemp("models")
    out = {}
    for fam in ("gated", "gpt2", "bert", "bert-cls"):
        m = tiny(fam, vocab=tokenizer.vocab_size)
        m.save_pretrained(root / fam)
        tokenizer.save_pretrained(root / fam)
        out[fam] = str(root / fam)
    return out


@pytest.fixture
def text_dir(tmp_path):
    """A small labelled corpus: one .txt per document under <class>/."""
    import random

    rng = random.Random(0)
    words = {
        "sport": "match goal team player win league coach season score".split(),
        "money": "bank market shares profit price economy trade rate growth".split(),
    }
    for cls, vocab in words.items():
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(30):
            text = " ".join(rng.choice(vocab) for _ in range(60 + rng.randrange(40)))
            (tmp_path / "data" / cls / f"{i}.txt").write_text(text + ".\n")
    return str(tmp_path / "data")


@pytest.fixture(scope="session")
def calibrated(model_dirs, tmp_path_factory):
    """A tiny LLaMA through every stage (sparsify, convert, train-routers, calibrate) on the
    bundled BBC text: {stage: artifact path}."""
    from d2d.stages import (
        CalibrateConfig,
        ConvertConfig,
        SparsifyConfig,
        TrainRoutersConfig,
        run_stage,
    )

    root = tmp_path_factory.mktemp("calibrated")
    cfgs = [
        (
            "sparsify",
            SparsifyConfig(steps=2, batch_size=2, seq_len=32, eval_tokens=128, eval_every=0),
        ),
        ("convert", ConvertConfig(n_experts=8)),
        (
            "train-routers",
            TrainRoutersConfig(
                tokens=512, seq_len=64, steps=5, batch_size=64, heldout_tokens=128, hidden=8
            ),
        ),
        (
            "calibrate",
            CalibrateConfig(
                taus="0,0.2,0.5", tokens=256, seq_len=64, budgets="0.5", per_layer=False
            ),
        ),
    ]
    out, current = {}, model_dirs["gated"]
    for name, cfg in cfgs:
        out[name] = root / name
        run_stage(name, current, cfg, out[name])
        current = str(out[name])
    return out


@pytest.fixture(scope="session")
def mod_artifact(model_dirs, tmp_path_factory):
    """A tiny LLaMA with Mixture-of-Depths routers on block 1 (capacity 0.5, MLP predictor),
    briefly trained: the artifact's path."""
    from d2d.stages import ModConfig, run_stage

    out = tmp_path_factory.mktemp("mod") / "mod"
    cfg = ModConfig(
        capacity=0.5, layers="1", steps=4, batch_size=4, seq_len=32, eval_tokens=128, bf16=False
    )
    run_stage("mod", model_dirs["gated"], cfg, out)
    return out
