"""Attention projections as routed experts: attention-mlp's MLPs split by convert and routed
like FFN experts by every later stage."""

import json

import pytest
import torch
from tiny import decode_step, outputs, tiny

from d2d import load_artifact
from d2d.errors import D2DError
from d2d.measure.flops import converted_flops, dense_flops, routed_fraction
from d2d.measure.sensitivity import allocate
from d2d.nn.moe import LayerStats, MoEFFN
from d2d.nn.policy import RoutingPolicy, block_of, key_order
from d2d.nn.projection import replace_projections
from d2d.nn.routing import apply_routing, collecting, exact_policy, routing
from d2d.nn.structure import moe_layers
from d2d.stages import (
    AttentionMLPConfig,
    CalibrateConfig,
    ConvertConfig,
    EvalConfig,
    TrainRoutersConfig,
    run_stage,
)
from d2d.stages.convert import convert

NAMES = {"gated": ["q", "k", "v", "o"], "gpt2": ["qkv", "o"], "bert": ["q", "k", "v", "o"]}
D_OUT = {"gated": {"q": 32, "k": 16, "v": 16, "o": 32}, "gpt2": {"qkv": 96, "o": 32}}
D_OUT["bert"] = {"q": 32, "k": 32, "v": 32, "o": 32}


def _with_mlps(family: str, seed: int = 0):
    """A tiny model whose projections are MLPs of width 2 d_out + 8, moved off their exact
    start so that they differ from the projections."""
    model = tiny(family, seed)
    names = NAMES[family]
    hidden = {n: 2 * D_OUT[family][n] + 8 for n in names}
    made = replace_projections(model, [0, 1], names, hidden)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mlp, w, b in made.values():
            mlp.start_from(w, b)
            for p in mlp.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("family", list(NAMES))
@pytest.mark.parametrize("size", [1, 2, 4])
def test_every_expert_run_equals_the_projection_mlps(family, size):
    """Split into experts (FFNs too), with every expert executed the model computes what its
    projection MLPs computed: GPT-2's fused qkv and grouped-query k/v (narrower than q)
    included."""
    model = _with_mlps(family)
    ids = torch.randint(1, 90, (2, 9))
    ref = outputs(model, ids)
    structure = convert(model, ConvertConfig(expert_size=16, attention_expert_size=size))
    keys = [f"{i}_{n}" for i in (0, 1) for n in NAMES[family]]
    assert list(structure["projections"]) == keys
    moes = moe_layers(model)
    assert list(moes) == [k for i in (0, 1) for k in (i, *[f"{i}_{n}" for n in NAMES[family]])]
    for k in keys:
        m = moes[k]
        assert m.index == k and m.expert_size == size
        assert m.d_out == D_OUT[family][k.split("_")[1]]
    torch.testing.assert_close(outputs(model, ids), ref, rtol=1e-4, atol=1e-5)
    # top-k at fraction 1 by the oracle (the masked path) is the same function
    pol = {"rule": "topk", "fraction": 1.0, "scores": "oracle"}
    with routing(model, pol):
        torch.testing.assert_close(outputs(model, ids), ref, rtol=1e-4, atol=1e-5)
    # and skipping experts of a projection changes the output
    half = {"rule": "topk", "fractions": {k: 0.5 for k in keys}, "scores": "oracle"}
    with routing(model, half):
        assert not torch.allclose(outputs(model, ids), ref, atol=1e-4)


def test_exact_policy_keeps_the_function_and_skips_zero_experts():
    """Running only the experts whose true output is non-zero (the exact ceiling that
    scripts/projection_oracle.py measures) computes what every expert computes, and skips the
    projection experts whose ReLU neurons are all zero."""
    model = _with_mlps("gated", seed=3)
    convert(model, ConvertConfig(expert_size=16, attention_expert_size=2))
    with torch.no_grad():  # lower the MLPs' pre-activations: many neurons stay at zero
        for k, m in moe_layers(model).items():
            if isinstance(k, str):
                m.b_in.sub_(0.3)
    ids = torch.randint(1, 90, (2, 9))
    ref = outputs(model, ids)
    with routing(model, exact_policy(model)), collecting(model) as stats:
        torch.testing.assert_close(outputs(model, ids), ref, rtol=1e-4, atol=1e-5)
    moes = moe_layers(model)
    ran = {str(k): s.fraction(moes[k].n_experts) for k, s in stats.items()}
    proj = [v for k, v in ran.items() if "_" in k]
    assert min(proj) < 0.5 and sum(proj) / len(proj) < 0.9, ran  # zero experts were skipped


