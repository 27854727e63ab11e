"""Mixture-of-Depths artifacts under d2d eval, d2d bench and the FLOPs count; the sink; the
block's every-token shortcut; the routers' own learning rate."""

import json

import pytest
import torch
from d2d_cli.main import app
from test_mod import llama, logits, randomise_routers
from tiny import decode_step
from typer.testing import CliRunner

from d2d.errors import D2DError
from d2d.measure.flops import converted_flops, dense_ffn_macs, dense_flops
from d2d.nn.depth import MoDBlock, insert_mod, mod_blocks, set_mode
from d2d.nn.routing import routing

runner = CliRunner()


def test_sink_positions_are_always_processed():
    m = llama()
    blocks = insert_mod(m, [1, 3], capacity=0.25, sink=1)
    randomise_routers(m)
    for blk in blocks.values():  # the router would never pick position 0
        blk.router.bias.data.zero_()
    ids = torch.randint(1, 96, (2, 12))
    with torch.no_grad():
        for blk in blocks.values():
            blk.router.weight.data.zero_()
            blk.router.bias.data.fill_(0.0)

    # rank position 0 last: large logits everywhere else
    def late_first(mod, args, out):
        out = out.clone()
        out[:, 0] = -100.0
        return out

    for blk in blocks.values():
        blk.router.register_forward_hook(lambda mod, a, y: late_first(mod, a, y))
    for mode in ("topk", "causal"):
        set_mode(m, mode)
        logits(m, input_ids=ids)
        for blk in blocks.values():
            assert blk.last_choice[:, 0].all(), mode
            if mode == "topk":  # the sink counts towards k: still exactly k tokens
                assert blk.last_choice.sum(-1).tolist() == [3, 3]
            else:  # the causal decision skips position 0 here, the sink overrides it
                assert not (blk.last_causal[:, 0] > 0).any()


def test_dense_mode_shortcut_equals_the_gathered_path(monkeypatch):
    m = llama(seed=4)
    insert_mod(m, [1, 3], capacity=1.0)
    randomise_routers(m, scale=0.5)  # g != 1: the update scaling is part of the check
    ids = torch.randint(1, 96, (2, 10))
    set_mode(m, "dense")
    fast = logits(m, input_ids=ids)
    monkeypatch.setattr(MoDBlock, "_cache_whole", lambda self, cache, t: False)
    torch.testing.assert_close(fast, logits(m, input_ids=ids))


