"""attention-mlp: projections replaced by ReLU MLPs; exact start, training, replay, FLOPs."""

import pytest
import torch
from tiny import decode_step, outputs, tiny

from d2d import load_artifact
from d2d.errors import D2DError
from d2d.measure.flops import _attention_macs, converted_flops, dense_flops
from d2d.nn.projection import ProjectionMLP, projection_mlps, replace_projections
from d2d.stages import AttentionMLPConfig, open_input, run_stage

FAMILIES = {"gated": ["q", "k", "v", "o"], "gpt2": ["qkv", "o"], "bert": ["q", "k", "v", "o"]}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mlps_started_from_the_projections_equal_the_dense_model(family):
    """Width >= 2 x the output: relu(z) - relu(-z) = z makes each MLP its projection exactly;
    GPT-2's fused qkv and the grouped-query k/v (narrower than q) included."""
    model = tiny(family)
    ids = torch.randint(1, 90, (2, 10))
    ref = outputs(model, ids)
    names = FAMILIES[family]
    d_out = {"q": 32, "k": 16, "v": 16, "o": 32, "qkv": 96}
    if family != "gated":
        d_out.update(k=32, v=32)
    made = replace_projections(model, [0, 1], names, {n: 2 * d_out[n] + 3 for n in names})
    for (_, name), (mlp, w, b) in made.items():
        assert mlp.fc2.out_features == w.shape[0] == d_out[name]
        mlp.start_from(w, b)
    assert len(projection_mlps(model)) == 2 * len(names)
    torch.testing.assert_close(outputs(model, ids), ref, rtol=1e-4, atol=1e-5)
    # and each MLP's hidden activations are at least half zeros (one of each pair)
    x = torch.randn(7, 32)
    mlp = made[(0, "o")][0]
    assert float((mlp.hidden(x)[:, : 2 * 32] == 0).float().mean()) >= 0.5


