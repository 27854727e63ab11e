"""sparsify: penalties, the activation swap, the loop (lower penalty, resume), both tasks."""

import json
import math

import pytest
import torch
from torch import nn

from d2d import load_artifact
from d2d.errors import D2DError
from d2d.measure.sparsity import measure_sparsity
from d2d.nn.activations import hoyer, l1, penalty, relufy, sparsity_stats, tapped
from d2d.stages import ConvertConfig, EvalConfig, SparsifyConfig, TrainRoutersConfig, run_stage
from d2d.stages.sparsify import weight_at

FAST = {"seq_len": 32, "eval_tokens": 128, "bf16": False}


def test_hoyer_and_l1_by_hand():
    a = torch.tensor([[3.0, -4.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 2.0]])
    # (3+4)^2 / (9+16) = 49/25; (4)^2/4 = 4; one active neuron: 1
    torch.testing.assert_close(hoyer(a), torch.tensor([49 / 25, 4.0, 1.0]))
    torch.testing.assert_close(l1(a), torch.tensor([7.0, 4.0, 2.0]))


def test_penalty_means_over_real_tokens_then_layers():
    a1 = torch.tensor([[[3.0, -4.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]])  # [B=1, T=2, f=4]
    a2 = torch.tensor([[[0.0, 0.0, 0.0, 2.0], [5.0, 0.0, 0.0, 0.0]]])
    assert penalty([a1, a2], "hoyer").item() == pytest.approx(((49 / 25 + 4) / 2 + 1) / 2)
    mask = torch.tensor([[1, 0]])  # the second token is padding
    assert penalty([a1, a2], "hoyer", mask).item() == pytest.approx((49 / 25 + 1) / 2)
    assert penalty([a1, a2], "l1", mask).item() == pytest.approx((7 + 2) / 2)


def test_weight_schedule():
    assert [weight_at(s, 10, 1.0, "linear", 0.4) for s in range(6)] == [
        0.25,
        0.5,
        0.75,
        1.0,
        1.0,
        1.0,
    ]
    assert weight_at(0, 10, 0.3, "constant", 0.4) == 0.3
    assert weight_at(0, 10, 0.3, "linear", 0.0) == 0.3


def test_sparsity_stats_by_hand():
    a = torch.tensor([[[0.0, 0.005, 1.0, 0.5], [0.0, 0.0, 2.0, 2.0]]])
    ((zero, near, n),) = sparsity_stats([a], torch.tensor([[1, 1]]))
    assert n == 2
    assert zero == pytest.approx(1 / 4 + 2 / 4)
    assert near == pytest.approx(2 / 4 + 2 / 4)


@pytest.mark.parametrize("family", ["gated", "gpt2", "bert"])
def test_relufy_changes_the_activation(family):
    from tiny import outputs, tiny

    from d2d import arch

    model = tiny(family)
    ids = torch.randint(1, 90, (2, 12))
    before = outputs(model, ids)
    relufy(model)
    fam = arch.detect(model)
    assert all(isinstance(arch.get_path(b, fam.act), nn.ReLU) for b in arch.blocks(model, fam))
    assert not torch.allclose(outputs(model, ids), before)
    with tapped(model) as acts:
        outputs(model, ids)
    if family != "gated":  # relu(x): exact zeros; gated: relu(gate) * up, zeros where gate < 0
        assert all(bool((a >= 0).all()) for a in acts)
    assert all(float((a == 0).float().mean()) > 0.2 for a in acts)


def test_sparsify_lm_lowers_the_penalty_and_replays_relu(model_dirs, text_dir, tmp_path):
    cfg = SparsifyConfig(
        data=text_dir, weight=0.05, relu=True, steps=12, batch_size=4, lr=3e-3, **FAST
    )
    rec = run_stage("sparsify", model_dirs["gated"], cfg, tmp_path / "s")
    hist = rec["metrics"]["history"]
    assert len(hist) == 12
    assert hist[-1]["penalty"] < 0.8 * hist[0]["penalty"]
    m = rec["metrics"]
    assert m["task"] == "causal-lm" and m["metric"] == "perplexity"
    assert m["sparsity_after"]["near_zero"] > m["sparsity_before"]["near_zero"]
    assert set(m["sparsity_after"]["layers"]) == {"0", "1"}
    assert math.isfinite(m["quality_after"])
    # the swap is in d2d.json and in config.json; loading replays it
    meta = json.loads((tmp_path / "s" / "d2d.json").read_text())
    assert meta["stages"][0]["structure"]["relu"] is True
    assert json.loads((tmp_path / "s" / "config.json").read_text())["hidden_act"] == "relu"
    art = load_artifact(tmp_path / "s")
    assert isinstance(art.model.model.layers[0].mlp.act_fn, nn.ReLU)
    # no checkpoint folder is left behind after a successful run
    assert not (tmp_path / "s.checkpoints").exists()


def test_penalty_zero_is_a_plain_fine_tune(model_dirs, text_dir, tmp_path):
    cfg = SparsifyConfig(data=text_dir, weight=0.0, steps=3, batch_size=4, lr=1e-3, **FAST)
    rec = run_stage("sparsify", model_dirs["gpt2"], cfg, tmp_path / "s")
    assert all(h["weight"] == 0 for h in rec["metrics"]["history"])
    assert rec["metrics"]["history"][0]["penalty"] > 0  # measured, not applied


def test_classification_adds_a_head_and_chains_into_convert(model_dirs, text_dir, tmp_path):
    cfg = SparsifyConfig(data=text_dir, steps=4, batch_size=4, lr=1e-3, weight=0.01, **FAST)
    rec = run_stage("sparsify", model_dirs["bert"], cfg, tmp_path / "s")
    m = rec["metrics"]
    assert m["task"] == "classification" and m["metric"] == "accuracy" and m["head"] == "new"
    assert 0.0 <= m["quality_after"] <= 1.0
    art = load_artifact(tmp_path / "s")
    assert type(art.model).__name__ == "BertForSequenceClassification"
    assert art.model.config.num_labels == 2
    run_stage("convert", str(tmp_path / "s"), ConvertConfig(n_experts=8), tmp_path / "c")
    routers = TrainRoutersConfig(
        data=text_dir, tokens=256, seq_len=32, steps=5, heldout_tokens=64, hidden=8, bf16=False
    )
    run_stage("train-routers", str(tmp_path / "c"), routers, tmp_path / "r")
    ev = run_stage("eval", str(tmp_path / "r"), EvalConfig(data=text_dir, tau=0.0, **_ev()))
    assert ev["metrics"]["rows"][0]["metric"] == "accuracy"
    assert ev["metrics"]["rows"][1]["quality"] == pytest.approx(m["quality_after"], abs=0.1)
    # tau 0 runs every expert: no prediction changes against the dense model
    assert ev["metrics"]["rows"][1]["changed"] == ev["metrics"]["rows"][1]["broken"] == 0.0
    with pytest.raises(D2DError, match="before convert"):
        run_stage("sparsify", str(tmp_path / "c"), cfg, tmp_path / "again")


def _ev():
    return {"seq_len": 32, "tokens": 128, "bf16": False}


def test_classification_needs_labels(model_dirs, tmp_path):
    (tmp_path / "plain.txt").write_text("some words without any label " * 50)
    cfg = SparsifyConfig(data=str(tmp_path / "plain.txt"), steps=1, batch_size=2, **FAST)
    with pytest.raises(D2DError, match="no labels"):
        run_stage("sparsify", model_dirs["bert"], cfg, tmp_path / "s")
    assert not (tmp_path / "s").exists()
    with pytest.raises(D2DError, match="causal language model"):
        run_stage(
            "sparsify",
            model_dirs["bert"],
            SparsifyConfig(data=str(tmp_path / "plain.txt"), task="causal-lm", **FAST),
            tmp_path / "s",
        )


def test_resume_continues_to_the_same_result(model_dirs, text_dir, tmp_path):
    """Interrupted after step 4 (checkpoint at 3), resumed: same weights and history as an
    uninterrupted run. BERT has dropout, so the RNG state must be restored too."""
    base = dict(data=text_dir, steps=6, batch_size=4, lr=1e-3, weight=0.01, **FAST)
    full = run_stage("sparsify", model_dirs["bert"], SparsifyConfig(**base), tmp_path / "full")

    def interrupt(task, done, total, **info):
        if task == "sparsify" and done == 4:
            raise KeyboardInterrupt

    ck = str(tmp_path / "ck")
    cfg = SparsifyConfig(**base, checkpoint_every=3, checkpoint_dir=ck)
    with pytest.raises(KeyboardInterrupt):
        run_stage("sparsify", model_dirs["bert"], cfg, tmp_path / "part", progress=interrupt)
    assert not (tmp_path / "part").exists()
    assert (tmp_path / "ck" / "step-3" / "state.json").is_file()
    cfg = SparsifyConfig(**base, checkpoint_every=3, checkpoint_dir=ck, resume=True)
    res = run_stage("sparsify", model_dirs["bert"], cfg, tmp_path / "part")
    assert res["metrics"]["resumed_from"] == 3
    for a, b in zip(full["metrics"]["history"], res["metrics"]["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    sa = load_artifact(tmp_path / "full").model.state_dict()
    sb = load_artifact(tmp_path / "part").model.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)


def test_resume_refuses_another_configuration(model_dirs, text_dir, tmp_path):
    base = dict(data=text_dir, steps=4, batch_size=4, lr=1e-3, **FAST)
    ck = str(tmp_path / "ck")

    def interrupt(task, done, total, **info):
        if task == "sparsify" and done == 3:
            raise KeyboardInterrupt

    cfg = SparsifyConfig(**base, checkpoint_every=2, checkpoint_dir=ck)
    with pytest.raises(KeyboardInterrupt):
        run_stage("sparsify", model_dirs["gpt2"], cfg, tmp_path / "s", progress=interrupt)
    other = SparsifyConfig(**{**base, "lr": 2e-3}, checkpoint_dir=ck, resume=True)
    with pytest.raises(D2DError, match="different configuration"):
        run_stage("sparsify", model_dirs["gpt2"], other, tmp_path / "s")
    with pytest.raises(D2DError, match="no checkpoint"):
        run_stage(
            "sparsify",
            model_dirs["gpt2"],
            SparsifyConfig(**base, checkpoint_dir=str(tmp_path / "none"), resume=True),
            tmp_path / "s",
        )


def test_measure_sparsity_reports_every_layer(model_dirs):
    from tiny import tiny

    model = tiny("bert")
    relufy(model)
    batches = [{"input_ids": torch.randint(1, 90, (2, 16)), "attention_mask": torch.ones(2, 16)}]
    sp = measure_sparsity(model, batches, bf16=False)
    assert set(sp) == {"0", "1"}
    assert all(0 < v["zero"] <= v["near_zero"] <= 1 for v in sp.values())


def test_neuron_oracle_keeps_the_largest_activations():
    from tiny import outputs, tiny

    from d2d.nn.activations import neuron_oracle

    model = tiny("gpt2")
    ids = torch.randint(1, 90, (2, 12))
    dense = outputs(model, ids)
    with neuron_oracle(model, 1.0):
        torch.testing.assert_close(outputs(model, ids), dense)
    with neuron_oracle(model, 0.25), tapped(model) as acts:
        half = outputs(model, ids)
    assert not torch.allclose(half, dense)
    # the tap, registered after the oracle, sees what the down projection receives:
    # a quarter of the 128 neurons of each token
    assert len(acts) == 2
    assert all(int((a != 0).sum(-1).max()) == 32 for a in acts)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"decay": "step"}, "decay must be one of"),
        ({"batch_size": 5, "grad_accum": 2}, "not a multiple of grad-accum"),
        ({"warmup": 1.0}, "warmup is a fraction"),
        ({"weight_warmup": 1.5}, "weight-warmup"),
        ({"penalty": "l2"}, "penalty must be one of"),
        ({"penalty_on": "up"}, "penalty-on must be one of|penalty_on must be one of"),
        ({"distill_weight": -1.0}, "distill"),
    ],
)
def test_bad_options_are_refused_when_the_config_is_built(bad, match):
    with pytest.raises(D2DError, match=match):
        SparsifyConfig(**bad)


