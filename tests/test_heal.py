"""heal: fine-tune at the chosen routing against the model with every expert."""

import pytest
import torch

from d2d import load_artifact
from d2d.errors import D2DError
from d2d.nn.structure import moe_layers
from d2d.stages import HealConfig, run_stage

FAST = {"seq_len": 32, "eval_tokens": 256, "bf16": False, "batch_size": 4}
HALF = {"rule": "topk", "fraction": 0.5, "dense_positions": 1}


def _routed(calibrated):
    """The tiny calibrated model with sharper weights (a random tiny model's outputs are
    nearly uniform, so skipping experts would hardly move them), routed at half its experts."""
    art = load_artifact(calibrated["calibrate"])
    art.meta = {**art.meta, "routing": HALF}
    from d2d.nn.routing import apply_routing

    with torch.no_grad():
        for moe in moe_layers(art.model).values():
            moe.w_out.mul_(8.0)
        art.model.model.embed_tokens.weight.mul_(6.0)

    apply_routing(art.model, HALF)
    return art


def test_heal_brings_the_routed_model_towards_its_dense_self(calibrated, text_dir, tmp_path):
    art = _routed(calibrated)
    before = {k: v.clone() for k, v in art.model.state_dict().items()}
    cfg = HealConfig(data=text_dir, steps=25, lr=3e-3, **FAST)
    rec = run_stage("heal", art, cfg, tmp_path / "h")
    m = rec["metrics"]
    hist = m["history"]
    first, last = sum(h["kl"] for h in hist[:3]) / 3, sum(h["kl"] for h in hist[-3:]) / 3
    assert last < 0.7 * first
    gap = {k: abs(m[k]["routed"] - m[k]["dense"]) for k in ("before", "after")}
    assert gap["after"] < gap["before"]
    assert m["policy"] == HALF and 0 < m["after"]["ffn_fraction"] < 1
    after = art.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(".mlp." in k for k in changed) and any("self_attn" in k for k in changed)
    assert not any(".router." in k for k in changed)  # routers are not trained by the KL
    # the artifact keeps its routing and loads with the healed weights
    back = load_artifact(tmp_path / "h")
    assert back.meta["routing"] == HALF
    assert all(moe.policy.to_dict()["rule"] == "topk" for moe in moe_layers(back.model).values())
    for k, v in back.model.state_dict().items():
        torch.testing.assert_close(v, after[k])


def test_heal_ffn_only_leaves_everything_else_bitwise(calibrated, text_dir, tmp_path):
    art = _routed(calibrated)
    before = {k: v.clone() for k, v in art.model.state_dict().items()}
    cfg = HealConfig(data=text_dir, steps=3, lr=3e-3, trains="ffn", **FAST)
    run_stage("heal", art, cfg, tmp_path / "h")
    after = art.model.state_dict()
    for k in before:
        moved = not torch.equal(before[k], after[k])
        expert = ".mlp." in k and ".router." not in k and not k.endswith("perm")
        assert moved == expert or (not moved and expert), k
    assert any(not torch.equal(before[k], after[k]) for k in before if ".mlp.w_" in k)
    assert all(p.requires_grad for p in art.model.parameters() if p.dtype.is_floating_point)


def test_heal_needs_a_routing(calibrated, text_dir, tmp_path):
    cfg = HealConfig(data=text_dir, steps=1, **FAST)
    with pytest.raises(D2DError, match="calibrate"):
        run_stage("heal", str(calibrated["train-routers"]), cfg, tmp_path / "h")
    assert not (tmp_path / "h").exists()
    art = load_artifact(calibrated["calibrate"])
    art.meta = {**art.meta, "routing": {"rule": "all"}}
    with pytest.raises(D2DError, match="skips experts"):
        run_stage("heal", art, cfg, tmp_path / "h")
    with pytest.raises(D2DError, match="trains must be one of"):
        HealConfig(trains="attention")
