"""Regenerate the golden artifact (only when the format changes on purpose, with a new
format_version): python tests/golden/make_golden.py"""

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from tiny import tiny  # noqa: E402

from d2d.artifact import Artifact, new_meta, save  # noqa: E402
from d2d.nn.routing import apply_routing  # noqa: E402
from d2d.nn.structure import attach_routers, moe_layers  # noqa: E402
from d2d.stages import ConvertConfig, convert  # noqa: E402

IDS = [[5, 17, 3, 44, 9, 60, 2, 31]]
POLICY = {"rule": "tau", "tau": 0.3, "dense_positions": 1}


def main():
    model = tiny("gated", seed=1)
    meta = new_meta("tiny-llama", model)
    structure = convert(model, ConvertConfig(n_experts=4))
    attach_routers(moe_layers(model), 8)
    torch.manual_seed(2)
    for m in moe_layers(model).values():
        torch.nn.init.normal_(m.router.fc2.weight)
    meta["stages"] = [
        {"stage": "convert", "config": {"n_experts": 4}, "structure": structure, "metrics": {}},
        {"stage": "train-routers", "config": {}, "structure": {"hidden": 8}, "metrics": {}},
    ]
    meta["routing"] = POLICY
    apply_routing(model, POLICY)
    save(Artifact(model, None, meta), HERE / "tiny-llama", overwrite=True)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(IDS)).logits
    (HERE / "expected.json").write_text(
        json.dumps(
            {
                "input_ids": IDS,
                "logits_sum": float(logits.sum()),
                "logits_first": logits[0, :, :4].tolist(),
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
