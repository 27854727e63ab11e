"""Mixture-of-Depths structure: exact at capacity 1.0, top-k picks, positions, KV cache."""

import math

import pytest
import torch
from tiny import cache_of, decode_step, tiny

from d2d.nn.depth import insert_mod, mod_blocks, set_mode


def llama(seed=0, layers=4):
    m = tiny("gated", seed=seed)
    if layers != 2:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(**{**m.config.to_dict(), "num_hidden_layers": layers})
        torch.manual_seed(seed)
        m = LlamaForCausalLM(cfg).eval()
    return m


def logits(m, **kw):
    with torch.no_grad():
        return m(**kw).logits


def randomise_routers(m, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    for blk in mod_blocks(m).values():
        w = torch.randn(blk.router.weight.shape, generator=g) * scale
        blk.router.weight.data = w.to(blk.router.weight.device)
        blk.router.bias.data.zero_()


def stepwise(m, ids, first: int):
    """Logits from a prefill of the first `first` tokens, then one decoding step per token."""
    with torch.no_grad():
        out = m(input_ids=ids[:, :first], use_cache=True)
        steps = [out.logits]
        for j in range(first, ids.shape[1]):
            out = decode_step(m, ids[:, j : j + 1], out)
            steps.append(out.logits)
    return torch.cat(steps, 1), cache_of(out)


def test_capacity_one_equals_dense():
    dense = llama()
    m = llama()
    insert_mod(m, [1, 3], capacity=1.0)
    ids = torch.randint(1, 96, (2, 12))
    torch.testing.assert_close(logits(m, input_ids=ids), logits(dense, input_ids=ids))
    am = torch.ones_like(ids)
    am[0, :3] = 0  # left padding: real tokens must agree
    got, want = (
        logits(m, input_ids=ids, attention_mask=am),
        logits(dense, input_ids=ids, attention_mask=am),
    )
    torch.testing.assert_close(got[am.bool()], want[am.bool()])


def test_topk_picks_exactly_k_real_tokens():
    m = llama()
    insert_mod(m, [1, 3], capacity=0.25)
    randomise_routers(m)
    ids = torch.randint(1, 96, (3, 10))
    am = torch.ones_like(ids)
    am[1, :4] = 0
    am[2, :9] = 0
    logits(m, input_ids=ids, attention_mask=am)
    for blk in mod_blocks(m).values():
        c = blk.last_choice
        assert not (c & ~am.bool()).any()  # padding never chosen
        n_real = am.sum(-1)
        assert c.sum(-1).tolist() == [math.ceil(0.25 * int(n)) for n in n_real]
        # the chosen are the real tokens with the largest router logits
        r = blk.last_logits.masked_fill(~am.bool(), float("-inf"))
        for row in range(3):
            k = int(c[row].sum())
            top = set(r[row].topk(k).indices.tolist())
            assert top == set(c[row].nonzero().squeeze(1).tolist())


def test_chosen_tokens_keep_their_positions():
    m = llama()
    insert_mod(m, [1], capacity=0.5)
    randomise_routers(m)
    seen = {}
    blk = mod_blocks(m)[1]

    def hook(mod, args, kwargs):
        seen["cos"] = kwargs["position_embeddings"][0].clone()

    blk.block.self_attn.register_forward_pre_hook(hook, with_kwargs=True)
    ids = torch.randint(1, 96, (1, 10))
    logits(m, input_ids=ids)
    cos_all, _ = m.model.rotary_emb(torch.zeros(1, 10, 32), torch.arange(10)[None])
    chosen = blk.last_choice[0].nonzero().squeeze(1)
    torch.testing.assert_close(seen["cos"][0], cos_all[0, chosen])


def test_unrouted_tokens_pass_unchanged():
    m = llama(layers=2)
    insert_mod(m, [1], capacity=0.3)
    randomise_routers(m)
    blk = mod_blocks(m)[1]
    out = {}
    blk.register_forward_hook(lambda mod, a, y: out.update(x=a[0].clone(), y=y.clone()))
    logits(m, input_ids=torch.randint(1, 96, (2, 10)))
    skipped = ~blk.last_choice
    torch.testing.assert_close(out["y"][skipped], out["x"][skipped])
    assert not torch.allclose(out["y"][~skipped], out["x"][~skipped])


@pytest.mark.parametrize("batch", [1, 3])
def test_causal_mode_prefill_equals_step_decoding_and_cache_skips(batch):
    """Rows of a batch decide differently: the rows that skip write a placeholder entry that
    no query sees; a block where no row processes the token writes nothing."""
    m = llama(seed=1)
    routed = insert_mod(m, [1, 3], capacity=0.5)
    randomise_routers(m, seed=3)
    set_mode(m, "causal")
    ids = torch.randint(1, 96, (batch, 9), generator=torch.Generator().manual_seed(batch))
    full = logits(m, input_ids=ids)  # no cache: every token decided causally at once
    per_row = {i: b.last_choice.sum(-1) for i, b in routed.items()}
    assert any(0 < int(n) < 9 for v in per_row.values() for n in v)  # some tokens skip
    got, cache = stepwise(m, ids, 4)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-5)
    if batch == 1:
        for i in range(4):  # routed blocks cache only what they processed
            n = cache.get_seq_length(i)
            assert n == (int(per_row[i][0]) if i in routed else 9), (i, n)