def test_sparse_execution_of_projection_experts_equals_masked():
    """Router scores run the sparse kernel (output width d_out != d_in for k and v); the
    masked reference gives the same logits."""
    model = _with_mlps("gated")
    convert(model, ConvertConfig(expert_size=16, attention_expert_size=4))
    moes = moe_layers(model)
    from d2d.nn.structure import attach_routers

    attach_routers(moes, 8)
    pol = {"rule": "topk", "fraction": 0.5}
    ids = torch.randint(1, 90, (2, 9))
    with routing(model, pol):
        sparse = outputs(model, ids)
        for m in moes.values():
            m.execution = "masked"
        masked = outputs(model, ids)
    torch.testing.assert_close(sparse, masked, rtol=1e-4, atol=1e-5)


def test_flops_of_converted_projections_by_hand():
    model = tiny("gated")
    dense = dense_flops(model, 16, True)
    replace_projections(model, [1], ["q", "k"], {"q": 80, "k": 40})
    convert(model, ConvertConfig(n_experts=4, attention_expert_size=8, layers="0"))
    moes = moe_layers(model)
    assert moes["1_q"].n_experts == 10 and moes["1_k"].n_experts == 5
    # q ran half its experts on average, k every one (no statistics)
    stats = {"1_q": LayerStats(tokens=10, executed=50, input_kept=10.0)}
    got = converted_flops(model, 16, True, stats)
    q = 0.5 * (32 * 80 + 80 * 32) - 32 * 32  # its experts instead of the 32 x 32 projection
    k = 32 * 40 + 40 * 16 - 32 * 16  # every neuron of 32 -> 40 -> 16 instead of 32 x 16
    assert got.attention == pytest.approx(dense.attention + 2.0 * (q + k))
    assert got.ffn == pytest.approx(dense.ffn)
    # the converted layers' FLOPs: FFN 0 in full, q at half, k in full
    ffn0 = 3 * 32 * 64
    full = ffn0 + 2 * 32 * 80 + (32 * 40 + 40 * 16)
    done = ffn0 + 0.5 * 2 * 32 * 80 + (32 * 40 + 40 * 16)
    assert routed_fraction(model, stats) == pytest.approx(done / full)


def test_policies_key_projections_by_block_and_name():
    p = RoutingPolicy.of({"rule": "threshold", "thresholds": {"0": 0.1, "1_q": 0.2}})
    assert p.value_at(0) == 0.1 and p.value_at("1_q") == 0.2 and p.value_at("1_k") == 0.0
    assert RoutingPolicy.of(p.to_dict()) == p
    assert block_of("12_qkv") == 12 and block_of(3) == 3
    assert sorted(["1_q", 1, 0, "0_o", "0_k"], key=key_order) == [0, "0_k", "0_o", 1, "1_q"]
    with pytest.raises(D2DError, match="bad layer key"):
        RoutingPolicy.of({"rule": "threshold", "thresholds": {"q_1": 0.2}})


def test_allocation_weighs_layers_by_their_flops():
    """Two layers, one three times the other's FLOPs: a budget of half the total is met by
    the weighted mean, not the plain one."""
    import numpy as np

    fr = np.array([1.0, 0.5, 0.0])
    table = {
        "big": (fr, np.array([0.0, 1.0, 10.0]), [0.0, 0.5, 1.0]),
        "small": (fr, np.array([0.0, 1.0, 10.0]), [0.0, 0.5, 1.0]),
    }
    got = allocate(table, 0.5, {"big": 3.0, "small": 1.0})
    share = (3.0 * (1 - got["big"]) + 1.0 * (1 - got["small"])) / 4.0
    assert share <= 0.5 + 1e-9
    assert allocate(table, 0.5) == {"big": 0.5, "small": 0.5}


def test_convert_refuses_expert_sizes_that_do_not_divide_the_mlps():
    model = tiny("gated")
    replace_projections(model, [0], ["q"], {"q": 70})
    with pytest.raises(D2DError, match="does not divide the 70-neuron MLP"):
        convert(model, ConvertConfig(expert_size=16, attention_expert_size=4))
    assert not moe_layers(model)  # refused before any change
    convert(model, ConvertConfig(expert_size=16, attention_expert_size=4, attention=False))
    assert list(moe_layers(model)) == [0, 1]


