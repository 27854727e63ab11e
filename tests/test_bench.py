"""d2d bench: a short run on a tiny model, checked through its JSON report."""

import json

import pytest
import torch
from d2d_cli.main import app
from typer.testing import CliRunner

runner = CliRunner()
SHORT = ["--token-counts", "1,5", "--reps", "2", "--warmup", "1", "--prompt-len", "16"]
SHORT += ["--decode-batch", "1,2", "--decode-prompt", "4", "--new-tokens", "3"]


def test_bench_smoke_json(calibrated, tmp_path):
    out = tmp_path / "bench.json"
    res = runner.invoke(
        app, ["bench", str(calibrated["calibrate"]), "--json", str(out), *SHORT],
        env={"COLUMNS": "200"},
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())["metrics"]
    assert {"cpu", "torch_threads", "torch", "sparse_kernel"} <= set(m["machine"])
    rows = m["layer"]["rows"]
    assert [r["tokens"] for r in rows] == [1, 5]
    for r in rows:
        assert 0 < r["flops_fraction"] <= 1.5 and r["dense_ms"] > 0 and r["d2d_ms"] > 0
        assert r["time_fraction"] == pytest.approx(r["d2d_ms"] / r["dense_ms"])
    measures = [r["measure"] for r in m["model"]]
    assert measures == ["prefill 16 tokens", "decode, batch 1", "decode, batch 2"]
    for r in m["model"]:
        assert r["dense"] > 0 and r["d2d"] > 0 and 0 < r["model_flops_fraction"] <= 1.5
    assert m["memory"]["ratio"] > 1 and m["memory"]["file_bytes"] > 0
    assert "one FFN layer" in res.output and "speed-up" in res.output


def test_bench_at_given_taus(calibrated):
    res = runner.invoke(
        app, ["bench", str(calibrated["calibrate"]), "--taus", "0,1", "--no-model", *SHORT]
    )
    assert res.exit_code == 0, res.output
    from d2d.stages import BenchConfig, open_input
    from d2d.stages.bench import bench

    art = open_input(str(calibrated["calibrate"]))
    cfg = BenchConfig(taus="0,1", token_counts="3", reps=1, warmup=0, model=False)
    rows = bench(art, cfg)["layer"]["rows"]
    assert [r["routing"] for r in rows] == ["tau 0", "tau 1"]
    assert rows[0]["flops_fraction"] == 1.0  # every expert, and no router to pay for
    assert rows[1]["flops_fraction"] < 1.0


def test_bench_needs_a_converted_model(model_dirs):
    res = runner.invoke(app, ["bench", model_dirs["gated"], *SHORT])
    assert res.exit_code == 2 and "convert" in res.stderr


def test_bench_counts_the_calls_auto_execution_runs_dense(tokenizer):
    """Under exact-value thresholds, `--execution auto` runs prompts and decoding batches above
    the threshold kernel's limit as the dense FFN and its FLOPs say so (100%); batch-1 decoding
    stays routed, and its row counts the decoding steps alone, as it times them. `--execution
    sparse` routes every call."""
    from types import SimpleNamespace

    from tiny import tiny

    from d2d.nn.structure import moe_layers
    from d2d.stages import BenchConfig, ConvertConfig, convert
    from d2d.stages.bench import bench

    m = tiny("gated", vocab=tokenizer.vocab_size)
    convert(m, ConvertConfig(expert_size=1))
    layers = moe_layers(m)
    pol = {"rule": "threshold", "scores": "activation", "dense_positions": 1}
    pol["thresholds"] = {str(i): 0.05 for i in layers}
    pol["input_thresholds"] = {str(i): 0.3 for i in layers}
    art = SimpleNamespace(model=m, tokenizer=tokenizer, meta={"routing": pol}, path=None)
    got = {}
    for mode in ("auto", "sparse"):
        cfg = BenchConfig(
            token_counts="1,16", reps=1, warmup=0, prompt_len=16, decode_batch="1,8",
            decode_prompt=8, new_tokens=3, execution=mode,
        )  # fmt: skip
        out = bench(art, cfg)
        got[mode] = {r["tokens"]: r["flops_fraction"] for r in out["layer"]["rows"]}
        got[mode] |= {r["measure"]: r["ffn_flops_fraction"] for r in out["model"]}
    auto, sparse = got["auto"], got["sparse"]
    assert auto[1] == sparse[1] < 1.0
    assert auto["decode, batch 1"] == pytest.approx(sparse["decode, batch 1"])
    assert auto["decode, batch 1"] < 1.0
    for big in (16, "prefill 16 tokens", "decode, batch 8"):
        assert auto[big] == 1.0 and sparse[big] < 1.0, big


def test_layer_inputs_leave_out_a_causal_lms_first_position(tokenizer):
    """The one-layer benchmark's inputs are real hidden states from 256-token windows without
    each window's first position (the sink's, unlike any other token's), even for 1 token."""
    from types import SimpleNamespace

    from tiny import tiny

    from d2d.measure.evaluate import batches_for
    from d2d.measure.timing import _inputs
    from d2d.nn.structure import moe_layers
    from d2d.stages import BenchConfig, ConvertConfig, convert

    m = tiny("gated", vocab=tokenizer.vocab_size)
    convert(m, ConvertConfig(expert_size=8))
    art = SimpleNamespace(model=m, tokenizer=tokenizer)
    cfg = BenchConfig()
    x1 = _inputs(art, cfg, 1, 1)
    seen = []
    h = moe_layers(m)[1].register_forward_pre_hook(lambda mod, a: seen.append(a[0]))
    b = batches_for(m, tokenizer, cfg.data, "calib", 256, 2, cfg.seed)[0]
    with torch.no_grad():
        m(input_ids=b["input_ids"])
    h.remove()
    torch.testing.assert_close(x1[0], seen[0][0, 1])  # position 1 of the first window
    x = _inputs(art, cfg, 1, 300)
    firsts = seen[0][:, 0]
    assert not any(torch.allclose(row, f) for row in x[:300] for f in firsts)
