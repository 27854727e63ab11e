"""Routing without routers: the training-free peers (TEAL-style, CATS-style) and d2d's
exact-magnitude rule against hand computations on a tiny model; single-neuron experts; their
FLOPs; calibrate and eval --compare-rules with them."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import outputs, tiny

from d2d.measure.flops import converted_ffn_flops, dense_ffn_macs
from d2d.nn.routing import collecting, execution, routing
from d2d.nn.structure import attach_routers, moe_layers
from d2d.stages import ConvertConfig, convert


def single(family="gated"):
    m = tiny(family)
    convert(m, ConvertConfig(expert_size=1))
    return m


@pytest.mark.parametrize("family", ["gated", "gpt2", "bert"])
@pytest.mark.parametrize("size", [1, 2, 4, 16])
def test_every_unit_selected_equals_dense(family, size):
    ids = torch.randint(1, 96, (2, 12))
    ref = outputs(tiny(family), ids)
    m = tiny(family)
    convert(m, ConvertConfig(expert_size=size))
    for policy in (
        {"rule": "all"},
        {"rule": "threshold", "scores": "magnitude", "thresholds": {"0": 0.0, "1": 0.0}},
        {"rule": "topk", "fraction": 1.0, "scores": "oracle"},
    ):
        with routing(m, policy):
            torch.testing.assert_close(outputs(m, ids), ref)
    # rules that can skip (so scores, masks and the fast paths run) at values that keep every
    # unit with a non-zero output, in each execution
    tiny_t = {"0": 1e-30, "1": 1e-30}
    attach_routers(moe_layers(m), 8)
    for policy in (
        {"rule": "threshold", "scores": "activation", "thresholds": tiny_t},
        {"rule": "threshold", "scores": "magnitude", "thresholds": tiny_t},
        {"rule": "tau", "tau": 1e-12, "scores": "oracle"},
        {"rule": "tau", "tau": 1e-12},  # router scores (softplus: all positive)
    ):
        with routing(m, policy):
            assert all(layer.routes() for layer in moe_layers(m).values())
            for mode in ("sparse", "auto", "masked"):
                with execution(m, mode):
                    torch.testing.assert_close(outputs(m, ids), ref)


def _ffn_input(m, ids, layer=1):
    got = {}
    h = moe_layers(m)[layer].register_forward_pre_hook(lambda mod, a: got.setdefault("x", a[0]))
    with torch.no_grad():
        m(input_ids=ids)
    h.remove()
    return got["x"].reshape(-1, got["x"].shape[-1])


def _dense_ffn(layer):
    """The original FFN's weights, back in neuron order."""
    inv = torch.argsort(layer.perm)
    return layer.w_gate[inv], layer.w_in[inv], layer.w_out[inv]


def test_teal_style_by_hand():
    m = single()
    ids = torch.randint(1, 96, (1, 10))
    layer = moe_layers(m)[1]
    x = _ffn_input(m, ids)
    t_in, t_h = 0.4, 0.05
    pol = {
        "rule": "threshold", "scores": "activation", "thresholds": {"1": t_h},
        "input_thresholds": {"1": t_in},
    }  # fmt: skip
    with routing(m, pol), torch.no_grad():
        got = layer(x)
    wg, wu, wd = _dense_ffn(layer)
    xs = x * (x.abs() >= t_in)
    h = F.silu(xs @ wg.t()) * (xs @ wu.t())
    keep = (h.abs() >= t_h) | (h.abs() >= h.abs().amax(-1, keepdim=True))
    torch.testing.assert_close(got, (h * keep) @ wd)


def test_cats_style_by_hand():
    m = single()
    ids = torch.randint(1, 96, (1, 10))
    layer = moe_layers(m)[1]
    x = _ffn_input(m, ids)
    t = 0.1
    with routing(m, {"rule": "threshold", "scores": "gate", "thresholds": {"1": t}}):
        with torch.no_grad():
            got = layer(x)
    wg, wu, wd = _dense_ffn(layer)
    ga = F.silu(x @ wg.t())
    keep = (ga.abs() >= t) | (ga.abs() >= ga.abs().amax(-1, keepdim=True))
    torch.testing.assert_close(got, (ga * (x @ wu.t()) * keep) @ wd)


def test_magnitude_scores_weigh_by_the_down_row():
    m = single()
    layer = moe_layers(m)[1]
    x = _ffn_input(m, torch.randint(1, 96, (1, 10)))
    with routing(m, {"rule": "threshold", "scores": "magnitude", "thresholds": {"1": 0.0}}):
        h = layer.hidden(x)
        s = layer.scores(x, h)
    torch.testing.assert_close(s, h.abs() * layer.w_out.norm(dim=-1))
    torch.testing.assert_close(s, layer.expert_norms(h))  # exact for single neurons


