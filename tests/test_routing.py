import pytest
import torch
from tiny import outputs, tiny

from d2d.errors import D2DError
from d2d.nn.policy import validate
from d2d.nn.routing import collecting, routing
from d2d.nn.structure import attach_routers, moe_layers
from d2d.stages import ConvertConfig, convert


def converted(family="gated", n_experts=8):
    m = tiny(family)
    convert(m, ConvertConfig(n_experts=n_experts))
    attach_routers(moe_layers(m), hidden=16)
    return m


def fraction(model, ids, policy):
    with routing(model, policy), collecting(model) as stats, torch.no_grad():
        model(input_ids=ids)
    return sum(s.executed for s in stats.values()) / sum(s.tokens * 8 for s in stats.values())


@pytest.mark.parametrize("family", ["gated", "gpt2", "bert"])
def test_tau_zero_equals_dense(family):
    dense = tiny(family)
    ids = torch.randint(1, 96, (2, 16))
    ref = outputs(dense, ids)
    m = converted(family)
    with routing(m, {"rule": "tau", "tau": 0.0}):
        torch.testing.assert_close(outputs(m, ids), ref)


@pytest.mark.parametrize("scores", ["router", "oracle"])
def test_flops_fraction_monotonic_in_tau(scores):
    m = converted()
    ids = torch.randint(1, 96, (4, 32))
    fr = [
        fraction(m, ids, {"rule": "tau", "tau": t, "scores": scores})
        for t in (0.0, 0.05, 0.2, 0.5, 0.9, 1.0)
    ]
    assert fr[0] == 1.0
    assert all(a >= b for a, b in zip(fr, fr[1:], strict=False))
    assert fr[-1] < 0.5
    assert fr[-1] >= 1 / 8  # tau = 1 still runs the top expert of each token


def test_topk_runs_exactly_k_experts():
    m = converted()
    ids = torch.randint(1, 96, (2, 8))
    with routing(m, {"rule": "topk", "fraction": 0.25}), collecting(m) as stats:
        with torch.no_grad():
            m(input_ids=ids)
    for s in stats.values():
        assert s.k_hist[2] == s.tokens  # 25% of 8 experts = 2 for every token


def test_dense_positions_run_every_expert_at_the_sink():
    m = converted()
    ids = torch.randint(1, 96, (2, 8))
    with (
        routing(m, {"rule": "topk", "fraction": 0.125, "dense_positions": 1}),
        collecting(m) as stats,
        torch.no_grad(),
    ):
        m(input_ids=ids)
    for s in stats.values():
        assert s.k_hist[8] == 2 and s.k_hist[1] == 14  # position 0 of both sequences


def test_routing_context_restores_previous_policy():
    m = converted()
    with routing(m, {"rule": "tau", "tau": 0.3}):
        assert all(x.policy.value_at(i) == 0.3 for i, x in moe_layers(m).items())
    assert all(x.policy.rule == "all" for x in moe_layers(m).values())


@pytest.mark.parametrize(
    "bad",
    [
        {"rule": "tau", "tau": 1.5},
        {"rule": "tau", "tau": -0.1},
        {"rule": "nope"},
        {"rule": "tau", "taus": {"0": 2.0}},
    ],
)
def test_invalid_policies_are_refused(bad):
    with pytest.raises(D2DError):
        validate(bad)


def test_router_rule_without_routers_is_refused():
    m = tiny("gated")
    convert(m, ConvertConfig(n_experts=8))
    with pytest.raises(D2DError, match="train-routers"):
        with routing(m, {"rule": "tau", "tau": 0.1}):
            pass


def test_padding_is_not_counted():
    m = converted("bert")
    ids = torch.randint(1, 96, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with routing(m, {"rule": "all"}), collecting(m) as stats, torch.no_grad():
        m(input_ids=ids, attention_mask=mask)
    assert all(s.tokens == 15 for s in stats.values())


def test_rule_masks_by_hand():
    from d2d.nn.policy import rule_mask

    s = torch.tensor([[4.0, 1.0, 0.5, 0.0], [0.2, 0.1, 0.3, 0.05]])
    tau = rule_mask("tau", s, 0.25)
    assert tau.tolist() == [[True, True, False, False], [True, True, True, False]]
    top = rule_mask("topk", s, 0.5)  # k = 2 of 4
    assert top.tolist() == [[True, True, False, False], [True, False, True, False]]
    # an absolute threshold: the second token keeps only its best expert
    thr = rule_mask("threshold", s, 0.75)
    assert thr.tolist() == [[True, True, False, False], [False, False, True, False]]


def test_per_layer_policies_apply_per_layer():
    m = converted()
    pol = {"rule": "threshold", "thresholds": {"0": 0.0, "1": 1e9}}
    ids = torch.randint(1, 96, (2, 8))
    with routing(m, pol), collecting(m) as stats, torch.no_grad():
        m(input_ids=ids)
    assert stats[0].fraction(8) == 1.0  # threshold 0 runs everything
    assert stats[1].fraction(8) == 1 / 8  # an unreachable threshold keeps the top expert only


def test_router_cost_counts_only_where_the_router_runs():
    from d2d.measure.flops import converted_ffn_flops, dense_ffn_macs

    m = converted()
    ids = torch.randint(1, 96, (2, 8))
    dense = 2.0 * sum(dense_ffn_macs(m))
    router = 2.0 * moe_layers(m)[1].router.macs()
    for pol in (
        {"rule": "threshold", "thresholds": {"0": 0.0, "1": 0.0}},
        {"rule": "topk", "fractions": {"0": 1.0, "1": 1.0}},
    ):
        with routing(m, pol), collecting(m) as stats, torch.no_grad():
            m(input_ids=ids)
            assert converted_ffn_flops(m, stats) == dense  # nothing skipped, no router run
    with (
        routing(m, {"rule": "threshold", "thresholds": {"0": 0.0, "1": 1e9}}),
        collecting(m) as stats,
        torch.no_grad(),
    ):
        m(input_ids=ids)
        half = dense / 2
        assert converted_ffn_flops(m, stats) == pytest.approx(half + half / 8 + router)
