import numpy as np
import pytest
import torch
from tiny import outputs, tiny

from d2d.cluster import balanced_kmeans
from d2d.errors import D2DError
from d2d.nn.routing import routing
from d2d.nn.structure import moe_layers
from d2d.options import parse_layers
from d2d.stages import ConvertConfig, convert

FAMILIES = ["gated", "gpt2", "bert", "bert-cls"]


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_equals_dense(family):
    model = tiny(family)
    ids = torch.randint(1, 96, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    ref = outputs(model, ids, attention_mask=mask)
    info = convert(model, ConvertConfig(n_experts=8))
    assert info["n_experts"] == 8 and len(moe_layers(model)) == 2
    torch.testing.assert_close(outputs(model, ids, attention_mask=mask), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_change_the_function_when_skipped(family):
    # a check that can fail: running half the experts must differ from dense
    model = tiny(family)
    ids = torch.randint(1, 96, (2, 10))
    ref = outputs(model, ids)
    convert(model, ConvertConfig(n_experts=8))
    with routing(model, {"rule": "topk", "fraction": 0.5, "scores": "oracle"}):
        out = outputs(model, ids)
    assert not torch.allclose(out, ref, atol=1e-4)


def test_layer_subset_and_expert_size():
    model = tiny("gated")
    info = convert(model, ConvertConfig(expert_size=16, layers="1"))
    assert info == {"layers": [1], "n_experts": 4, "expert_size": 16}
    assert list(moe_layers(model)) == [1]


def test_bad_expert_count_is_a_clear_error():
    with pytest.raises(D2DError, match="do not divide the FFN width 64"):
        convert(tiny("gated"), ConvertConfig(n_experts=7))
    with pytest.raises(D2DError, match="does not divide"):
        convert(tiny("gated"), ConvertConfig(expert_size=5))


def test_refuses_to_convert_twice():
    model = tiny("gated")
    convert(model, ConvertConfig(n_experts=4))
    with pytest.raises(D2DError, match="already converted"):
        convert(model, ConvertConfig(n_experts=4))


def test_parse_layers():
    assert parse_layers("all", 3) == [0, 1, 2]
    assert parse_layers("0-2,5", 6) == [0, 1, 2, 5]
    with pytest.raises(D2DError, match="does not exist"):
        parse_layers("7", 4)
    with pytest.raises(D2DError, match="bad layer list"):
        parse_layers("a-b", 4)


def test_unsupported_architecture_names_supported_ones():
    from transformers import T5Config, T5Model

    from d2d import arch

    m = T5Model(T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    with pytest.raises(D2DError, match="unsupported architecture 't5'.*gated"):
        arch.detect(m)


def test_balanced_kmeans_equal_sizes_and_groups_similar_points():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 8)) * 10
    pts = np.concatenate([c + rng.normal(size=(16, 8)) for c in centers])
    labels = balanced_kmeans(pts, 4, seed=0)
    assert np.bincount(labels).tolist() == [16, 16, 16, 16]
    # each true group lands in one cluster
    for g in range(4):
        assert len(set(labels[g * 16 : (g + 1) * 16])) == 1


def test_balanced_kmeans_greedy_path_is_balanced():
    pts = np.random.default_rng(1).normal(size=(120, 5))
    labels = balanced_kmeans(pts, 6, exact_limit=10)
    assert np.bincount(labels).tolist() == [20] * 6


def _planted_profiles(groups: int, size: int, tokens: int, seed: int):
    """Activations [tokens, groups*size] where the neurons of one group fire on the same
    tokens (and only there), shuffled so that groups are not contiguous."""
    rng = np.random.default_rng(seed)
    owner = rng.integers(0, groups, tokens)  # which group a token excites
    act = np.zeros((tokens, groups * size))
    for g in range(groups):
        hit = owner == g
        act[hit, g * size : (g + 1) * size] = rng.uniform(0.5, 2.0, (hit.sum(), size))
    perm = rng.permutation(groups * size)
    return act[:, perm] + 0.01 * rng.standard_normal(act.shape), perm // size


@pytest.mark.parametrize("width_groups", [8, 128])  # exact assignment, and the greedy one
def test_coactivation_sketch_recovers_neurons_that_fire_together(width_groups):
    from d2d.cluster import ProfileSketch, projection_rows

    size = 16
    act, truth = _planted_profiles(width_groups, size, 3000, seed=1)
    rng = np.random.default_rng(0)
    sk = ProfileSketch(act.shape[1], dims=128)
    for chunk in np.array_split(act, 3):  # streamed in batches
        sk.add(chunk, projection_rows(chunk.shape[0], 128, rng))
    labels = balanced_kmeans(sk.features(), width_groups, seed=0)
    assert np.bincount(labels).tolist() == [size] * width_groups  # balanced
    # every found cluster is one planted group
    purity = sum(np.bincount(truth[labels == c]).max() for c in range(width_groups))
    assert purity / len(labels) > 0.95
    # the weight-free random split it is measured against does not
    rand = np.random.default_rng(0).permutation(len(labels)) // size
    assert sum(np.bincount(truth[rand == c]).max() for c in range(width_groups)) / len(labels) < 0.5


def test_greedy_balanced_kmeans_is_balanced_and_seeded_beyond_the_exact_limit():
    pts = np.random.default_rng(0).standard_normal((2048, 1500)).astype(np.float32)
    a = balanced_kmeans(pts, 128, seed=3)  # wider than MAX_DIMS: projected first
    assert np.bincount(a).tolist() == [16] * 128
    assert np.array_equal(a, balanced_kmeans(pts, 128, seed=3))
    assert not np.array_equal(a, balanced_kmeans(pts, 128, seed=4))


@pytest.mark.parametrize("family", ["gated", "gpt2", "bert-cls"])
def test_coactivation_convert_equals_dense_and_is_reproducible(family, tokenizer, text_dir):
    ids = torch.randint(1, 96, (2, 12))
    cfg = ConvertConfig(
        n_experts=8, clustering="coactivation", data=text_dir, tokens=256, seq_len=32, bf16=False
    )
    perms = []
    for _ in range(2):
        model = tiny(family, vocab=tokenizer.vocab_size)
        ref = outputs(model, ids)
        convert(model, cfg, tokenizer=tokenizer)
        torch.testing.assert_close(outputs(model, ids), ref)
        perms.append(torch.cat([m.perm for m in moe_layers(model).values()]))
    assert torch.equal(perms[0], perms[1])
    model = tiny(family, vocab=tokenizer.vocab_size)
    convert(model, ConvertConfig(n_experts=8), tokenizer=tokenizer)  # weight k-means
    assert not torch.equal(torch.cat([m.perm for m in moe_layers(model).values()]), perms[0])


def test_coactivation_needs_a_tokenizer_and_a_known_kind():
    with pytest.raises(D2DError, match="tokenizer"):
        convert(tiny("gated"), ConvertConfig(n_experts=8, clustering="coactivation"))
    with pytest.raises(D2DError, match="clustering must be one of"):
        ConvertConfig(clustering="random")
