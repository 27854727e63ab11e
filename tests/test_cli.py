import dataclasses
import subprocess
import sys

import pytest
from d2d_cli.main import app
from typer.testing import CliRunner

from d2d.stages import STAGES

runner = CliRunner()


def test_every_config_field_is_a_cli_option():
    for name, spec in STAGES.items():
        res = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        for f in dataclasses.fields(spec.config_cls):
            assert "--" + f.name.replace("_", "-") in res.output, (name, f.name)


def test_convert_through_the_cli(model_dirs, tmp_path):
    out = tmp_path / "c"
    res = runner.invoke(app, ["convert", model_dirs["gpt2"], "--out", str(out), "--n-experts", "8"])
    assert res.exit_code == 0, res.output
    assert "8 experts" in res.output and (out / "d2d.json").exists()


@pytest.mark.parametrize(
    "args,match",
    [
        (["convert", "/no/such/model", "--out", "X"], "does not exist"),
        (["convert", "MODEL", "--out", "X", "--n-experts", "7"], "do not divide"),
        (["eval", "MODEL", "--tau", "1.5"], "tau must be in [0, 1]"),
    ],
)
def test_bad_input_one_line_exit_2(args, match, model_dirs, tmp_path):
    args = [a.replace("MODEL", model_dirs["gated"]).replace("X", str(tmp_path / "o")) for a in args]
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert match in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_real_process_exit_code_and_single_line(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "d2d_cli",
            "convert",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error:") and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_run_with_missing_recipe_is_exit_2(tmp_path):
    res = runner.invoke(app, ["run", str(tmp_path / "none.yaml")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_calibrate_summary_prints_the_table(model_dirs, tmp_path):
    args = ["--n-experts", "8"]
    assert (
        runner.invoke(
            app, ["convert", model_dirs["gated"], "-o", str(tmp_path / "c"), *args]
        ).exit_code
        == 0
    )
    res = runner.invoke(
        app,
        [
            "train-routers",
            str(tmp_path / "c"),
            "-o",
            str(tmp_path / "r"),
            "--tokens",
            "512",
            "--seq-len",
            "64",
            "--steps",
            "5",
            "--heldout-tokens",
            "128",
            "--hidden",
            "8",
        ],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app,
        [
            "calibrate",
            str(tmp_path / "r"),
            "-o",
            str(tmp_path / "k"),
            "--taus",
            "0,0.5",
            "--tokens",
            "256",
            "--seq-len",
            "64",
            "--no-per-layer",
        ],
        env={"COLUMNS": "160"},
    )
    assert res.exit_code == 0, res.output
    assert "calibration" in res.output and "global-tau" in res.output and "->" in res.output


def test_eval_writes_json_report(model_dirs, tmp_path):
    import json

    out = tmp_path / "report.json"
    res = runner.invoke(
        app, ["eval", model_dirs["gated"], "--json", str(out), "--tokens", "256", "--seq-len", "64"]
    )
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["stage"] == "eval" and rep["metrics"]["rows"][0]["model"] == "dense"
    assert "perplexity" in res.output


@pytest.mark.parametrize(
    "args",
    [
        ["calibrate", "MODEL", "-o", "X", "--tau", "0,2"],
        ["calibrate", "MODEL", "-o", "X", "--taus", "0,2"],
        ["calibrate", "MODEL", "-o", "X", "--tau", "2"],
        ["bench", "MODEL", "--tau", "0.1,2"],
        ["bench", "MODEL", "--taus", "2"],
        ["report", "MODEL", "--tau", "0,2"],
        ["report", "MODEL", "--taus", "2"],
    ],
)
def test_tau_is_one_value_or_a_list_on_calibrate_bench_and_report(args, model_dirs, tmp_path):
    """--tau (and its alias --taus) reaches the same option on all three commands: a bad value
    in it is refused by that option's own check."""
    args = [a.replace("MODEL", model_dirs["gated"]).replace("X", str(tmp_path / "o")) for a in args]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "tau must be in [0, 1], got 2.0" in res.output
    assert not (tmp_path / "o").exists()


def test_tau_alias_in_configs_and_recipes():
    from d2d.recipe import parse_recipe
    from d2d.stages import make_config

    assert make_config("calibrate", {"tau": "0,0.1"}).taus == "0,0.1"
    assert make_config("calibrate", {"taus": 0.1}).taus == "0.1"
    assert make_config("bench", {"tau": "0.2"}).taus == "0.2"
    with pytest.raises(Exception, match="given twice"):
        make_config("calibrate", {"tau": "0", "taus": "0.1"})
    r = parse_recipe(
        "model: m\nout: o\nstages: [calibrate]\n", ["calibrate.tau=0,0.3", "calibrate.tokens=64"]
    )
    cfg = make_config("calibrate", r["stages"][0][1])
    assert cfg.taus == "0,0.3" and cfg.tokens == 64


def test_help_names_the_alias():
    res = runner.invoke(app, ["calibrate", "--help"], env={"COLUMNS": "200"})
    assert "--tau" in res.output and "--taus" in res.output and "the same" in res.output


def test_eval_table_shows_no_masked_path_time(model_dirs, tmp_path):
    res = runner.invoke(
        app, ["eval", model_dirs["gated"], "--tokens", "256", "--seq-len", "64"],
        env={"COLUMNS": "200"},
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    header = next(line for line in res.output.splitlines() if "model FLOPs" in line)
    assert "time" not in header
    assert "time: see d2d bench" in res.output


def test_eval_compare_rules_router_and_oracle(calibrated, tmp_path):
    import json

    out = tmp_path / "rules.json"
    res = runner.invoke(
        app,
        ["eval", str(calibrated["train-routers"]), "--compare-rules", "--tokens", "256",
         "--seq-len", "64", "--json", str(out)],
        env={"COLUMNS": "200"},
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rules = json.loads(out.read_text())["metrics"]["rules"]
    got = {(r["scores"], r["rule"]) for r in rules["rows"]}
    for scores in ("router", "oracle"):
        for rule in ("global-tau", "per-layer-tau", "per-layer-threshold", "static-topk"):
            assert (scores, rule) in got
    # oracle scores rank by the true norms: at a fixed top-k fraction they never lose to the
    # routers by more than noise on the same tokens
    topk = {(r["scores"], r["fraction"]): r["quality"] for r in rules["rows"] if "fraction" in r}
    assert topk[("oracle", 0.5)] <= topk[("router", 0.5)] * 1.05
    assert set(rules["savings"]) == {"1%", "2%", "5%", "10%"}
    assert "oracle savings" in res.output
    by_rule = rules["savings_by_rule"]
    assert {"global-tau", "per-layer-tau", "per-layer-threshold", "static-topk"} <= set(by_rule)
    assert "each rule: router savings / oracle savings" in res.output