@pytest.mark.parametrize("order", ["mod-then-convert", "convert-then-mod"])
def test_staged_mode_combines_with_moe(order):
    """MoD on the blocks and dynamic-k MoE inside their FFNs: with every expert run, the
    converted model computes what the MoD model does."""
    from d2d.nn.routing import routing
    from d2d.nn.structure import attach_routers, moe_layers
    from d2d.stages import ConvertConfig, convert

    ref = llama(seed=2)
    insert_mod(ref, [1, 3], capacity=0.5)
    randomise_routers(ref, seed=5)
    m = llama(seed=2)
    steps = [
        lambda: (insert_mod(m, [1, 3], capacity=0.5), randomise_routers(m, seed=5)),
        lambda: convert(m, ConvertConfig(n_experts=8)),
    ]
    for step in steps if order == "mod-then-convert" else steps[::-1]:
        step()
    assert sorted(moe_layers(m)) == [0, 1, 2, 3] and sorted(mod_blocks(m)) == [1, 3]
    attach_routers(moe_layers(m), 8)
    ids = torch.randint(1, 96, (2, 10))
    with routing(m, {"rule": "tau", "tau": 0.0}):
        torch.testing.assert_close(logits(m, input_ids=ids), logits(ref, input_ids=ids))
    with routing(m, {"rule": "tau", "tau": 0.5}):  # and it routes inside routed blocks
        assert not torch.allclose(logits(m, input_ids=ids), logits(ref, input_ids=ids))


@pytest.mark.gpu
def test_mod_on_cuda_matches_dense_and_decodes_like_prefill():
    dense = llama().cuda()
    m = llama().cuda()
    insert_mod(m, [1, 3], capacity=1.0)
    ids = torch.randint(1, 96, (2, 12), device="cuda")
    torch.testing.assert_close(logits(m, input_ids=ids), logits(dense, input_ids=ids))
    m = llama(seed=1).cuda()
    insert_mod(m, [1, 3], capacity=0.5, sink=1)
    randomise_routers(m, seed=3)
    set_mode(m, "causal")
    full = logits(m, input_ids=ids)
    torch.testing.assert_close(stepwise(m, ids, 5)[0], full, rtol=1e-4, atol=1e-4)


