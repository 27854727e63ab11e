import json

import pytest
import torch

from d2d import load, load_artifact
from d2d.artifact import FORMAT_VERSION, Artifact, new_meta, save
from d2d.errors import D2DError, StageOrderError
from d2d.stages import ConvertConfig, TrainRoutersConfig, run_stage


@pytest.fixture(scope="module")
def routed(model_dirs, tmp_path_factory):
    """A tiny LLaMA through convert and train-routers, on bundled BBC text."""
    root = tmp_path_factory.mktemp("art")
    run_stage("convert", model_dirs["gated"], ConvertConfig(n_experts=8), root / "c")
    cfg = TrainRoutersConfig(
        tokens=1024, seq_len=64, steps=20, batch_size=128, heldout_tokens=256, hidden=16
    )
    run_stage("train-routers", str(root / "c"), cfg, root / "r")
    return root


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_round_trip_gives_identical_outputs(routed, model_dirs):
    from d2d.nn.routing import routing
    from d2d.stages import open_input

    ids = torch.randint(1, 500, (2, 16))
    a = load(routed / "r")
    b = load(routed / "r")
    with routing(a, {"rule": "tau", "tau": 0.2}), routing(b, {"rule": "tau", "tau": 0.2}):
        torch.testing.assert_close(logits(a, ids), logits(b, ids), rtol=0, atol=0)
    # and the converted artifact equals the dense input model
    dense = open_input(model_dirs["gated"]).model
    torch.testing.assert_close(logits(load(routed / "c"), ids), logits(dense, ids))


def test_lineage_records_each_stage(routed):
    meta = json.loads((routed / "r" / "d2d.json").read_text())
    assert [s["stage"] for s in meta["stages"]] == ["convert", "train-routers"]
    assert meta["format_version"] == FORMAT_VERSION == 2 and meta["base"]["task"] == "causal-lm"
    tr = meta["stages"][1]
    assert tr["config"]["steps"] == 20 and tr["structure"] == {"hidden": 16}
    assert (
        tr["parent"].endswith("c")
        and tr["seconds"] >= 0
        and "r2" in tr["metrics"]["per_layer"]["0"]
    )


def test_no_pickle_files_written(routed):
    names = {p.name for p in (routed / "r").iterdir()}
    assert "model.safetensors" in names and not any(
        n.endswith((".bin", ".pt", ".pkl")) for n in names
    )


def test_stage_order_is_enforced(routed, model_dirs, tmp_path):
    from d2d.stages import CalibrateConfig

    with pytest.raises(StageOrderError, match="train-routers"):
        run_stage("calibrate", str(routed / "c"), CalibrateConfig(), tmp_path / "x")
    with pytest.raises(StageOrderError, match="'convert' first"):
        run_stage("train-routers", model_dirs["gated"], TrainRoutersConfig(), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_existing_output_is_refused_without_overwrite(routed):
    with pytest.raises(D2DError, match="already exists"):
        run_stage("convert", str(routed / "c"), ConvertConfig(), routed / "r")


def test_atomic_write_leaves_nothing_on_failure(tmp_path, model_dirs):
    from d2d.stages import open_input

    art = open_input(model_dirs["gated"])

    class Boom(Exception):
        pass

    def bad(*a, **k):
        raise Boom

    art.tokenizer.save_pretrained = bad
    with pytest.raises(Boom):
        save(art, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def copy_of(src, tmp_path):
    """A copy of an artifact to damage, with its parsed d2d.json."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    return bad, json.loads((bad / "d2d.json").read_text())


def test_corrupt_weights_are_a_clear_error(routed, tmp_path):
    bad, _ = copy_of(routed / "c", tmp_path)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(D2DError, match="corrupt"):
        load_artifact(bad)


def test_newer_format_and_malformed_meta_are_refused(routed, tmp_path):
    bad, meta = copy_of(routed / "c", tmp_path)
    (bad / "d2d.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(D2DError, match="newer d2d"):
        load_artifact(bad)
    (bad / "d2d.json").write_text("{not json")
    with pytest.raises(D2DError, match="not valid JSON"):
        load_artifact(bad)


def test_meta_that_disagrees_with_weights_is_refused(routed, tmp_path):
    bad, meta = copy_of(routed / "c", tmp_path)
    meta["stages"][0]["structure"]["layers"] = [0]
    (bad / "d2d.json").write_text(json.dumps(meta))
    with pytest.raises(D2DError, match="disagrees"):
        load_artifact(bad)


def test_saving_into_the_input_is_refused(routed):
    art = load_artifact(routed / "c")
    with pytest.raises(D2DError, match="is the input"):
        save(art, routed / "c", overwrite=True)


def test_new_meta_has_versions(model_dirs):
    from d2d.stages import open_input

    art = open_input(model_dirs["bert"])
    meta = new_meta("x", art.model)
    assert set(meta["versions"]) == {"torch", "transformers"}
    assert meta["base"]["task"] == "encoder"
    assert isinstance(Artifact(art.model, None, meta).stages, list)


@pytest.mark.parametrize("n_experts", [0, False, 2.5, "8"])
def test_a_bad_expert_count_in_the_lineage_is_refused(routed, tmp_path, n_experts):
    """Found by the property test: n_experts false/0 reached a modulo by zero."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(routed / "c", bad)
    meta = json.loads((bad / "d2d.json").read_text())
    meta["stages"][0]["structure"]["n_experts"] = n_experts
    (bad / "d2d.json").write_text(json.dumps(meta))
    with pytest.raises(D2DError):
        load_artifact(bad)