def test_a_narrow_mlp_starts_as_the_best_low_rank_projection():
    """2r neurons: the rank-r truncated SVD of W (Eckart-Young), exact when W's rank is at most
    r; the bias carried over."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(24, 32, generator=g), torch.randn(24, generator=g)
    x = torch.randn(50, 32, generator=g)
    mlp = ProjectionMLP(32, 21, 24)  # r = 10, one neuron out
    mlp.start_from(w, b)
    u, s, vh = torch.linalg.svd(w)
    want = x @ (u[:, :10] * s[:10] @ vh[:10]).t() + b
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), want, rtol=1e-4, atol=1e-4)
    low = torch.randn(24, 4, generator=g) @ torch.randn(4, 32, generator=g)  # rank 4
    mlp = ProjectionMLP(32, 8, 24)
    mlp.start_from(low, None)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), x @ low.t(), rtol=1e-4, atol=1e-4)


def test_narrow_mlps_learn_their_projection(model_dirs, text_dir, tmp_path):
    """Narrower than 2x the output the MLP starts as a low-rank approximation of its
    projection: training lowers its error from there."""
    cfg = AttentionMLPConfig(
        data=text_dir,
        tokens=2048,
        heldout_tokens=512,
        eval_tokens=256,
        seq_len=32,
        width=1.0,
        steps=150,
        lr=3e-3,
        bf16=False,
        projections="q,o",
        layers="0",
    )
    trained = open_input(model_dirs["gated"])
    rec = run_stage("attention-mlp", trained, cfg, tmp_path / "a")
    m = rec["metrics"]
    hist = m["history"][-1]
    assert set(m["per_projection"]) == {"0_q", "0_o"}
    for k, v in m["per_projection"].items():
        assert 0 < v["start_error"] < 1.0, (k, v)  # rank d_out / 2 of d_out: part of W
        assert v["rel_error"] < v["start_error"], (k, v)  # training lowered it
        assert hist[f"err_{k}"] < 0.5
    art = load_artifact(tmp_path / "a")
    ids = torch.randint(1, 90, (2, 9))
    # saved and loaded (replayed structure, strict weights): the same function as trained
    torch.testing.assert_close(outputs(art.model, ids), outputs(trained.model, ids))
    mlps = projection_mlps(art.model)
    assert set(mlps) == {(0, "q"), (0, "o")} and mlps[(0, "q")].fc1.out_features == 32
    # the loaded model computes what was saved, and generates with the KV cache
    ids = torch.randint(1, 90, (1, 6))
    with torch.no_grad():
        full = art.model(input_ids=ids).logits
        out = art.model(input_ids=ids[:, :4], use_cache=True)
        step = decode_step(art.model, ids[:, 4:5], out)
    torch.testing.assert_close(step.logits[:, -1], full[:, 4], rtol=1e-4, atol=1e-5)
    gen = art.model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 10)


def test_exact_start_with_a_penalty_keeps_the_error_small_and_sparsifies(
    model_dirs, text_dir, tmp_path
):
    cfg = AttentionMLPConfig(
        data=text_dir,
        tokens=1024,
        heldout_tokens=256,
        eval_tokens=256,
        seq_len=32,
        width=2.0,
        steps=30,
        lr=1e-3,
        weight=0.05,
        bf16=False,
    )
    rec = run_stage("attention-mlp", model_dirs["bert-cls"], cfg, tmp_path / "a")
    m = rec["metrics"]
    assert len(m["per_projection"]) == 8  # 2 layers x q, k, v, o
    # the exact start has half its activations at zero; the penalty adds more at a small error
    assert m["mean_rel_error"] < 0.25 and m["mean_zeros"] > 0.5
    assert abs(m["quality_after"] - m["quality_before"]) <= 0.5
    with pytest.raises(D2DError, match="already MLPs"):
        run_stage("attention-mlp", str(tmp_path / "a"), cfg, tmp_path / "b")


def test_flops_of_replaced_projections_by_hand():
    model = tiny("gated")
    dense = dense_flops(model, 16, True)
    proj, scores = _attention_macs(model, 16, True)
    hidden = {"q": 80, "o": 70}
    made = replace_projections(model, [1], ["q", "o"], hidden)
    got = converted_flops(model, 16, True, {})
    # q: 32 -> 80 -> 32 instead of 32 x 32; o: 32 -> 70 -> 32 instead of 32 x 32
    extra = (32 * 80 + 80 * 32 - 32 * 32) + (32 * 70 + 70 * 32 - 32 * 32)
    assert got.attention == pytest.approx(dense.attention + 2.0 * extra)
    assert isinstance(made[(1, "q")][0], ProjectionMLP)
    assert 2.0 * 2 * (proj + scores) == pytest.approx(dense.attention)


def test_unknown_projection_and_bad_width_are_refused(model_dirs, tmp_path):
    with pytest.raises(D2DError, match="unknown projection 'qkv'"):
        run_stage(
            "attention-mlp",
            model_dirs["gated"],
            AttentionMLPConfig(projections="qkv", steps=1),
            tmp_path / "a",
        )
    assert not (tmp_path / "a").exists()
    with pytest.raises(D2DError, match="width"):
        AttentionMLPConfig(width=0)


def test_an_unsupported_attention_layout_is_refused_in_one_line(model_dirs, tmp_path):
    """A block whose q projection is not a separate linear layer (here: fused away) is refused
    with a clear error before anything is trained or written."""
    from torch import nn

    art = open_input(model_dirs["gated"])
    art.model.model.layers[1].self_attn.q_proj = nn.Identity()
    with pytest.raises(D2DError, match="unsupported attention layout: block 1 has no linear q"):
        run_stage("attention-mlp", art, AttentionMLPConfig(steps=1), tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_sparsify_penalises_the_projection_mlps(model_dirs, text_dir, tmp_path):
    """--projection-weight puts the same penalty on the projection MLPs' activations: at equal
    steps their zeros rise above the run without it; a model without such MLPs is refused."""
    from d2d.stages import SparsifyConfig

    amlp = AttentionMLPConfig(
        data=text_dir, tokens=512, heldout_tokens=128, eval_tokens=128, seq_len=32,
        width=2.0, steps=2, bf16=False,
    )  # fmt: skip
    run_stage("attention-mlp", model_dirs["gated"], amlp, tmp_path / "a")
    fast = dict(data=text_dir, seq_len=32, eval_tokens=128, bf16=False, batch_size=4, lr=3e-3)
    zeros = {}
    for pw in (0.0, 1.0):
        cfg = SparsifyConfig(steps=30, weight=0.0, projection_weight=pw, **fast)
        rec = run_stage("sparsify", str(tmp_path / "a"), cfg, tmp_path / f"s{pw}")
        hist = rec["metrics"]["history"]
        if pw:
            zeros[pw] = sum(h["projection_zeros"] for h in hist[-5:]) / 5
            assert all("projection_penalty" in h for h in hist)
        else:
            assert all("projection_penalty" not in h for h in hist)
    with torch.no_grad():  # the unpenalised run's MLPs, measured the same way
        art = load_artifact(tmp_path / "s0.0")
        from d2d.nn.projection import tapped_projections

        with tapped_projections(art.model) as acts:
            art.model(input_ids=torch.randint(1, 96, (4, 32)))
        zeros[0.0] = float(torch.cat([a.reshape(-1) for a in acts]).eq(0).float().mean())
    assert zeros[1.0] > zeros[0.0] + 0.05
    with pytest.raises(D2DError, match="--projection-weight needs attention projections"):
        cfg = SparsifyConfig(steps=1, projection_weight=0.1, **fast)
        run_stage("sparsify", model_dirs["gated"], cfg, tmp_path / "x")
