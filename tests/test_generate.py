import pytest
import torch
from tiny import tiny

from d2d.nn.routing import routing
from d2d.nn.structure import attach_routers, moe_layers
from d2d.stages import ConvertConfig, convert


@pytest.mark.parametrize("family", ["gated", "gpt2"])
def test_greedy_generation_at_tau_zero_equals_dense(family):
    dense = tiny(family)
    prompt = torch.randint(1, 96, (2, 6))
    ref = dense.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    m = tiny(family)
    convert(m, ConvertConfig(n_experts=8))
    attach_routers(moe_layers(m), 16)
    with routing(m, {"rule": "tau", "tau": 0.0}):
        out = m.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family", ["gated", "gpt2"])
def test_kv_cache_generation_equals_uncached_at_positive_tau(family):
    m = tiny(family)
    convert(m, ConvertConfig(n_experts=8))
    attach_routers(moe_layers(m), 16)
    prompt = torch.randint(1, 96, (1, 5))
    with routing(m, {"rule": "tau", "tau": 0.3, "dense_positions": 1}):
        cached = m.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        plain = m.generate(
            prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=False
        )
    assert torch.equal(cached, plain)


def positions_seen():
    """A routed tiny LLaMA and the list its first MoE layer appends each forward's positions to."""
    m = tiny("gated")
    convert(m, ConvertConfig(n_experts=8))
    attach_routers(moe_layers(m), 16)
    seen = []
    moe = moe_layers(m)[0]
    moe.register_forward_hook(lambda mod, a, y: seen.append(mod.context.positions.clone()))
    return m, seen


def test_left_padded_batch_keeps_sink_at_first_real_token():
    m, seen = positions_seen()
    ids = torch.tensor([[0, 0, 5, 6], [3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    with torch.no_grad():
        m(input_ids=ids, attention_mask=mask)
    assert seen[0].tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_decode_steps_see_their_true_positions():
    """With the KV cache (generate passes it as `cache`), each decoded token's position
    continues the prompt's, so the dense sink covers only the first token."""
    m, seen = positions_seen()
    prompt = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with routing(m, {"rule": "tau", "tau": 0.5, "dense_positions": 1}):
        m.generate(prompt, attention_mask=am, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert seen[0].tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert [s.tolist() for s in seen[1:]] == [[[3], [5]], [[4], [6]]]