def test_unmasked_sdpa_path_equals_explicit_mask():
    """Where every key is real and nothing is cached, routed attention under SDPA runs without a
    mask (its causal kernel); eager attention gets the explicit mask: the same result."""
    models = []
    for impl in ("sdpa", "eager"):
        m = llama(seed=6)
        m.set_attn_implementation(impl)
        insert_mod(m, [1, 3], capacity=0.5, sink=1)
        randomise_routers(m, seed=2)
        models.append(m)
    ids = torch.randint(1, 96, (2, 11))
    torch.testing.assert_close(logits(models[0], input_ids=ids), logits(models[1], input_ids=ids))
    assert mod_blocks(models[0])[1]._sdpa and not mod_blocks(models[1])[1]._sdpa


SKIPS = ["block", "attention", "mlp"]


@pytest.mark.parametrize("skip", SKIPS)
def test_each_skip_kind_at_capacity_one_equals_dense(skip):
    dense = llama()
    m = llama()
    insert_mod(m, [1, 3], capacity=1.0, skip=skip)
    ids = torch.randint(1, 96, (2, 12))
    torch.testing.assert_close(logits(m, input_ids=ids), logits(dense, input_ids=ids))
    randomise_routers(m)  # below capacity 1.0 the function changes (a check that can fail)
    set_mode(m, "topk", 0.5)
    assert not torch.allclose(logits(m, input_ids=ids), logits(dense, input_ids=ids), atol=1e-4)


def test_attention_skip_leaves_no_kv_entry_and_still_runs_the_mlp():
    m = llama(layers=2)
    (blk,) = insert_mod(m, [1], capacity=0.4, skip="attention").values()
    randomise_routers(m)
    set_mode(m, "causal")
    out = {}
    blk.register_forward_hook(lambda mod, a, y: out.update(x=a[0].clone(), y=y.clone()))
    ids = torch.randint(1, 96, (1, 10))
    with torch.no_grad():
        res = m(input_ids=ids, use_cache=True)
    skipped = ~blk.last_choice[0]
    assert 0 < int(skipped.sum()) < 10
    # a skipped token still changes through the MLP, by exactly x + mlp(norm(x))
    x = out["x"][0][skipped]
    with torch.no_grad():
        want = x + blk.block.mlp(blk.block.post_attention_layernorm(x))
    torch.testing.assert_close(out["y"][0][skipped], want)
    assert not torch.allclose(out["y"][0][skipped], x)
    # the routed block cached only the tokens it processed; block 0 all of them
    cache = cache_of(res)
    assert cache.get_seq_length(1) == int(blk.last_choice.sum())
    assert cache.get_seq_length(0) == 10


def test_mlp_skip_caches_every_token_and_leaves_skipped_tokens_after_attention():
    m = llama(layers=2)
    (blk,) = insert_mod(m, [1], capacity=0.4, skip="mlp").values()
    randomise_routers(m)
    ids = torch.randint(1, 96, (1, 10))
    with torch.no_grad():
        res = m(input_ids=ids, use_cache=True)
    assert cache_of(res).get_seq_length(1) == 10  # attention ran for every token


@pytest.mark.parametrize("skip", ["attention", "mlp"])
@pytest.mark.parametrize("batch", [1, 3])
def test_skip_kinds_prefill_equals_step_decoding(skip, batch):
    m = llama(seed=1)
    insert_mod(m, [1, 3], capacity=0.5, skip=skip)
    randomise_routers(m, seed=3)
    set_mode(m, "causal")
    ids = torch.randint(1, 96, (batch, 9), generator=torch.Generator().manual_seed(batch))
    full = logits(m, input_ids=ids)
    torch.testing.assert_close(stepwise(m, ids, 4)[0], full, rtol=1e-4, atol=1e-5)


def test_skip_kind_needs_the_llama_layout():
    from d2d.errors import D2DError

    with pytest.raises(D2DError, match="skip must be one of"):
        insert_mod(llama(), [1], capacity=0.5, skip="heads")
    m = llama()
    m.model.layers[1].pre_feedforward_layernorm = torch.nn.Identity()  # a Gemma-2-like block
    with pytest.raises(D2DError, match="LLaMA layout"):
        insert_mod(m, [1], capacity=0.5, skip="attention")