def test_the_pipeline_routes_projections_saves_and_generates(model_dirs, text_dir, tmp_path):
    """attention-mlp -> convert -> train-routers -> calibrate -> eval on a tiny decoder: the
    projections get routers and per-layer settings, the artifact replays them, and cached
    decoding equals the full forward under the chosen routing."""
    small = {"data": text_dir, "seq_len": 32, "bf16": False}
    run_stage(
        "attention-mlp",
        model_dirs["gated"],
        AttentionMLPConfig(tokens=512, heldout_tokens=128, eval_tokens=128, steps=5, **small),
        tmp_path / "a",
    )
    conv = run_stage(
        "convert",
        str(tmp_path / "a"),
        ConvertConfig(n_experts=8, attention_expert_size=8, **small),
        tmp_path / "c",
    )
    assert conv["metrics"]["converted_projections"] == 8
    # the split keeps the function, and the artifact loads back to it
    ids = torch.randint(1, 90, (2, 7))
    mlps, experts = load_artifact(tmp_path / "a").model, load_artifact(tmp_path / "c").model
    assert isinstance(moe_layers(experts)["0_v"], MoEFFN) and not moe_layers(mlps)
    torch.testing.assert_close(outputs(experts, ids), outputs(mlps, ids), rtol=1e-4, atol=1e-5)
    routers = run_stage(
        "train-routers",
        str(tmp_path / "c"),
        TrainRoutersConfig(
            tokens=512, heldout_tokens=128, steps=20, hidden=8, attention_hidden=4, **small
        ),
        tmp_path / "r",
    )
    assert {"0_q", "1_o", "0", "1"} <= set(routers["metrics"]["per_layer"])
    # the projections' routers have their own width, and the artifact replays it
    for k, m in moe_layers(load_artifact(tmp_path / "r").model).items():
        assert m.router.fc1.out_features == (4 if isinstance(k, str) else 8), k
    run_stage(
        "calibrate",
        str(tmp_path / "r"),
        CalibrateConfig(
            taus="0,0.2", budgets="0.6", target_flops=0.6, tokens=256, sensitivity_tokens=128,
            **small,
        ),
        tmp_path / "cal",
    )  # fmt: skip
    meta = json.loads((tmp_path / "cal" / "d2d.json").read_text())
    rows = meta["calibration"]["rows"]
    assert all("routed_fraction" in r for r in rows)
    chosen = rows[meta["calibration"]["choice"]]
    assert chosen["routed_fraction"] <= 0.6 + 0.01
    assert set(chosen["layer_fractions"]) >= {"0_q", "1_v"}
    policy = RoutingPolicy.of(meta["routing"])
    assert any(isinstance(k, str) for k in policy.per_layer)
    art = load_artifact(tmp_path / "cal")
    assert isinstance(moe_layers(art.model)["1_k"], MoEFFN)
    apply_routing(art.model, meta["routing"])
    ids = torch.randint(1, 90, (1, 8))
    with torch.no_grad():
        full = art.model(input_ids=ids).logits
        out = art.model(input_ids=ids[:, :5], use_cache=True)
        step = decode_step(art.model, ids[:, 5:6], out)
    torch.testing.assert_close(step.logits[:, -1], full[:, 5], rtol=1e-4, atol=1e-4)
    gen = art.model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 11)
    ev = run_stage(
        "eval", str(tmp_path / "cal"), EvalConfig(tokens=256, layer_errors=True, **small)
    )
    # each projection's (and FFN's) error under the routing has its own row
    assert {"0_q", "1_k", "0", "1"} <= set(ev["metrics"]["layer_errors"])
    dense_row, conv_row = ev["metrics"]["rows"]
    assert dense_row["model"] == "dense (projections as MLPs)"
    assert dense_row["routed_fraction"] == pytest.approx(1.0)
    assert conv_row["routed_fraction"] < 1.0
    # inspect names the converted projections; the report renders
    from d2d_cli.main import app
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "cal")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "attention projections as experts: k, o, q, v in 2 blocks, 4/8 experts" in res.output
    res = CliRunner().invoke(app, ["report", str(tmp_path / "cal"), "-o", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output


def test_bench_reference_runs_linear_projections_and_memory_counts_the_mlps():
    """The dense reference bench times is the model before attention-mlp: every replaced
    projection a linear layer of its shape inside the context, restored after; the memory
    line counts what the MLPs hold beyond the projections."""
    from d2d.nn.projection import linear_projections, replacement_bytes

    model = _with_mlps("gated")
    before = replacement_bytes(model)
    q = (32 * 72 + 72 + 72 * 32 + 32) - (32 * 32 + 32)  # q's MLP: 32 -> 72 -> 32
    k = (32 * 40 + 40 + 40 * 16 + 16) - (32 * 16 + 16)  # k's MLP: 32 -> 40 -> 16
    assert before == 4 * 2 * (2 * q + 2 * k)  # fp32, 2 blocks, q and o alike, k and v alike
    convert(model, ConvertConfig(expert_size=16, attention_expert_size=4))
    assert replacement_bytes(model) == before  # the same weights, permuted
    attn = model.model.layers[1].self_attn
    moe = attn.k_proj
    ids = torch.randint(1, 90, (1, 6))
    with linear_projections(model):
        assert isinstance(attn.k_proj, torch.nn.Linear) and attn.k_proj.weight.shape == (16, 32)
        assert outputs(model, ids).shape == (1, 6, 96)
    assert attn.k_proj is moe


def test_report_heatmaps_take_projections_with_their_own_expert_counts():
    from d2d.report import k_hist_figure, usage_figure

    usage = {"1": [3, 1, 0, 2], "0_q": [1, 2], "0": [4, 0, 1, 1]}
    k_hist = {"1": [0, 1, 2, 1, 0], "0_q": [1, 2, 1], "0": [0, 0, 3, 1, 0]}
    for png in (usage_figure(usage, k_hist), k_hist_figure(k_hist)):
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