def test_distill_kl_by_hand():
    from d2d.train import distill_kl

    # two positions over a 3-word vocabulary
    s = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    t = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])

    def kl(p_logits, q_logits):
        p = [math.exp(v) for v in p_logits]
        p = [v / sum(p) for v in p]
        q = [math.exp(v) for v in q_logits]
        q = [v / sum(q) for v in q]
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))

    k0, k1 = kl(t[0].tolist(), s[0].tolist()), kl(t[1].tolist(), s[1].tolist())
    assert distill_kl(s, t).item() == pytest.approx((k0 + k1) / 2, rel=1e-5)
    assert distill_kl(s, t, torch.tensor([1, 0])).item() == pytest.approx(k0, rel=1e-5)
    assert distill_kl(t, t).item() == pytest.approx(0.0, abs=1e-6)
    # the teacher carries no gradient; the student does
    s = s.clone().requires_grad_(True)
    tt = t.clone().requires_grad_(True)
    distill_kl(s, tt).backward()
    assert tt.grad is None and s.grad is not None and s.grad.abs().sum() > 0


def test_gate_target_taps_the_gate_activation():
    from tiny import outputs, tiny

    from d2d import arch

    model = tiny("gated")
    ids = torch.randint(1, 90, (2, 12))
    fam = arch.detect(model)
    block = arch.blocks(model, fam)[0]
    x = []
    h = block.mlp.register_forward_pre_hook(lambda m, a: x.append(a[0]))
    with tapped(model, "gate") as gates, tapped(model) as hidden:
        outputs(model, ids)
    h.remove()
    mlp = block.mlp
    want = mlp.act_fn(mlp.gate_proj(x[0]))
    assert len(gates) == len(hidden) == 2
    torch.testing.assert_close(gates[0], want)
    torch.testing.assert_close(hidden[0], want * mlp.up_proj(x[0]))
    model = tiny("gpt2")  # not gated: the activation's output is the down projection's input
    with tapped(model, "gate") as gates, tapped(model) as hidden:
        outputs(model, ids)
    for g, hh in zip(gates, hidden, strict=True):
        torch.testing.assert_close(g, hh)


