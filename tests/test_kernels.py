"""The sparse execution path (only the selected experts run) equals the masked reference."""

import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny

from d2d.nn import kernels
from d2d.nn.moe import MoEFFN
from d2d.nn.routing import execution, routing
from d2d.nn.structure import attach_routers, moe_layers
from d2d.stages import ConvertConfig, convert

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="needs a C++ compiler"
)


def test_the_kernels_build():
    assert kernels.load() is not None, kernels.why_not()


def masked_reference(moe: MoEFFN, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    h = moe.hidden(x)
    h = (h.view(-1, moe.n_experts, moe.expert_size) * mask.unsqueeze(-1)).flatten(1)
    return F.linear(h, moe.w_out.t(), moe.b_out)


def _hf(name):
    from transformers.activations import ACT2FN

    return ACT2FN[name]


ACTS = {"silu": torch.nn.SiLU(), "gelu": torch.nn.GELU(), "gelu-tanh": torch.nn.GELU("tanh")}
ACTS |= {"relu": torch.nn.ReLU(), "mish (not fused)": torch.nn.Mish()}
ACTS |= {f"hf {n}": _hf(n) for n in ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh")}


@pytest.mark.parametrize("seed", range(24))
def test_sparse_ffn_equals_masked_on_random_shapes(seed):
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    d, n_experts, size = pick([8, 33, 64, 96]), pick([1, 3, 8, 16]), pick([1, 4, 7, 16])
    gated, bias = bool(seed % 2), seed % 3 == 0
    n = pick([0, 1, 2, 5, 17, 130])
    act = ACTS[pick(list(ACTS))]
    moe = MoEFFN(d, n_experts, size, act, gated=gated, bias_in=bias, bias_out=bias)
    for p in moe.parameters():
        p.data.normal_(0, 0.2, generator=g)
    x = torch.randn(n, d, generator=g)
    density = float(torch.rand((), generator=g))
    mask = torch.rand(n, n_experts, generator=g) < density
    with torch.no_grad():
        got = kernels.sparse_ffn(moe, x, mask)
        grouped = kernels.grouped_ffn(moe, x, mask)  # the GPU path, run here on the CPU
        fused = kernels.fused_ffn(moe, x, mask, 1.0)  # one call, activation in C++
        want = masked_reference(moe, x, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped, want, rtol=1e-5, atol=1e-5)
    if isinstance(act, torch.nn.Mish):
        assert fused is None  # an activation the kernel does not know: PyTorch applies it
    else:
        torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)
        if mask.sum() > 1:  # above the fraction limit the caller takes the dense product
            assert kernels.fused_ffn(moe, x, mask, 0.5 * float(mask.float().mean())) is None


def _tiled_cases():
    # (d_in, d_out, experts, size, gated, tokens): blocks of 8, 4, 2 and 1 pairs, an output
    # narrower than the input (grouped-query key/value projections), chunks past 512 tokens
    shapes = [(64, 64, 6, 16, True), (96, 64, 5, 16, False), (64, 96, 3, 32, False)]
    shapes += [(128, 128, 4, 32, True), (100, 64, 4, 16, False)]  # 100: pairs_in not tiled
    return [(*s, n) for s in shapes for n in (1, 2, 3, 7, 9, 130, 600)]


@pytest.mark.parametrize("d, d_out, n_experts, size, gated, n", _tiled_cases())
def test_tiled_kernels_equal_masked(d, d_out, n_experts, size, gated, n):
    """Experts of 16 and 32 neurons take the tiled kernels (AVX-512): equal to the masked
    reference and to the pair kernels, every block size, biases, an unused expert, an expert
    every token takes."""
    k = kernels.load()
    if not k.tiled(size, d_out):
        pytest.skip("no AVX-512 here: the tiled kernels are not built")
    g = torch.Generator().manual_seed(n + d)
    moe = MoEFFN(d, n_experts, size, torch.nn.SiLU(), gated=gated, bias_in=True, bias_out=True,
                 d_out=d_out)  # fmt: skip
    for p in moe.parameters():
        p.data.normal_(0, 0.2, generator=g)
    x = torch.randn(n, d, generator=g)
    mask = torch.rand(n, n_experts, generator=g) < 0.4
    mask[:, 0] = False
    mask[:, 1] = True
    with torch.no_grad():
        want = masked_reference(moe, x, mask)
        got = kernels.sparse_ffn(moe, x, mask)
        fused = kernels.fused_ffn(moe, x, mask, 1.0)
        # the pair kernels on the same pairs
        _, tok, pos, off = k.route(mask)
        pairs = tok.numel()
        up, up2 = torch.empty(pairs, size), torch.empty(pairs, size)
        gate = torch.empty(pairs, size) if gated else torch.empty(0)
        gate2 = torch.empty(pairs, size) if gated else torch.empty(0)
        k.pairs_in(
            x, moe.w_in, moe.w_gate if gated else torch.empty(0), tok, pos, off, up, gate, size
        )
        wp_in, wp_gate = kernels.packed(moe, d)
        assert bool(wp_in.numel()) == k.tiled(size, d)
        if wp_in.numel():
            k.pairs_in_packed(x, wp_in, wp_gate, tok, pos, off, up2, gate2, size)
            torch.testing.assert_close(up2, up, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(gate2, gate, rtol=1e-5, atol=1e-5)
        h = torch.randn(pairs, size, generator=g)
        torch.testing.assert_close(
            k.pairs_out_strips(h, moe.w_out, tok, pos, off, n, size),
            k.pairs_out(h, moe.w_out, tok, pos, off, n, size),
            rtol=1e-5,
            atol=1e-5,
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)


def test_packed_copies_follow_weight_changes():
    k = kernels.load()
    if not k.tiled(16, 64):
        pytest.skip("no AVX-512 here: the tiled kernels are not built")
    moe = MoEFFN(64, 4, 16, torch.nn.SiLU(), gated=True, bias_in=False, bias_out=False)
    for p in moe.parameters():
        p.data.normal_(0, 0.2)
    x, mask = torch.randn(9, 64), torch.rand(9, 4) < 0.5
    with torch.no_grad():
        first = kernels.fused_ffn(moe, x, mask, 1.0)
        moe.w_in.mul_(2.0)  # an in-place change: the packed copy must be rebuilt
        second = kernels.fused_ffn(moe, x, mask, 1.0)
        torch.testing.assert_close(second, masked_reference(moe, x, mask))
    assert not torch.allclose(first, second)
    assert moe.derived_bytes() == 2 * moe.w_in.numel() * 4  # up's and gate's packed copies


def routed_model(family: str, seed: int = 0):
    m = tiny(family, seed=seed)
    convert(m, ConvertConfig(n_experts=8))
    torch.manual_seed(seed)
    attach_routers(moe_layers(m), 16)
    return m


def outputs(m, **kw):
    with torch.no_grad():
        out = m(**kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", ["gated", "gpt2", "bert"])
@pytest.mark.parametrize("tau", [0.0, 0.05, 0.2, 0.5, 1.0])
def test_model_sparse_equals_masked_at_every_tau(family, tau):
    m = routed_model(family)
    ids = torch.randint(1, 96, (3, 11))
    am = torch.ones_like(ids)
    am[1, :4] = 0  # padding and an attention mask, batch > 1
    policy = {"rule": "tau", "tau": tau, "dense_positions": 1}
    with routing(m, policy):
        with execution(m, "masked"):
            want = outputs(m, input_ids=ids, attention_mask=am)
        with execution(m, "sparse"):
            got = outputs(m, input_ids=ids, attention_mask=am)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rule", [{"rule": "topk", "fraction": 0.25}, {"rule": "threshold"}])
def test_other_rules_take_the_sparse_path_too(rule):
    m = routed_model("gated")
    if rule["rule"] == "threshold":
        rule = {**rule, "thresholds": {str(i): 0.7 for i in moe_layers(m)}}
    ids = torch.randint(1, 96, (2, 9))
    calls = []
    fused, routed = kernels.fused_ffn, kernels.routed_ffn

    def counted_fused(*a):
        y = fused(*a)
        calls.append(y is not None)
        return y

    def counted_routed(*a):
        y, mask = routed(*a)
        calls.append(y is not None)
        return y, mask

    kernels.fused_ffn, kernels.routed_ffn = counted_fused, counted_routed
    try:
        with routing(m, rule):
            got = outputs(m, input_ids=ids)
            with execution(m, "masked"):
                want = outputs(m, input_ids=ids)
    finally:
        kernels.fused_ffn, kernels.routed_ffn = fused, routed
    assert any(calls), "the sparse kernel was not used"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_reference_paths_stay_masked():
    """Autograd, bf16 and all-experts runs do not use the kernel (and still agree)."""
    m = routed_model("gated")
    ids = torch.randint(1, 96, (2, 7))
    with routing(m, {"rule": "tau", "tau": 0.3}):
        moe = moe_layers(m)[0]
        x = torch.randn(5, moe.d_model)
        assert not moe._sparse_ok(x.requires_grad_())  # grad mode on: training path
        with torch.no_grad():
            assert moe._sparse_ok(x)
            assert not moe._sparse_ok(x.bfloat16())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert not moe._sparse_ok(x)
            with execution(m, "masked"):
                assert not moe._sparse_ok(x)
        m.bfloat16()
        with execution(m, "masked"):
            want = outputs(m, input_ids=ids)
        torch.testing.assert_close(outputs(m, input_ids=ids), want)


@pytest.mark.parametrize("family", ["gated", "gpt2"])
def test_generate_sparse_equals_masked(family):
    m = routed_model(family, seed=1)
    prompt = torch.tensor([[0, 0, 5, 9, 17], [3, 4, 5, 6, 7]])
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0, "attention_mask": am}
    with routing(m, {"rule": "tau", "tau": 0.3, "dense_positions": 1}):
        with execution(m, "masked"):
            want = m.generate(prompt, **kw)
        got = m.generate(prompt, **kw)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_sparse_equals_masked(dtype):
    m = routed_model("gated").to("cuda", dtype)
    ids = torch.randint(1, 96, (4, 33), device="cuda")
    with routing(m, {"rule": "tau", "tau": 0.2, "dense_positions": 1}):
        with execution(m, "masked"):
            want = outputs(m, input_ids=ids)
        got = outputs(m, input_ids=ids)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def _threshold_layer(seed: int):
    """A random MoE layer under a random exact-value threshold policy, and its input."""
    from d2d.nn.policy import RoutingPolicy

    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    gated, bias = seed % 2 == 0, seed % 3 == 0
    d, n_experts, size = pick([8, 33, 64]), pick([1, 3, 8, 16]), pick([1, 2, 4, 7])
    act = ACTS[pick([k for k in ACTS if "mish" not in k])]
    moe = MoEFFN(d, n_experts, size, act, gated=gated, bias_in=bias, bias_out=bias)
    for p in moe.parameters():
        p.data.normal_(0, 0.2, generator=g)
    x = torch.randn(pick([1, 2, 3, 4]), d, generator=g)
    kind = pick(["activation", "magnitude", "gate"] if gated else ["activation", "magnitude"])
    # gate scores read the whole input (input thresholds are TEAL-style's)
    t_in = pick([0.0, float(x.abs().quantile(0.4))]) if kind != "gate" else 0.0
    t_unit = pick([0.0, 0.05, 0.3, 10.0])  # 10: only each token's best expert runs
    moe.policy = RoutingPolicy(
        "threshold", per_layer={0: t_unit}, scores=kind, input_thresholds={0: t_in}
    )
    return moe, x


@pytest.mark.parametrize("seed", range(24))
def test_threshold_kernel_equals_masked_on_random_shapes(seed, monkeypatch):
    """TEAL-style, CATS-style and exact-magnitude thresholds run by the threshold kernel equal
    the masked reference, and record the same statistics."""
    from d2d.nn.moe import LayerStats

    moe, x = _threshold_layer(seed)
    moe.THRESHOLD_MAX_TOKENS = 4  # the kernel at 1-4 tokens, whatever the default limit
    taken = []
    orig = kernels.threshold_ffn
    monkeypatch.setattr(kernels, "threshold_ffn", lambda *a: taken.append(1) or orig(*a))
    results = {}
    for mode in ("masked", "sparse"):
        moe.execution, moe.stats = mode, LayerStats()
        with torch.no_grad():
            y = moe(x)
        results[mode] = (y, moe.stats)
    assert taken == [1]  # the sparse run took the kernel, the masked one did not
    (want, s_want), (got, s_got) = results["masked"], results["sparse"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert s_got.executed == s_want.executed and torch.equal(s_got.usage, s_want.usage)
    assert s_got.input_kept == pytest.approx(s_want.input_kept)


def test_threshold_kernel_only_for_a_few_tokens_past_the_sink():
    moe, x = _threshold_layer(0)
    with torch.no_grad():
        assert moe._threshold_ok(x)
        many = torch.randn(moe.THRESHOLD_MAX_TOKENS + 1, moe.d_model)
        assert not moe._threshold_ok(many)  # a prompt: dense products are faster
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not moe._threshold_ok(x)
    assert not moe._threshold_ok(x.requires_grad_())


def test_threshold_kernel_follows_weight_changes():
    """The transposed copies it reads are rebuilt when training changes the weights."""
    moe, x = _threshold_layer(2)
    moe.policy = type(moe.policy)(
        "threshold", per_layer={0: 0.05}, scores="activation", input_thresholds={0: 0.3}
    )
    with torch.no_grad():
        before = moe(x)
        moe.w_in.mul_(2.0)
        after = moe(x)
        moe.execution = "masked"
        want = moe(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)


def test_threshold_kernel_follows_policy_changes(monkeypatch):
    """Its cached plan (thresholds, weight arguments) is rebuilt for a new policy, and masked
    execution never takes it: each call equals the masked reference under its policy."""
    moe, x = _threshold_layer(2)
    calls = []
    orig = kernels.threshold_ffn
    monkeypatch.setattr(kernels, "threshold_ffn", lambda *a: calls.append(1) or orig(*a))
    pols = [
        ("threshold", {0: 0.05}, "activation", {0: 0.3}),
        ("threshold", {0: 0.4}, "activation", {0: 0.8}),
        ("threshold", {0: 0.1}, "gate", {}),
        ("threshold", {0: 0.2}, "magnitude", {0: 0.5}),
    ]
    with torch.no_grad():
        for rule, per_layer, scores, t_in in pols:
            moe.policy = type(moe.policy)(
                rule, per_layer=per_layer, scores=scores, input_thresholds=t_in
            )
            moe.execution, calls[:] = "sparse", []
            got = moe(x)
            assert calls == [1]  # the kernel ran
            moe.execution = "masked"
            want = moe(x)
            assert calls == [1]  # masked execution: not the kernel
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def counting(monkeypatch, name: str) -> list:
    """Calls of kernels.<name> from here on (the function replaced by a counting wrapper for
    the test's duration)."""
    calls = []
    orig = getattr(kernels, name)

    def counted(*a):
        calls.append(1)
        return orig(*a)

    monkeypatch.setattr(kernels, name, counted)
    return calls


@pytest.mark.parametrize("scores", ["activation", "gate"])
def test_generate_with_threshold_kernel_equals_masked(scores, monkeypatch):
    """Decoding under TEAL-style / CATS-style thresholds (one token per step: the kernel) makes
    the same tokens as the masked reference, with a dense sink and padding."""
    m = tiny("gated", seed=3)
    convert(m, ConvertConfig(expert_size=1))
    layers = moe_layers(m)
    pol = {"rule": "threshold", "scores": scores, "dense_positions": 1}
    pol["thresholds"] = {str(i): 0.02 for i in layers}
    if scores == "activation":
        pol["input_thresholds"] = {str(i): 0.5 for i in layers}
    prompt = torch.tensor([[0, 0, 5, 9, 17], [3, 4, 5, 6, 7]])
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0, "attention_mask": am}
    calls = counting(monkeypatch, "threshold_ffn")
    with routing(m, pol):
        with execution(m, "masked"):
            want = m.generate(prompt, **kw)
        got = m.generate(prompt, **kw)
    assert calls, "the threshold kernel was not used"
    assert torch.equal(got, want)


def test_bench_memory_counts_the_transposed_copies():
    from types import SimpleNamespace

    from d2d.measure.timing import memory

    m = tiny("gated", seed=3)
    convert(m, ConvertConfig(expert_size=1))
    art = SimpleNamespace(model=m, path=None)
    before = memory(art)
    layers = moe_layers(m)
    pol = {"rule": "threshold", "scores": "activation", "dense_positions": 0}
    pol["thresholds"] = {str(i): 0.02 for i in layers}
    pol["input_thresholds"] = {str(i): 0.5 for i in layers}
    with routing(m, pol), torch.no_grad():
        m(input_ids=torch.tensor([[5]]))
    after = memory(art)
    copies = sum(2 * moe.w_in.numel() * 4 for moe in layers.values())  # gate and up, fp32
    assert after["tensor_bytes"] - before["tensor_bytes"] == copies
    assert after["dense_tensor_bytes"] == before["dense_tensor_bytes"]


def test_auto_execution_runs_dense_where_thresholds_cannot_pay():
    """Under "auto", a call of exact-value thresholds above the kernel's token limit (a prompt,
    batch decoding) runs every expert, equals the dense FFN and is counted as every expert with
    the whole input; a call within the limit takes the kernel and equals the routed reference.
    "sparse" keeps routing every call."""
    from d2d.nn.moe import LayerStats

    moe, _ = _threshold_layer(2)
    moe.policy = type(moe.policy)(
        "threshold", per_layer={0: 0.1}, scores="activation", input_thresholds={0: 0.3}
    )
    many = torch.randn(moe.THRESHOLD_MAX_TOKENS + 3, moe.d_model)
    one = many[:1]
    with torch.no_grad():
        dense = moe.down(moe.hidden(many))
        moe.execution = "masked"
        routed_many, routed_one = moe(many), moe(one)
        assert not torch.allclose(routed_many, dense)  # the thresholds do skip work here

        moe.execution, moe.stats = "auto", LayerStats()
        torch.testing.assert_close(moe(many), dense, rtol=1e-5, atol=1e-5)
        st = moe.stats
        assert st.tokens == len(many) and st.executed == len(many) * moe.n_experts
        assert st.input_fraction() == 1.0
        assert moe.token_macs(st) == moe.expert_macs() * moe.n_experts  # counted dense

        moe.stats = LayerStats()
        torch.testing.assert_close(moe(one), routed_one, rtol=1e-5, atol=1e-5)
        assert moe.stats.executed < moe.n_experts  # one token: routed (the kernel)

        moe.execution, moe.stats = "sparse", None
        torch.testing.assert_close(moe(many), routed_many, rtol=1e-5, atol=1e-5)


def test_auto_execution_keeps_routers_and_training_routed():
    """Execution "auto" changes only exact-value threshold calls above the limit: learned
    routers keep their sparse path at any token count, and autograd the routed reference."""
    m = routed_model("gated")
    ids = torch.randint(1, 96, (2, 9))
    with routing(m, {"rule": "tau", "tau": 0.3}):
        with execution(m, "masked"):
            want = outputs(m, input_ids=ids)
        with execution(m, "auto"):
            got = outputs(m, input_ids=ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    moe, _ = _threshold_layer(2)
    moe.execution = "auto"
    x = torch.randn(moe.THRESHOLD_MAX_TOKENS + 3, moe.d_model, requires_grad=True)
    assert not moe._dense_call(x)  # training: the routed reference
    with torch.no_grad():
        assert moe._dense_call(x)
        moe.policy = type(moe.policy)("threshold", per_layer={0: 0.0}, scores="activation")
        assert not moe._dense_call(x)  # nothing to skip: the ordinary path is dense anyway


@pytest.mark.parametrize("family", ["gated", "gpt2", "bert"])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_small_units_fast_path_equals_masked_at_1_16_512_tokens(family, size):
    """Experts of 1, 2 and 4 neurons under learned routers and under TEAL-style thresholds:
    the fast path (kernels) equals the masked reference on 1 token, 16 and 512 tokens, the
    batches padded."""
    m = tiny(family, seed=1)
    convert(m, ConvertConfig(expert_size=size))
    layers = moe_layers(m)
    torch.manual_seed(1)
    attach_routers(layers, 16)
    teal = {"rule": "threshold", "scores": "activation", "dense_positions": 1}
    teal["thresholds"] = {str(i): 0.05 for i in layers}
    teal["input_thresholds"] = {str(i): 0.4 for i in layers}
    policies = [{"rule": "tau", "tau": 0.3, "dense_positions": 1}, teal]
    g = torch.Generator().manual_seed(size)
    for rows, length in ((1, 1), (2, 8), (4, 128)):  # 1, 16 and 512 tokens
        ids = torch.randint(1, 96, (rows, length), generator=g)
        am = torch.ones_like(ids)
        if rows > 1:
            am[1, : length // 2] = 0  # a padded row
        for pol in policies:
            # one token at position 0 would lie in the dense sink: route it
            pol = {**pol, "dense_positions": 0 if length == 1 else 1}
            with routing(m, pol):
                with execution(m, "masked"):
                    want = outputs(m, input_ids=ids, attention_mask=am)
                with execution(m, "sparse"):
                    got = outputs(m, input_ids=ids, attention_mask=am)
            real = am.bool()
            torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)


def test_threshold_token_limit_from_the_environment():
    """D2D_THRESHOLD_MAX_TOKENS sets the kernel's token limit (0: never the kernel, so that
    "auto" runs such layers dense); a bad value is refused in one line where it is used."""
    import subprocess
    import sys

    code = "from d2d.nn.moe import MoEFFN; print(MoEFFN.THRESHOLD_MAX_TOKENS)"
    for value, want in (("", "3"), ("0", "0"), ("2", "2")):
        env = {**os.environ, "D2D_THRESHOLD_MAX_TOKENS": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
        assert out.stdout.decode().strip() == want
    from d2d.errors import D2DError

    moe, x = _threshold_layer(2)
    moe.THRESHOLD_MAX_TOKENS = 0
    with torch.no_grad():
        assert not moe._threshold_ok(x)
        moe.execution = "auto"
        assert moe._dense_call(x)
        moe.THRESHOLD_MAX_TOKENS = "two"
        with pytest.raises(D2DError, match="D2D_THRESHOLD_MAX_TOKENS must be a whole number"):
            moe(x)


def between(values: torch.Tensor) -> float:
    """A value halfway between the two middle distinct values: a rule's threshold that no score
    lies on (a score exactly at a threshold tests rounding, not the rule)."""
    v = values.flatten().unique()  # sorted
    i = max(1, v.numel() // 2)
    return float((v[i - 1] + v[i]) / 2)


@pytest.mark.parametrize("rule", ["tau", "threshold"])
@pytest.mark.parametrize("n", [1, 3, 64])
def test_router_kernel_equals_the_modules(rule, n):
    """The fused router mask (one kernel call) equals the router module and the rule's mask,
    the dense sink included; training (autograd) keeps the modules."""
    from d2d.nn.moe import Router
    from d2d.nn.policy import RoutingPolicy

    torch.manual_seed(n)
    moe = MoEFFN(32, 12, 4, torch.nn.ReLU(), gated=False, bias_in=False, bias_out=False)
    moe.router = Router(32, 12, 16)
    x = torch.randn(n, 32)
    scores = moe.router(x).detach()
    ratio = scores / scores.amax(-1, keepdim=True)
    value = between(ratio if rule == "tau" else scores)
    key = "tau" if rule == "tau" else "thresholds"
    moe.policy = RoutingPolicy.of({"rule": rule, key: value if rule == "tau" else {"0": value}})
    moe.index = 0
    want = moe.policy.mask(0, scores)
    with torch.no_grad():
        got = moe.select(x, None)
        assert moe._fused_router_mask(x) is not None
    assert torch.equal(got, want) and 0 < int(want.sum()) < want.numel()
    sink = torch.zeros(n, dtype=torch.bool)
    sink[0] = True
    got = kernels.router_mask(moe.router, x, moe._FUSED_RULES[rule], value, sink)
    assert torch.equal(got, want | sink[:, None])
    assert moe._fused_router_mask(x) is None  # autograd on: the modules run


def _router_layer(n_experts=12, size=4, gated=False, hidden=16, seed=0):
    from d2d.nn.moe import Router

    torch.manual_seed(seed)
    moe = MoEFFN(32, n_experts, size, torch.nn.SiLU(), gated=gated, bias_in=True, bias_out=True)
    for p in moe.parameters():
        p.data.normal_(0, 0.2)
    moe.router = Router(32, n_experts, hidden)
    moe.index = 0
    return moe


def _set_rule(moe, rule, x):
    """A tau or threshold policy at the median of this input's router scores."""
    from d2d.nn.policy import RoutingPolicy

    scores = moe.router(x).detach()
    if rule == "tau":
        value = between(scores / scores.amax(-1, keepdim=True))
        moe.policy = RoutingPolicy.of({"rule": "tau", "tau": value, "dense_positions": 1})
    else:
        value = between(scores)
        moe.policy = RoutingPolicy.of(
            {"rule": "threshold", "thresholds": {"0": value}, "dense_positions": 1}
        )
    return value


@pytest.mark.parametrize("rule", ["tau", "threshold"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("n", [1, 16, 200])
def test_one_call_router_path_equals_masked(rule, gated, n, monkeypatch):
    """Router, rule and experts in one kernel call (routed_ffn) give the masked reference's
    output and statistics, the dense sink included; autograd keeps the general path."""
    from d2d.nn.moe import LayerStats, RoutingContext

    moe = _router_layer(gated=gated, seed=n)
    x = torch.randn(n, 32)
    _set_rule(moe, rule, x)
    # a prompt from position 0 (the sink: every expert), or one decoding step past it
    start = 0 if n > 1 else 5
    moe.context = RoutingContext(
        positions=torch.arange(start, start + n).view(1, n), min_position=start
    )
    runs = counting(monkeypatch, "routed_ffn")
    with torch.no_grad():
        moe.stats = LayerStats()
        got = moe(x)
        got_stats = (moe.stats.tokens, moe.stats.executed, moe.stats.usage.clone())
        moe.execution = "masked"
        moe.stats = LayerStats()
        want = moe(x)
        want_stats = (moe.stats.tokens, moe.stats.executed, moe.stats.usage.clone())
    moe.execution = "sparse"
    assert len(runs) == 1, "the one-call path was not taken"
    y = moe(x)  # autograd on: the modules run
    assert len(runs) == 1 and y.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_stats[:2] == want_stats[:2] and torch.equal(got_stats[2], want_stats[2])
    # a prompt's sink token ran every expert, the others not all
    assert 0 < got_stats[1] < n * moe.n_experts


def test_one_call_router_path_falls_back_to_dense_above_the_fraction():
    moe = _router_layer(seed=3)
    x = torch.randn(40, 32)
    moe.SPARSE_MAX_FRACTION = 0.0  # any selection is "too many": the masked dense product
    _set_rule(moe, "tau", x)
    with torch.no_grad():
        rule, value, args = moe._router_plan()
        y, mask = kernels.routed_ffn(x, rule, value, None, args, 0.0)
        assert y is None and mask.any()
        got = moe(x)
        moe.execution = "masked"
        want = moe(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_one_call_router_path_follows_weight_and_policy_changes():
    moe = _router_layer(seed=4)
    x = torch.randn(24, 32)
    _set_rule(moe, "threshold", x)

    def reference():
        moe.execution = "masked"
        try:
            return moe(x)
        finally:
            moe.execution = "sparse"

    with torch.no_grad():
        first = moe(x)
        plan = moe._router_plan()
        assert plan is not None and moe._router_plan() is plan  # cached
        moe.router.fc2.bias.add_(0.5)  # in place: the router's selection changes
        assert moe._router_plan() is not plan
        torch.testing.assert_close(moe(x), reference(), rtol=1e-5, atol=1e-5)
        moe.w_out.mul_(2.0)  # in place: the experts' outputs change
        torch.testing.assert_close(moe(x), reference(), rtol=1e-5, atol=1e-5)
        _set_rule(moe, "tau", x)  # a new policy: a new plan
        assert moe._router_plan()[0] == moe._FUSED_RULES["tau"]
        torch.testing.assert_close(moe(x), reference(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, moe(x).detach())


@pytest.mark.parametrize("rule", ["tau", "threshold"])
@pytest.mark.parametrize("shift", [-60.0, 0.0, 30.0])
def test_router_kernel_compares_logits_like_the_scores(rule, shift):
    """The kernel compares logits against the inverse softplus of each threshold: the same
    selection as the scores' comparison, where softplus is flat (very negative logits) or the
    identity (beyond 20), and the best expert always runs, tau = 1 included."""
    from d2d.nn.moe import Router

    torch.manual_seed(7)
    router = Router(16, 10, 8)
    with torch.no_grad():
        router.fc2.weight.mul_(8.0)
        router.fc2.bias.add_(shift)
    x = torch.randn(33, 16)
    with torch.no_grad():
        scores = router(x)
    from d2d.nn.policy import rule_mask

    ratio = scores / scores.amax(-1, keepdim=True)
    values = [between(ratio), 1.0] if rule == "tau" else [between(scores), 1e6]
    for value in values:
        with torch.no_grad():
            got = kernels.router_mask(router, x, 0 if rule == "tau" else 1, value, None)
        assert torch.equal(got, rule_mask(rule, scores, value)), value
        assert got.any(-1).all()
