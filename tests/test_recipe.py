from pathlib import Path

import pytest
import yaml

from d2d.errors import D2DError
from d2d.recipe import parse_recipe, run_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    r = parse_recipe(path.read_text())
    names = [n for n, _ in r["stages"]]
    # a D2DMoE recipe converts (after an optional sparsify); a MoD recipe starts with mod
    assert (names[0] in ("sparsify", "convert") and "convert" in names) or names[0] == "mod"
    assert names[-1] == "eval"  # every shipped recipe ends by measuring what it built


def test_overrides_and_data_default():
    text = "model: m\nout: o\ndata: d\nstages:\n  - convert: {}\n  - train-routers: {steps: 5}\n"
    r = parse_recipe(text, ["train-routers.steps=7", "out=elsewhere"])
    assert r["stages"][1][1] == {"steps": 7, "data": "d"} and r["out"] == "elsewhere"


@pytest.mark.parametrize(
    "text,match",
    [
        ("model: m\nout: o\n", "stages"),
        ("model: m\nout: o\nstages: [bogus]\n", "unknown stage 'bogus'"),
        ("model: m\nout: o\nstages: [{convert: {wrong: 1}}]\n", "no option 'wrong'"),
        ("model: m\nout: o\nstages: [{eval: {tau: 3}}]\n", "tau must be"),
        ("model: [m\n", "not valid YAML"),
        ("stages: [convert]\n", "'model'"),
    ],
)
def test_bad_recipes(text, match):
    with pytest.raises(D2DError, match=match):
        parse_recipe(text)


def test_recipe_runs_resumes_and_records(model_dirs, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": model_dirs["gated"],
                "data": "bbc-news",
                "out": str(tmp_path / "run"),
                "report": True,
                "stages": [
                    {"convert": {"n_experts": 8}},
                    {
                        "train-routers": {
                            "tokens": 512,
                            "seq_len": 64,
                            "steps": 10,
                            "heldout_tokens": 128,
                            "hidden": 8,
                        }
                    },
                    {
                        "calibrate": {
                            "taus": "0,0.5",
                            "tokens": 256,
                            "seq_len": 64,
                            "per_layer": False,
                        }
                    },
                    {"eval": {"tokens": 256, "seq_len": 64}},
                ],
            }
        )
    )
    recs = run_recipe(recipe, ["eval.tokens=320"])
    names = ["convert", "train-routers", "calibrate", "eval", "report"]
    assert [r["stage"] for r in recs] == names
    assert (tmp_path / "run" / "3-eval.json").exists()
    assert (tmp_path / "run" / "report" / "index.html").exists()
    assert recs[-1]["figures"] == ["curve", "usage", "k_hist"]
    resolved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert resolved["stages"][3]["eval"] == {"tokens": 320, "seq_len": 64, "data": "bbc-news"}
    again = run_recipe(recipe)
    assert [r.get("skipped", False) for r in again[:3]] == [True, True, True]
    with pytest.raises(D2DError, match="--force"):
        run_recipe(recipe, ["train-routers.steps=11"])


def test_interrupted_sparsify_resumes_from_its_checkpoint(model_dirs, text_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    sparsify = {"steps": 4, "batch_size": 4, "seq_len": 32, "eval_tokens": 128, "bf16": False}
    sparsify["checkpoint_every"] = 2
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": model_dirs["gated"],
                "data": text_dir,
                "out": str(tmp_path / "run"),
                "stages": [{"sparsify": sparsify}, {"convert": {"n_experts": 8}}],
            }
        )
    )

    def interrupt(task, done, total, **info):
        if task == "sparsify" and done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, progress=interrupt)
    assert not (tmp_path / "run" / "0-sparsify").exists()
    recs = run_recipe(recipe)
    assert recs[0]["metrics"]["resumed_from"] == 2
    assert not (tmp_path / "run" / "0-sparsify.checkpoints").exists()
    again = run_recipe(recipe)  # the resumed run counts as the configured run
    assert [r.get("skipped", False) for r in again] == [True, True]