def test_distill_keeps_the_student_closer_to_its_teacher(model_dirs, text_dir, tmp_path):
    """A strong penalty with and without the KL to the input model, same steps and data: with
    it, the fine-tuned model's outputs stay closer to the input model's."""
    from tiny import outputs

    base = dict(data=text_dir, weight=0.5, steps=8, batch_size=4, lr=3e-3, **FAST)
    plain = run_stage("sparsify", model_dirs["gated"], SparsifyConfig(**base), tmp_path / "p")
    cfg = SparsifyConfig(**base, distill=True, distill_weight=5.0, penalty_on="gate")
    dist = run_stage("sparsify", model_dirs["gated"], cfg, tmp_path / "d")
    hist = dist["metrics"]["history"]
    assert all("kl" in h for h in hist) and "kl" not in plain["metrics"]["history"][0]
    assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first step starts at the teacher
    ids = torch.randint(1, 90, (4, 24))
    from d2d.models import load_base

    teacher = outputs(load_base(model_dirs["gated"]).model, ids).log_softmax(-1)

    def kl_to_teacher(folder):
        s = outputs(load_artifact(folder).model, ids).log_softmax(-1)
        return float((teacher.exp() * (teacher - s)).sum(-1).mean())

    assert kl_to_teacher(tmp_path / "d") < kl_to_teacher(tmp_path / "p")


def test_distill_refuses_a_new_head(model_dirs, text_dir, tmp_path):
    cfg = SparsifyConfig(data=text_dir, steps=1, batch_size=2, distill=True, **FAST)
    with pytest.raises(D2DError, match="--distill needs"):
        run_stage("sparsify", model_dirs["bert"], cfg, tmp_path / "s")
    assert not (tmp_path / "s").exists()
