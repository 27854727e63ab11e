"""The stages chain on every family and task: causal LM, classifier, bare encoder."""

import json

import pytest

from d2d import load_artifact
from d2d.stages import CalibrateConfig, ConvertConfig, EvalConfig, TrainRoutersConfig, run_stage

SMALL = {"seq_len": 64, "tokens": 512}


@pytest.mark.parametrize(
    "family,metric",
    [("gated", "perplexity"), ("gpt2", "perplexity"), ("bert-cls", "accuracy"), ("bert", "cosine")],
)
def test_stages_chain(family, metric, model_dirs, tmp_path):
    run_stage("convert", model_dirs[family], ConvertConfig(n_experts=8), tmp_path / "c")
    run_stage(
        "train-routers",
        str(tmp_path / "c"),
        TrainRoutersConfig(tokens=1024, seq_len=64, steps=30, heldout_tokens=256, hidden=16),
        tmp_path / "r",
    )
    cal = run_stage(
        "calibrate",
        str(tmp_path / "r"),
        CalibrateConfig(taus="0,0.1,0.5,1", sensitivity_tokens=256, **SMALL),
        tmp_path / "cal",
    )
    assert cal["metrics"]["metric"] == metric
    meta = json.loads((tmp_path / "cal" / "d2d.json").read_text())
    rows = meta["calibration"]["rows"]
    assert [r["rule"] for r in rows[:5]] == ["dense"] + ["global-tau"] * 4
    assert any(r["rule"] == "per-layer-tau" for r in rows)
    glob = [r["ffn_fraction"] for r in rows[1:5]]
    # tau 0 runs no router; above it the router's cost is counted, so only tau > 0 is monotone
    assert glob[0] == pytest.approx(1.0) and glob[1:] == sorted(glob[1:], reverse=True)
    assert rows[1]["drop"] == pytest.approx(0.0, abs=1e-6)  # tau 0 == dense
    assert 0 < rows[-1]["model_fraction"] <= 1
    assert meta["routing"] == rows[meta["calibration"]["choice"]]["policy"]
    ev = run_stage("eval", str(tmp_path / "cal"), EvalConfig(**SMALL))
    dense, conv = ev["metrics"]["rows"]
    assert dense["ffn_fraction"] == 1.0 and dense["drop"] == 0.0
    assert conv["metric"] == metric and conv["ffn_fraction"] <= 1.0 + 1e-9
    # --layer-errors: one figure per converted layer, rendered as a table
    from d2d.stages.evaluation import view

    rec = run_stage("eval", str(tmp_path / "cal"), EvalConfig(layer_errors=True, **SMALL))
    errs = rec["metrics"]["layer_errors"]
    assert set(errs) == set(conv["layer_fractions"]) and all(v >= 0 for v in errs.values())
    tables = [t for t in view(rec) if not isinstance(t, str)]
    assert any("each converted layer" in t.title for t in tables)
    # the chosen routing is replayed on load
    art = load_artifact(tmp_path / "cal")
    assert art.meta["routing"] == meta["routing"]


def test_eval_at_explicit_tau_and_refusals(model_dirs, tmp_path):
    from d2d.errors import D2DError

    run_stage("convert", model_dirs["gated"], ConvertConfig(n_experts=8), tmp_path / "c")
    with pytest.raises(D2DError, match="calibrate first"):
        run_stage("eval", str(tmp_path / "c"), EvalConfig(**SMALL))
    with pytest.raises(D2DError, match="train-routers"):
        run_stage("eval", str(tmp_path / "c"), EvalConfig(tau=0.2, **SMALL))
    ev = run_stage("eval", model_dirs["gated"], EvalConfig(**SMALL))
    assert len(ev["metrics"]["rows"]) == 2 and ev["metrics"]["rows"][1]["drop"] == 0.0
    with pytest.raises(D2DError, match="--layer-errors needs a converted model"):
        run_stage("eval", model_dirs["gated"], EvalConfig(layer_errors=True, **SMALL))


def test_classification_data_without_labels_is_refused(model_dirs, tmp_path):
    from d2d.errors import D2DError

    p = tmp_path / "t.txt"
    p.write_text("words " * 400)
    run_stage("convert", model_dirs["bert-cls"], ConvertConfig(n_experts=8), tmp_path / "c")
    with pytest.raises(D2DError, match="no labels"):
        run_stage(
            "train-routers", str(tmp_path / "c"), TrainRoutersConfig(data=str(p)), tmp_path / "r"
        )
    assert not (tmp_path / "r").exists()