def test_dense_prefill_then_causal_decoding_uses_the_right_entries():
    """A prefill every block took in full (the shortcut), then causal steps that skip: the
    cached result equals the same decisions made without a cache."""
    m = llama(seed=1)
    insert_mod(m, [1, 3], capacity=0.5)
    randomise_routers(m, seed=3)
    ids = torch.randint(1, 96, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        set_mode(m, "dense")
        out = m(input_ids=ids[:, :4], use_cache=True)
        set_mode(m, "causal")
        steps = [out.logits]
        for j in range(4, 9):
            out = decode_step(m, ids[:, j : j + 1], out)
            steps.append(out.logits)
    skipped = {i: int((~b.last_choice).sum()) for i, b in mod_blocks(m).items()}
    # the reference: no cache, the first 4 tokens forced through every block
    ref = llama(seed=1)
    insert_mod(ref, [1, 3], capacity=0.5, sink=4)
    randomise_routers(ref, seed=3)
    set_mode(ref, "causal")
    torch.testing.assert_close(
        torch.cat(steps, 1), logits(ref, input_ids=ids), rtol=1e-4, atol=1e-5
    )
    assert skipped  # the decode steps did route


def test_flops_of_routed_blocks():
    m = llama(layers=4)
    insert_mod(m, [1, 3], capacity=0.5)
    dense = dense_flops(m, 64, causal=True)
    full = converted_flops(m, 64, True, {}, {1: 1.0, 3: 1.0})
    d = m.config.hidden_size
    assert full.routers == 2.0 * 2 * d  # two routers, one dot product each per token
    assert full.total == pytest.approx(dense.total + full.routers)
    half = converted_flops(m, 64, True, {}, {1: 0.5, 3: 0.5})
    ffn = dense_ffn_macs(m)
    assert half.ffn == pytest.approx(2.0 * (ffn[0] + ffn[2] + 0.5 * (ffn[1] + ffn[3])))
    # a block at half its tokens: half its projections, a quarter of its attention scores
    per_block = dense.attention / 4
    assert half.attention < dense.attention - 2 * 0.5 * per_block + 1e-6
    assert half.attention > dense.attention - 2 * 0.75 * per_block - 1e-6


def test_flops_of_each_skip_kind_by_hand():
    from d2d.measure.flops import _attention_macs

    for skip in ("attention", "mlp"):
        m = llama(layers=4)
        insert_mod(m, [1, 3], capacity=0.5, skip=skip)
        proj, scores = _attention_macs(m, 64, True)
        ffn = dense_ffn_macs(m)
        got = converted_flops(m, 64, True, {}, {1: 0.5, 3: 0.25})
        if skip == "attention":  # routed attention at f (scores at f^2), every FFN in full
            attn = 2 * (proj + scores) + (0.5 * proj + 0.25 * scores) + (0.25 * proj + scores / 16)
            assert got.ffn == pytest.approx(2.0 * sum(ffn))
        else:  # every attention in full, routed FFNs at f
            attn = 4 * (proj + scores)
            assert got.ffn == pytest.approx(2.0 * (ffn[0] + ffn[2] + 0.5 * ffn[1] + 0.25 * ffn[3]))
        assert got.attention == pytest.approx(2.0 * attn)


def test_flops_of_keep_kv_by_hand():
    """keep_kv: f of the q and o projections, k and v for every token, f of the scores (the
    chosen queries see every key); skip "block" also f of the FFN."""
    from d2d.measure.flops import _attention_macs, _kv_macs

    for skip in ("attention", "block"):
        m = llama(layers=4)
        insert_mod(m, [1, 3], capacity=0.5, skip=skip, keep_kv=True)
        proj, scores = _attention_macs(m, 64, True)
        cfg = m.config
        hd = cfg.hidden_size // cfg.num_attention_heads
        kv = 2 * cfg.hidden_size * cfg.num_key_value_heads * hd
        assert _kv_macs(m) == kv and 0 < kv < proj
        ffn = dense_ffn_macs(m)
        got = converted_flops(m, 64, True, {}, {1: 0.5, 3: 0.25})
        routed = sum(f * (proj - kv) + kv + f * scores for f in (0.5, 0.25))
        assert got.attention == pytest.approx(2.0 * (2 * (proj + scores) + routed))
        f_ffn = 2.0 * (ffn[0] + ffn[2] + 0.5 * ffn[1] + 0.25 * ffn[3])
        assert got.ffn == pytest.approx(f_ffn if skip == "block" else 2.0 * sum(ffn))


def test_depth_policy_is_validated_and_restored():
    m = llama(layers=2)
    insert_mod(m, [1], capacity=0.5)
    with pytest.raises(D2DError, match="depth"):
        with routing(m, {"rule": "all", "depth": "sometimes"}):
            pass
    blk = mod_blocks(m)[1]
    set_mode(m, "causal")
    with routing(m, {"rule": "all"}):
        assert blk.mode == "dense"
    with routing(m, {"depth": "topk"}):
        assert blk.mode == "topk"
    assert blk.mode == "causal"


def test_eval_reports_topk_and_causal_rows(mod_artifact, tmp_path):
    out = tmp_path / "eval.json"
    res = runner.invoke(
        app,
        ["eval", str(mod_artifact), "--tokens", "256", "--seq-len", "32", "--no-bf16"]
        + ["--json", str(out)],
        env={"COLUMNS": "200"},
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())["metrics"]["rows"]
    assert [r["model"] for r in rows] == ["dense", "d2d top-k", "d2d causal"]
    dense, topk, causal = rows
    assert dense["model_fraction"] == pytest.approx(1.0, abs=0.01)  # + the router's dot product
    # block 1 of 2 takes half of the real tokens under top-k (32-token windows: exactly 16)
    assert topk["depth"]["processed"] == {"1": 0.5}
    assert topk["depth"]["block_fraction"] == pytest.approx(0.75)
    # (the tiny model's FLOPs are mostly its LM head, which every token pays)
    assert topk["model_fraction"] < dense["model_fraction"]
    assert topk["ffn_fraction"] == pytest.approx(0.75)
    assert 0.0 <= topk["depth"]["predictor_accuracy"] <= 1.0
    assert causal["depth"]["predictor_accuracy"] is None  # it is the decision itself
    assert "blocks run" in res.output and "causal decision agrees with" in res.output
    assert "(top-k)" in res.output


def test_bench_times_mod_artifacts(mod_artifact, tmp_path):
    out = tmp_path / "bench.json"
    args = ["--reps", "2", "--warmup", "1", "--prompt-len", "16", "--decode-batch", "1"]
    args += ["--decode-prompt", "4", "--new-tokens", "3", "--json", str(out)]
    res = runner.invoke(app, ["bench", str(mod_artifact), *args], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())["metrics"]
    assert m["layer"] is None  # no converted FFN to time alone
    got = [(r["measure"], r["routing"]) for r in m["model"]]
    assert got == [
        ("prefill 16 tokens", "MoD topk (capacity 0.5, skipping the block)"),
        ("prefill 16 tokens", "MoD causal (capacity 0.5, skipping the block)"),
        ("decode, batch 1", "MoD causal (capacity 0.5, skipping the block)"),
    ]
    assert m["model"][0]["model_flops_fraction"] < 1.0
    for r in m["model"]:
        assert r["dense"] > 0 and r["d2d"] > 0
    assert m["memory"]["ratio"] > 1  # router and predictor


def test_new_parameters_train_at_their_own_rate(model_dirs, tmp_path):
    """--lr tiny, --router-lr large: the routers move, the model's own weights barely do."""
    from safetensors.torch import load_file

    out = tmp_path / "m"
    res = runner.invoke(
        app,
        ["mod", model_dirs["gated"], "-o", str(out), "--layers", "1", "--steps", "3"]
        + ["--batch-size", "2", "--seq-len", "16", "--eval-tokens", "64", "--no-bf16"]
        + ["--lr", "1e-12", "--router-lr", "1e-2", "--warmup", "0"],
    )
    assert res.exit_code == 0, res.output
    after = load_file(out / "model.safetensors")
    before = load_file(f"{model_dirs['gated']}/model.safetensors")
    key = "model.layers.1.block.mlp.down_proj.weight"
    assert (after[key] - before["model.layers.1.mlp.down_proj.weight"]).abs().max() < 1e-9
    assert after["model.layers.1.router.weight"].abs().max() > 1e-3  # from zeros


def test_report_draws_the_routing_map(mod_artifact, tmp_path):
    from d2d.report import build_report

    rec = build_report(mod_artifact, tmp_path / "r")
    assert {"mod_map", "mod_training"} <= set(rec["figures"])
    assert not any("calibrat" in n for n in rec["notes"])  # nothing to calibrate here
    rmap = json.loads((tmp_path / "r" / "report.json").read_text())["routing_map"]
    assert len(rmap["tokens"]) == rmap["window"] == 32
    topk = rmap["maps"]["topk"]["1"]
    assert sum(topk) == 16 and topk[0] == 1  # capacity 0.5 of 32 tokens, the sink included
    assert rmap["maps"]["causal"]["1"][0] == 1
    page = (tmp_path / "r" / "index.html").read_text()
    assert "Mixture-of-Depths routing map" in page and "MoD capacity" in page


def test_inspect_describes_mod(mod_artifact):
    res = runner.invoke(app, ["inspect", str(mod_artifact)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "Mixture-of-Depths: blocks 1 routed (skipping the block) at capacity 0.5" in res.output
    assert "MLP predictor" in res.output and "run d2d calibrate" not in res.output


def test_staged_artifact_records_and_replays_both(mod_artifact, tmp_path):
    """d2d mod, then d2d convert: the lineage holds both, d2d.load rebuilds both, and with
    every expert run the converted artifact computes what the MoD artifact does."""
    import d2d
    from d2d.nn.structure import moe_layers
    from d2d.stages import ConvertConfig, run_stage

    out = tmp_path / "staged"
    run_stage("convert", str(mod_artifact), ConvertConfig(n_experts=8), out)
    meta = json.loads((out / "d2d.json").read_text())
    assert [s["stage"] for s in meta["stages"]] == ["mod", "convert"]
    staged, mod_only = d2d.load(out), d2d.load(mod_artifact)
    assert sorted(mod_blocks(staged)) == [1] and sorted(moe_layers(staged)) == [0, 1]
    ids = torch.randint(1, 96, (2, 12))
    with routing(staged, {"rule": "all", "depth": "causal"}):
        got = logits(staged, input_ids=ids)
    torch.testing.assert_close(got, logits(mod_only, input_ids=ids), rtol=1e-4, atol=1e-5)