def test_the_sink_reads_its_whole_input():
    m = single()
    ids = torch.randint(1, 96, (2, 8))
    ref = outputs(tiny("gated"), ids)
    pol = {"rule": "all", "input_thresholds": {"0": 1e9, "1": 1e9}, "dense_positions": 8}
    with routing(m, pol):
        torch.testing.assert_close(outputs(m, ids), ref)


def test_flops_of_each_score_kind_by_hand():
    """d = 32, f = 64, gated: gate and up 2 d f, down d f per token."""
    m = single()
    ids = torch.randint(1, 96, (2, 16))
    d, f = 32, 64
    dense = sum(dense_ffn_macs(m))
    assert dense == 2 * 3 * d * f

    def measured(pol):
        with routing(m, pol), collecting(m) as st, torch.no_grad():
            m(input_ids=ids)
            macs = converted_ffn_flops(m, st) / 2  # under the policy: its cost model
        per = {i: s.fraction(moe_layers(m)[i].n_experts) for i, s in st.items()}
        kx = {i: s.input_fraction() for i, s in st.items()}
        return macs, per, kx

    t = {"0": 0.3, "1": 0.3}
    got, k, _ = measured({"rule": "threshold", "scores": "gate", "thresholds": t})
    assert got == pytest.approx(sum(d * f + k[i] * 2 * d * f for i in k))
    pol = {"rule": "threshold", "scores": "activation", "thresholds": {"0": 0.05, "1": 0.05},
           "input_thresholds": {"0": 0.5, "1": 0.5}}  # fmt: skip
    got, k, kx = measured(pol)
    assert 0 < kx[0] < 1 and 0 < k[0] < 1
    assert got == pytest.approx(sum(kx[i] * 2 * d * f + k[i] * d * f for i in k))
    got, k, _ = measured({"rule": "topk", "fraction": 0.25, "scores": "oracle"})
    assert got == pytest.approx(sum(k[i] * 3 * d * f for i in k))


def test_calibrate_peers_and_magnitude_without_routers(model_dirs, tmp_path):
    from d2d.nn.policy import row_label
    from d2d.stages import CalibrateConfig, run_stage
    from d2d.stages.calibrate import SPLIT_STEPS

    conv = tmp_path / "c"
    run_stage("convert", model_dirs["gated"], ConvertConfig(expert_size=1), conv)
    cfg = CalibrateConfig(
        tokens=256, seq_len=64, sensitivity_tokens=128, budgets="0.8,0.5",
        layer_rules="magnitude,split", peers=True, max_quality_drop=10.0,
    )  # fmt: skip
    rec = run_stage("calibrate", str(conv), cfg, tmp_path / "k")
    rows = rec.meta["calibration"]["rows"]
    names = {(r["rule"], r.get("budget")) for r in rows}
    for rule in ("per-layer-magnitude", "split-magnitude", "per-layer-split", "teal-style",
                 "cats-style"):  # fmt: skip
        assert (rule, 0.8) in names and (rule, 0.5) in names
    split = [r for r in rows if r["rule"] == "split-magnitude"]
    for r in split:  # the best of the tried splits, at about its budget
        assert r["policy"]["input_share"] in {min(1.0, r["budget"] + s) for s in SPLIT_STEPS}
        assert r["ffn_fraction"] == pytest.approx(r["budget"], abs=0.1)
    for r in rows[1:]:
        assert r["ffn_fraction"] < 1.0  # each of them skips work
    for r in (r for r in rows if r["rule"] == "per-layer-split"):  # allocated about there
        assert r["ffn_fraction"] == pytest.approx(r["budget"], abs=0.1)
        assert row_label(r).startswith("exact magnitude, split per layer by measured cost @")
        assert set(r["policy"]["input_thresholds"]) == {"0", "1"}
    teal = {r["budget"]: r["ffn_fraction"] for r in rows if r["rule"] == "teal-style"}
    assert teal[0.5] == pytest.approx(0.5, abs=0.1)  # thresholds keep about that share
    from d2d import load

    load(tmp_path / "k")  # the chosen router-free policy routes the loaded model