def test_threshold_routing_trains_on_batch_quantiles_and_decodes_like_prefill():
    m = llama(seed=2)
    routed = insert_mod(m, [1, 3], capacity=0.5)
    for b in routed.values():
        b.add_threshold()
    randomise_routers(m, seed=5)
    set_mode(m, "threshold", 0.5)
    ids = torch.randint(1, 96, (3, 16), generator=torch.Generator().manual_seed(0))
    m.train()
    for _ in range(60):  # the running threshold settles on the batch quantile
        with torch.no_grad():
            m(input_ids=ids)
    m.eval()
    for b in routed.values():
        share = float(b.last_choice.float().mean())
        assert 0.4 <= share <= 0.6  # the batch quantile takes about the capacity's share
        q = torch.quantile(b.last_logits.float().flatten(), 0.5)
        assert float(b.threshold) == pytest.approx(float(q), abs=0.02)
    set_mode(m, "causal")  # generation: the logit against the running threshold
    full = logits(m, input_ids=ids)
    for b in routed.values():
        torch.testing.assert_close(b.last_choice, b.last_logits > b.threshold)
    torch.testing.assert_close(stepwise(m, ids, 5)[0], full, rtol=1e-4, atol=1e-5)


def test_agreement_with_the_training_routing_by_hand():
    """Under the causal decision, mod_stats counts where a threshold-trained block's decision
    (logit against its running threshold) agrees with what training would choose on the same
    batch (its quantile over the real, unforced tokens); decoding steps leave it unmeasured."""
    from d2d.nn.depth import mod_stats, summarise

    m = llama(seed=2)
    routed = insert_mod(m, [1, 3], capacity=0.5, sink=1)
    for b in routed.values():
        b.add_threshold()
        b.threshold.fill_(0.05)
    randomise_routers(m, seed=5)
    set_mode(m, "causal")
    ids = torch.randint(1, 96, (3, 16), generator=torch.Generator().manual_seed(1))
    with mod_stats(m) as st, torch.no_grad():
        m(input_ids=ids)
    agree = real = 0
    for b in routed.values():
        r = b.last_logits
        free = torch.ones_like(r, dtype=torch.bool)
        free[:, 0] = False  # the sink
        t = torch.quantile(r[free].float(), 0.5)
        want = (r >= t) | ~free
        assert torch.equal(b.training_choice(), want)
        agree += int((want == (r >= 0.05) | ~free).sum())
        real += r.numel()
    got = summarise(st, 4)["training_agreement"]
    assert got == pytest.approx(agree / real) and got < 1.0
    assert summarise(st, 4)["predictor_accuracy"] is None  # top-k was not measured
    with mod_stats(m) as st, torch.no_grad():
        stepwise(m, ids, 5)
    assert summarise(st, 4)["training_agreement"] is None


def test_fit_thresholds_takes_the_capacity_share_of_the_fitted_tokens():
    from d2d.nn.depth import fit_thresholds

    m = llama(seed=4)
    routed = insert_mod(m, [1, 3], capacity=0.3, sink=1)
    for b in routed.values():
        b.add_threshold()
    randomise_routers(m, seed=6)
    batches = [{"input_ids": torch.randint(1, 96, (4, 20))} for _ in range(3)]
    fit_thresholds(m, batches)
    set_mode(m, "causal")
    chosen = {i: 0 for i in routed}
    with torch.no_grad():
        for b in batches:
            m(**b)
            for i, blk in routed.items():
                chosen[i] += int(blk.last_choice[:, 1:].sum())  # the sink is always taken
    for i in routed:
        assert chosen[i] / (3 * 4 * 19) == pytest.approx(0.3, abs=0.02)


