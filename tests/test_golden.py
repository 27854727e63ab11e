"""A small artifact saved by an earlier d2d: loading it must keep working (format breaks)."""

import json
from pathlib import Path

import torch

import d2d

GOLDEN = Path(__file__).parent / "golden"


def test_golden_artifact_loads_and_gives_the_recorded_logits():
    exp = json.loads((GOLDEN / "expected.json").read_text())
    model = d2d.load(GOLDEN / "tiny-llama")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(exp["input_ids"])).logits
    torch.testing.assert_close(logits[0, :, :4], torch.tensor(exp["logits_first"]))
    assert abs(float(logits.sum()) - exp["logits_sum"]) < 1e-3
