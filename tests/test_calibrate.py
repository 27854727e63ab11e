import numpy as np
import pytest
from tiny import tiny

from d2d.errors import D2DError
from d2d.measure.sensitivity import allocate
from d2d.nn.policy import RULES
from d2d.options import parse_taus
from d2d.stages import CalibrateConfig
from d2d.stages.calibrate import choose

LAYER_GRID = np.array(RULES["tau"].grid(None))  # per-layer tau grid


def test_parse_taus():
    assert parse_taus("0.1,0,0.1,1") == [0.0, 0.1, 1.0]
    for bad in ("1.5", "x", "", "-0.1"):
        with pytest.raises(D2DError):
            parse_taus(bad)


def test_config_validation():
    with pytest.raises(D2DError, match="not both"):
        CalibrateConfig(target_flops=0.5, max_quality_drop=0.01)
    with pytest.raises(D2DError, match="target-flops"):
        CalibrateConfig(target_flops=1.5)


def _table():
    # layer 0 is cheap to sparsify, layer 1 expensive
    fr = np.linspace(1.0, 0.1, len(LAYER_GRID))
    return {
        0: (fr, np.linspace(0, 1, len(LAYER_GRID)) ** 2, list(LAYER_GRID)),
        1: (fr, 100 * np.linspace(0, 1, len(LAYER_GRID)) ** 2, list(LAYER_GRID)),
    }


@pytest.mark.parametrize("budget", [0.9, 0.7, 0.5])
def test_allocation_meets_budget_and_spends_where_cheap(budget):
    t = _table()
    taus = allocate(t, budget)
    idx = {i: int(np.where(LAYER_GRID == taus[i])[0][0]) for i in taus}
    assert np.mean([t[i][0][idx[i]] for i in t]) <= budget + 1e-9
    assert taus[0] >= taus[1]


def test_choose_by_target_and_by_drop():
    rows = [
        {"ffn_fraction": 1.0, "drop": 0.0},
        {"ffn_fraction": 0.8, "drop": 0.01},
        {"ffn_fraction": 0.6, "drop": 0.05},
        {"ffn_fraction": 0.62, "drop": 0.03},
    ]
    assert choose(rows, CalibrateConfig(target_flops=0.62)) == 3
    assert choose(rows, CalibrateConfig(max_quality_drop=0.02)) == 1
    assert choose(rows, CalibrateConfig()) == 1  # default: 2%
    with pytest.raises(D2DError, match="reaches"):
        choose(rows, CalibrateConfig(target_flops=0.3))


def test_choose_skips_points_that_pass_between_failing_neighbours():
    """A noisy calibration curve: a cheap point within the drop after denser points of the same
    rule failed it is not chosen; the last point before the first failure is."""
    rows = [
        {"rule": "dense", "ffn_fraction": 1.0, "drop": 0.0},
        {"rule": "global tau 0.05", "ffn_fraction": 0.4, "drop": 0.005},
        {"rule": "global tau 0.1", "ffn_fraction": 0.27, "drop": 0.01},
        {"rule": "global tau 0.15", "ffn_fraction": 0.2, "drop": 0.015},
        {"rule": "global tau 0.5", "ffn_fraction": 0.065, "drop": 0.005},
        {"rule": "per-layer tau @30%", "ffn_fraction": 0.3, "drop": 0.0},
        {"rule": "per-layer tau @20%", "ffn_fraction": 0.22, "drop": 0.005},
    ]
    assert choose(rows, CalibrateConfig(max_quality_drop=0.01)) == 6
    rows[6]["drop"] = 0.02  # now the per-layer rule fails at 20%: global tau 0.1 it is
    assert choose(rows, CalibrateConfig(max_quality_drop=0.01)) == 2


def test_paired_drop_against_hand_computation():
    import torch

    from d2d.measure.evaluate import paired_drop

    label = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    dense = torch.tensor([0, 1, 2, 0, 1, 2, 0, 2])  # 7 of 8 right
    pred = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])  # loses 2 and 5, gains 7: 6 of 8 right
    changed, broken, se = paired_drop(pred, dense, label)
    assert changed == 3 / 8
    assert broken == pytest.approx((2 / 8) / (7 / 8))  # 2 of the dense model's 7 right answers
    # per example dense-correct minus correct: 0 0 1 0 0 1 0 -1; mean 1/8, mean of squares 3/8
    var = 3 / 8 - (1 / 8) ** 2
    assert se == pytest.approx((var / 8) ** 0.5 / (7 / 8))
    assert paired_drop(dense, dense, label) == (0.0, 0.0, 0.0)