def sensitivity_of(m, n=256):
    """A Sensitivity of captured inputs (random tokens; no gradients needed here)."""
    from d2d.measure.sensitivity import Sensitivity

    moes = moe_layers(m)
    caps = {}
    for i, lay in moes.items():
        lay.capture = lambda x, h, i=i: caps.setdefault(i, (x.detach().float(), None, None))
    with torch.no_grad():
        m(input_ids=torch.randint(1, 96, (4, n // 4), generator=torch.Generator().manual_seed(0)))
    for lay in moes.values():
        lay.capture = None
    return Sensitivity(moes, caps, {i: None for i in moes}, 0, "router")


def test_split_shares_and_thresholds_by_hand():
    """unit_share: what is left of the budget after gate and up read a share of the input;
    split_thresholds keep those shares of the calibration tokens' input and units."""
    from d2d.measure.sensitivity import split_thresholds, unit_share
    from d2d.stages.calibrate import split_policies

    m = single()
    layer = moe_layers(m)[0]  # gated, d = 32, f = 64: gate and up 2 d f, down d f
    assert unit_share(layer, 0.6, 0.7) == pytest.approx(0.6 * 3 - 2 * 0.7)
    assert unit_share(layer, 0.6, 0.6) == pytest.approx(0.6)
    assert unit_share(layer, 0.5, 0.9) is None  # gate and up alone exceed the budget
    sens = sensitivity_of(m)
    t_in, t_unit = split_thresholds(sens, 0.7, 0.4, weighted=True)
    for i, lay in sens.moes.items():
        x, _, _ = sens.caps[i]
        assert float((x.abs() >= t_in[i]).float().mean()) == pytest.approx(0.7, abs=0.03)
        h = lay.hidden(x * (x.abs() >= t_in[i])) * lay.neuron_weights()
        assert float((h.abs() >= t_unit[i]).float().mean()) == pytest.approx(0.4, abs=0.03)
    pols = split_policies(sens, 0.6, 1)  # the steps above the budget, as far as they fit
    assert [p["input_share"] for p in pols] == pytest.approx([0.6, 0.65, 0.7])
    assert all(p["scores"] == "magnitude" for p in pols)


def test_calibrate_without_routers_needs_a_router_free_rule(model_dirs, tmp_path):
    from d2d.errors import StageOrderError
    from d2d.stages import CalibrateConfig, run_stage

    conv = tmp_path / "c"
    run_stage("convert", model_dirs["gated"], ConvertConfig(expert_size=1), conv)
    with pytest.raises(StageOrderError, match="--layer-rules magnitude"):
        run_stage("calibrate", str(conv), CalibrateConfig(tokens=128, seq_len=32), tmp_path / "k")


@pytest.mark.parametrize("size", [1, 2, 4, 16])
def test_expert_norms_equal_the_norm_of_each_experts_output(size):
    """The Gram-matrix form against the direct one: each expert's down-projected output,
    computed in full, and its L2 norm."""
    from torch import nn

    from d2d.nn.moe import MoEFFN

    torch.manual_seed(size)
    m = MoEFFN(24, 64 // size, size, nn.SiLU(), True, False, False)
    nn.init.normal_(m.w_out)
    h = torch.randn(37, 64)
    want = torch.stack(
        [
            (h[:, e * size : (e + 1) * size] @ m.w_out[e * size : (e + 1) * size]).norm(dim=-1)
            for e in range(64 // size)
        ],
        dim=1,
    )
    with torch.no_grad():
        torch.testing.assert_close(m.expert_norms(h, chunk=10), want, rtol=1e-5, atol=1e-5)


def test_no_router_oracle_table_without_both():
    """The router/oracle savings table is left out when either side was not measured (router-
    free comparisons would show 0% against 0%), and filled when both were."""
    from d2d.stages.evaluation import savings_ratio

    def row(scores, frac, drop):
        return {"scores": scores, "rule": "x", "ffn_fraction": frac, "drop": drop}

    peers = [row("activation", 0.6, 0.15), row("gate", 0.6, 0.8)]
    assert savings_ratio(peers) == {}
    both = peers + [row("router", 0.8, 0.05), row("oracle", 0.6, 0.05)]
    got = savings_ratio(both)["5%"]
    assert got["router_savings"] == pytest.approx(0.2)
    assert got["oracle_savings"] == pytest.approx(0.4)
    assert got["ratio"] == pytest.approx(0.5)


def test_savings_ratio_of_each_rule():
    """Per rule, the routers' savings against the oracle's with the same rule; the pooled
    figure takes the best rule on each side."""
    from d2d.stages.evaluation import savings_ratio

    def row(scores, rule, frac, drop):
        return {"scores": scores, "rule": rule, "ffn_fraction": frac, "drop": drop}

    rows = [
        row("router", "tau", 0.9, 0.02), row("oracle", "tau", 0.5, 0.02),
        row("router", "topk", 0.7, 0.02), row("oracle", "topk", 0.6, 0.02),
        row("activation", "teal", 0.6, 0.02),
    ]  # fmt: skip
    tau, topk = savings_ratio(rows, "tau")["5%"], savings_ratio(rows, "topk")["5%"]
    assert tau["ratio"] == pytest.approx(0.1 / 0.5) and topk["ratio"] == pytest.approx(0.3 / 0.4)
    pooled = savings_ratio(rows)["5%"]
    assert pooled["router_savings"] == pytest.approx(0.3)
    assert pooled["oracle_savings"] == pytest.approx(0.5)
    assert savings_ratio(rows, "teal") == {}  # no router or oracle row for it


def test_layer_errors_by_hand(tokenizer, text_dir):
    """eval --layer-errors: each converted layer's routed output against every expert on the
    same input; zero with every expert, and for the first layer (whose input no routing
    changes) the hand computation."""
    from d2d.measure.evaluate import Evaluator

    m = tiny("gated", vocab=tokenizer.vocab_size)
    convert(m, ConvertConfig(expert_size=4))
    ev = Evaluator(m, tokenizer, data=text_dir, split="heldout", seq_len=16, tokens=64, bf16=False)
    pol = {"rule": "tau", "tau": 0.5, "scores": "oracle"}
    assert all(v == 0.0 for v in ev.layer_errors(m, {"rule": "all"}).values())
    got = ev.layer_errors(m, pol)
    assert set(got) == {"0", "1"} and got["1"] > 0
    layer = moe_layers(m)[0]
    xs = []
    h = layer.register_forward_pre_hook(lambda mod, a: xs.append(a[0].reshape(-1, 32)))
    with torch.no_grad():
        for b in ev.batches:
            m(input_ids=b["input_ids"])
    h.remove()
    x = torch.cat(xs)
    with torch.no_grad(), routing(m, pol):
        y = layer(x)
        full = layer.down(layer.hidden(x))
    want = float((y - full).pow(2).sum() / full.pow(2).sum())
    assert got["0"] == pytest.approx(want, rel=1e-4) and want > 0


def test_divergence_by_hand(tokenizer, text_dir):
    """Evaluator.divergence: 0 with every expert; under a routing, the KL divergence of each
    position's next-token distribution from the dense model's, summed, by hand; refused for a
    bare encoder (no output distribution)."""
    from d2d.errors import D2DError
    from d2d.measure.evaluate import Evaluator
    from d2d.nn.policy import ALL

    m = tiny("gated", vocab=tokenizer.vocab_size)
    convert(m, ConvertConfig(expert_size=1))
    ev = Evaluator(m, tokenizer, data=text_dir, split="heldout", seq_len=16, tokens=64, bf16=False)
    assert ev.divergence(m, ALL) == pytest.approx(0.0, abs=1e-6)
    pol = {"rule": "threshold", "scores": "magnitude", "thresholds": {"1": 1e9}}  # top unit only
    with torch.no_grad():
        ref = [F.log_softmax(m(input_ids=b["input_ids"]).logits, -1) for b in ev.batches]
        with routing(m, pol):
            got = [F.log_softmax(m(input_ids=b["input_ids"]).logits, -1) for b in ev.batches]
    want = sum(float((r.exp() * (r - g)).sum()) for r, g in zip(ref, got, strict=True))
    assert want > 0 and ev.divergence(m, pol) == pytest.approx(want, rel=1e-4)
    ev.task = "encoder"
    with pytest.raises(D2DError, match="output logits"):
        ev.divergence(m, pol)


def test_measured_split_table_routes_one_layer_at_a_time_and_allocates_by_cost():
    """Each measured point routes one layer alone at the split of its level; the table starts
    at every unit for free; the allocation gives the costlier layer the larger share."""
    from d2d.measure.sensitivity import allocate, split_thresholds, unit_share
    from d2d.stages.calibrate import SPLIT_LEVELS, SPLIT_STEP, measured_split_table

    m = single()
    sens = sensitivity_of(m)
    seen = []

    def cost(pol):
        seen.append(pol)
        (layer,) = pol["thresholds"]  # one layer routed
        assert set(pol["input_thresholds"]) == {layer}
        return (10.0 if layer == "0" else 1.0) * pol["thresholds"][layer]

    table = measured_split_table(sens, cost, 1)
    assert len(seen) == len(SPLIT_LEVELS) * 2
    assert all(p["dense_positions"] == 1 for p in seen)
    for fr, c, params in table.values():
        assert list(fr) == [1.0, *SPLIT_LEVELS] and c[0] == 0.0 and params[0] == (0.0, 0.0)
        assert all(np.diff(c) >= 0)
    b = SPLIT_LEVELS[2]  # the thresholds of one level: the uniform split's
    keep = b + SPLIT_STEP
    units = {i: unit_share(lay, b, keep) for i, lay in sens.moes.items()}
    t_in, t_unit = split_thresholds(sens, keep, units, weighted=True)
    assert table[0][2][3] == pytest.approx((t_in[0], t_unit[0]))
    got = allocate(table, 0.6)
    level = {i: table[i][0][table[i][2].index(got[i])] for i in got}
    assert level[0] > level[1] and (level[0] + level[1]) / 2 <= 0.6
