"""lm-evaluation-harness through d2d eval: local tasks, dense == every expert, MoD causal."""

import builtins
import json

import pytest
import torch
from d2d_cli.main import app
from typer.testing import CliRunner

from d2d import load_artifact
from d2d.errors import D2DError
from d2d.measure.harness import run_harness, write_local_tasks
from d2d.models import load_base
from d2d.nn.depth import mod_blocks
from d2d.stages import ConvertConfig, run_stage

pytest.importorskip("lm_eval")
runner = CliRunner()
ALL = {"rule": "all"}
SMALL = {"limit": 4, "batch_size": 4, "seq_len": 64}


def test_local_tasks_are_written_from_the_held_out_data(tmp_path):
    folder = write_local_tasks(tmp_path / "t")
    topic = [json.loads(x) for x in (folder / "bbc_topic.jsonl").read_text().splitlines()]
    assert 150 < len(topic) < 300 and {r["label"] for r in topic} == {0, 1, 2, 3, 4}
    assert all(len(r["text"].split()) <= 120 for r in topic)
    passages = (folder / "shakespeare.jsonl").read_text().splitlines()
    assert len(passages) > 20 and all(len(json.loads(p)["text"]) >= 1500 for p in passages)
    assert "multiple_choice" in (folder / "d2d_bbc_topic.yaml").read_text()


def test_dense_model_and_every_expert_artifact_score_alike(model_dirs, tmp_path):
    """The harness on the base model and on its converted artifact with every expert: the
    same function, so the same scores; the artifact at half its experts scores otherwise."""
    tasks = ["d2d_bbc_topic", "d2d_shakespeare"]
    base = load_base(model_dirs["gated"])
    want = run_harness(base.model, base.tokenizer, tasks, {"dense": ALL}, **SMALL)
    run_stage("convert", model_dirs["gated"], ConvertConfig(n_experts=8), tmp_path / "c")
    art = load_artifact(tmp_path / "c")
    few = {"rule": "topk", "fraction": 0.125, "scores": "oracle"}  # one expert of eight
    got = run_harness(art.model, art.tokenizer, tasks, {"dense": ALL, "d2d": few}, **SMALL)
    for task in ("d2d_bbc_topic", "d2d_shakespeare"):
        for metric, v in want["tasks"][task].items():
            assert got["tasks"][task][metric]["dense"] == pytest.approx(v["dense"], rel=1e-5)
    ppl = got["tasks"]["d2d_shakespeare"]["word_perplexity"]
    assert abs(ppl["d2d"] / ppl["dense"] - 1) > 1e-4
    assert got["flops"]["dense"]["ffn_fraction"] == pytest.approx(1.0)
    assert got["n_samples"] == {"d2d_bbc_topic": 4, "d2d_shakespeare": 4}
    assert "sample_len" not in got["tasks"]["d2d_bbc_topic"]
    assert got["flops"]["d2d"]["ffn_fraction"] == pytest.approx(0.125, abs=0.02)


def test_mod_artifact_is_evaluated_in_causal_mode(mod_artifact):
    seen = set()
    art = load_artifact(mod_artifact)
    blk = mod_blocks(art.model)[1]
    blk.register_forward_hook(lambda m, a, y: seen.add(m.mode))
    res = run_harness(
        art.model,
        art.tokenizer,
        ["d2d_bbc_topic"],
        {"dense": ALL, "d2d": {"rule": "all", "depth": "causal"}},
        **SMALL,
    )
    assert seen == {"dense", "causal"}
    assert set(res["flops"]) == {"dense", "d2d"}


def test_eval_cli_prints_the_harness_table(calibrated, tmp_path):
    out = tmp_path / "e.json"
    args = ["eval", str(calibrated["calibrate"]), "--lm-eval", "d2d_bbc_topic"]
    args += ["--lm-eval-limit", "3", "--tokens", "128", "--seq-len", "64", "--no-bf16"]
    res = runner.invoke(app, [*args, "--json", str(out)], env={"COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    assert "lm-evaluation-harness" in res.output and "d2d_bbc_topic" in res.output
    h = json.loads(out.read_text())["metrics"]["lm_eval"]
    assert set(h["tasks"]["d2d_bbc_topic"]["acc"]) == {"dense", "d2d"}


def test_unknown_task_and_missing_harness_are_one_line_errors(model_dirs, monkeypatch):
    base = load_base(model_dirs["gated"])
    with pytest.raises(D2DError, match="no task 'no_such_task'"):
        run_harness(base.model, base.tokenizer, ["no_such_task"], {"dense": ALL}, **SMALL)
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(D2DError, match=r"pip install 'd2d\[eval\]'"):
        run_harness(base.model, base.tokenizer, ["d2d_bbc_topic"], {"dense": ALL}, **SMALL)
    assert torch.is_grad_enabled()