def test_choose_does_not_let_gains_pay_for_broken_answers():
    """A classifier's point whose net drop passes because it gained on examples the dense model
    got wrong, while it broke more right answers than the limit allows, is not taken; with
    --count-gains the net drop decides."""
    rows = [
        {"rule": "dense", "ffn_fraction": 1.0, "drop": 0.0, "broken": 0.0},
        {"rule": "global tau 0.05", "ffn_fraction": 0.4, "drop": -0.005, "broken": 0.005},
        {"rule": "global tau 0.1", "ffn_fraction": 0.2, "drop": 0.0, "broken": 0.015},
    ]
    assert choose(rows, CalibrateConfig(max_quality_drop=0.01)) == 1
    assert choose(rows, CalibrateConfig(max_quality_drop=0.01, count_gains=True)) == 2
    assert choose(rows, CalibrateConfig(max_quality_drop=0.02)) == 2


def test_evaluator_pairs_a_classifier_with_its_dense_predictions():
    """The evaluator counts changed predictions against the same model with every expert, and
    the dense model itself has none."""
    import torch

    from d2d.measure.evaluate import Evaluator, forward, paired_drop
    from d2d.nn.policy import ALL
    from d2d.nn.routing import routing
    from d2d.stages import ConvertConfig, convert

    m = tiny("bert-cls", seed=0)
    convert(m, ConvertConfig(n_experts=8))
    torch.manual_seed(1)
    ev = Evaluator.__new__(Evaluator)  # batches made here: no corpus or tokenizer needed
    ev.task, ev.metric, ev.bf16, ev.seq_len = "classification", "accuracy", False, 12
    ev._reference, ev._dense_pred = None, None
    ev.batches = [
        {
            "input_ids": torch.randint(1, 96, (16, 12)),
            "attention_mask": torch.ones(16, 12, dtype=torch.long),
            "labels_": torch.randint(0, 3, (16,)),
        }
        for _ in range(3)
    ]
    ev.tokens = 3 * 16 * 12
    dense = ev.measure(m, ALL)
    assert dense.changed == 0.0 and dense.broken == 0.0 and dense.drop_se == 0.0
    pol = {"rule": "topk", "fraction": 0.125, "scores": "oracle"}
    got = ev.measure(m, pol)
    with routing(m, pol):
        pred = torch.cat([forward(m, b, False).logits.argmax(-1) for b in ev.batches])
    label = torch.cat([b["labels_"] for b in ev.batches])
    assert got.changed > 0  # one expert of eight changes some of 48 predictions
    assert (got.changed, got.broken, got.drop_se) == paired_drop(
        pred, ev.dense_predictions(m), label
    )


def test_batches_shrink_with_a_large_vocabulary():
    """Logits (and calibration's softmax and gradient of them) grow with the vocabulary: a
    262k-token vocabulary evaluates 512 tokens a batch, SmolLM2's 49k the usual 2,048."""
    from d2d.measure.evaluate import LOGIT_ENTRIES, TOKENS_PER_BATCH, tokens_per_batch

    def lm(vocab):
        return tiny("gated", vocab=vocab)

    assert tokens_per_batch(lm(262_144)) == LOGIT_ENTRIES // 262_144 == 512
    assert tokens_per_batch(lm(49_152)) == TOKENS_PER_BATCH == 2048
    assert tokens_per_batch(tiny("bert-cls")) == TOKENS_PER_BATCH


@pytest.mark.parametrize("family", ["gated", "bert"])
def test_sensitivity_passes_split_does_not_change_it(family):
    """Cutting batches into passes of fewer tokens (less backward memory) captures the same
    inputs and output gradients: the Fisher samples are drawn per sequence."""
    from types import SimpleNamespace

    import torch

    from d2d.measure.sensitivity import layer_sensitivity
    from d2d.models import task_of
    from d2d.nn.structure import attach_routers, moe_layers
    from d2d.stages import ConvertConfig
    from d2d.stages.convert import convert

    m = tiny(family)
    convert(m, ConvertConfig(n_experts=8))
    attach_routers(moe_layers(m), 8)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(1, 90, (4, 10), generator=g)
        am = torch.ones_like(ids)
        am[1, :3] = 0
        batches.append({"input_ids": ids, "attention_mask": am})
    ev = SimpleNamespace(task=task_of(m), batches=batches)
    whole = layer_sensitivity(m, ev, 1, 80, seed=3, pass_tokens=1000)
    split = layer_sensitivity(m, ev, 1, 80, seed=3, pass_tokens=10)  # one sequence a pass
    for i in moe_layers(m):
        for a, b in zip(whole.caps[i], split.caps[i], strict=True):
            if a is not None:
                torch.testing.assert_close(a, b)
        torch.testing.assert_close(whole.grads[i], split.grads[i], rtol=1e-4, atol=1e-6)
        assert whole.grads[i].abs().sum() > 0
    # another seed draws other samples
    other = layer_sensitivity(m, ev, 1, 80, seed=4, pass_tokens=1000)
    assert not torch.allclose(other.grads[0], whole.grads[0])