def test_mlp_skip_compacts_rows_and_equals_the_padded_path():
    """Rows of a batch that decide differently: the compacted path runs only the chosen
    (row, token) pairs and gives what the padded path gives."""
    m = llama(seed=7)
    routed = insert_mod(m, [1, 3], capacity=0.5, skip="mlp")
    randomise_routers(m, seed=8)
    set_mode(m, "causal")
    ids = torch.randint(1, 96, (4, 11), generator=torch.Generator().manual_seed(1))
    seen = []
    for b in routed.values():
        b.block.mlp.register_forward_hook(lambda mod, a, y: seen.append(a[0].shape))
    compact = logits(m, input_ids=ids)
    per_row = [b.last_choice.sum(-1) for b in routed.values()]
    assert any(len(set(p.tolist())) > 1 for p in per_row)  # rows differ
    assert [s[-2] if len(s) == 2 else None for s in seen] == [int(p.sum()) for p in per_row]
    for b in routed.values():
        b.compact = False
    torch.testing.assert_close(logits(m, input_ids=ids), compact)


@pytest.mark.parametrize("keep_kv", [False, True])
@pytest.mark.parametrize("skip", ["block", "attention"])
def test_batch_decoding_runs_only_the_rows_that_take_the_token(skip, keep_kv):
    """Rows of a batch that decide differently at a decoding step: the routed part runs for
    the rows that take the token only (on their rows of the cache), and the logits equal the
    padded path's and the full prefill's (keep_kv: every row still writes its key and value)."""
    m = llama(seed=1)
    routed = insert_mod(m, [1, 3], capacity=0.5, skip=skip, keep_kv=keep_kv)
    randomise_routers(m, seed=3)
    set_mode(m, "causal")
    ids = torch.randint(1, 96, (4, 12), generator=torch.Generator().manual_seed(5))
    full = logits(m, input_ids=ids)
    rows_seen = []  # (rows, tokens) of each output projection the routed blocks ran
    for b in routed.values():
        b.block.self_attn.o_proj.register_forward_hook(
            lambda mod, a, y: rows_seen.append(a[0].shape[:2])
        )
    compact, _ = stepwise(m, ids, 4)
    decode_rows = [n for n, t in rows_seen if t == 1]
    assert decode_rows and min(decode_rows) < 4  # some steps ran fewer rows than the batch
    torch.testing.assert_close(compact, full, rtol=1e-4, atol=1e-5)
    for b in routed.values():
        b.compact = False
    padded, _ = stepwise(m, ids, 4)
    torch.testing.assert_close(compact, padded, rtol=1e-5, atol=1e-6)


def test_threshold_training_under_bf16_autocast():
    """Router logits are bf16 under autocast; the running threshold stays fp32 and updates."""
    m = llama(seed=4)
    routed = insert_mod(m, [1, 3], capacity=0.5, sink=1)
    for b in routed.values():
        b.add_threshold()
    randomise_routers(m, seed=6)
    set_mode(m, "threshold")
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(input_ids=torch.randint(1, 96, (2, 12)))
    for b in routed.values():
        assert b.threshold.dtype == torch.float32 and float(b.threshold) != 0.0


def test_depth_only_policy_on_a_converted_model_without_routers():
    """MoD on a converted model that routes its FFNs without routers (router-free rules):
    a policy naming only the depth mode runs every expert and needs no router; a policy that
    routes by the routers' scores still asks for them."""
    from d2d.errors import D2DError
    from d2d.nn.routing import routing
    from d2d.stages import ConvertConfig, convert

    m = llama(seed=2)
    convert(m, ConvertConfig(expert_size=1))
    insert_mod(m, [1, 3], capacity=0.5)
    randomise_routers(m, seed=5)
    ids = torch.randint(1, 96, (2, 10))
    with routing(m, {"depth": "topk"}):
        logits(m, input_ids=ids)
    with pytest.raises(D2DError, match="no routers"):
        with routing(m, {"rule": "tau", "tau": 0.1}):
            pass


KEEP_KV = ["block", "attention"]


@pytest.mark.parametrize("skip", KEEP_KV)
def test_keep_kv_at_capacity_one_equals_dense(skip):
    dense = llama()
    m = llama()
    insert_mod(m, [1, 3], capacity=1.0, skip=skip, keep_kv=True)
    ids = torch.randint(1, 96, (2, 12))
    torch.testing.assert_close(logits(m, input_ids=ids), logits(dense, input_ids=ids))
    am = torch.ones_like(ids)
    am[0, :3] = 0  # left padding: real tokens must agree
    got = logits(m, input_ids=ids, attention_mask=am)
    want = logits(dense, input_ids=ids, attention_mask=am)
    torch.testing.assert_close(got[am.bool()], want[am.bool()])


@pytest.mark.parametrize("skip", KEEP_KV)
def test_keep_kv_skipped_tokens_stay_visible_as_keys(skip):
    """keep_kv is exactly: the block's attention over every token's keys, its update (and, for
    skip "block", the MLP's) kept for the chosen tokens only; and the cache holds every token."""
    m = llama(layers=2)
    (blk,) = insert_mod(m, [1], capacity=0.4, skip=skip, keep_kv=True).values()
    randomise_routers(m)
    seen = {}
    blk.register_forward_hook(
        lambda mod, a, kw, y: seen.update(x=(a[0] if a else kw["hidden_states"]).clone(), y=y),
        with_kwargs=True,
    )
    ids = torch.randint(1, 96, (1, 10))
    with torch.no_grad():
        res = m(input_ids=ids, use_cache=True)
        x, inner = seen["x"], blk.block
        pe = m.model.rotary_emb(x, torch.arange(10)[None])
        a = inner.self_attn(hidden_states=inner.input_layernorm(x), position_embeddings=pe,
                            attention_mask=None)[0]  # fmt: skip
        chosen = blk.last_choice[0][None, :, None].to(x.dtype)
        g = 2 * torch.sigmoid(blk.last_logits)[..., None]
        if skip == "attention":
            h = x + chosen * g * a
            want = h + inner.mlp(inner.post_attention_layernorm(h))
        else:
            upd = a + inner.mlp(inner.post_attention_layernorm(x + a))
            want = x + chosen * g * upd
    assert 0 < int(blk.last_choice.sum()) < 10
    torch.testing.assert_close(seen["y"], want, rtol=1e-5, atol=1e-5)
    assert cache_of(res).get_seq_length(1) == 10  # every token wrote its key and value


@pytest.mark.parametrize("skip", KEEP_KV)
@pytest.mark.parametrize("batch", [1, 3])
def test_keep_kv_prefill_equals_step_decoding(skip, batch):
    m = llama(seed=1)
    insert_mod(m, [1, 3], capacity=0.5, skip=skip, keep_kv=True)
    randomise_routers(m, seed=3)
    set_mode(m, "causal")
    ids = torch.randint(1, 96, (batch, 9), generator=torch.Generator().manual_seed(batch))
    full = logits(m, input_ids=ids)
    steps, cache = stepwise(m, ids, 4)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-5)
    assert cache.get_seq_length(1) == cache.get_seq_length(3) == 9
    assert not torch.allclose(full, logits(llama(seed=1), input_ids=ids), atol=1e-4)


def test_keep_kv_refuses_what_it_cannot_compute():
    from d2d.errors import D2DError

    with pytest.raises(D2DError, match="--keep-kv needs --skip block or attention"):
        insert_mod(llama(), [1], capacity=0.5, skip="mlp", keep_kv=True)
    m = llama()
    m.model.layers[1].self_attn.sliding_window = 4
    with pytest.raises(D2DError, match="no sliding window"):
        insert_mod(m, [1], capacity=0.5, skip="attention", keep_kv=True)
