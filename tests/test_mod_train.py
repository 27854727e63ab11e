"""d2d mod: routers trained in with the shared loop; the artifact replays them."""

import json

import pytest
import torch
from d2d_cli.main import app
from typer.testing import CliRunner

import d2d
from d2d.errors import D2DError
from d2d.nn.depth import mod_blocks
from d2d.stages import ModConfig

runner = CliRunner()
FAST = ["--steps", "300", "--batch-size", "8", "--seq-len", "32", "--eval-tokens", "512"]
FAST += ["--lr", "5e-3", "--no-bf16", "--capacity", "0.25", "--anneal", "0.25"]
FAST += ["--aux-weight", "5", "--router-lr", "1e-2"]


def test_capacity_anneals_from_one():
    cfg = ModConfig(capacity=0.25, anneal=0.5, steps=100)
    assert cfg.capacity_at(0) == 1.0
    assert cfg.capacity_at(25) == pytest.approx(0.625)
    assert cfg.capacity_at(50) == cfg.capacity_at(99) == 0.25
    assert ModConfig(capacity=0.5, anneal=0.0, steps=10).capacity_at(0) == 0.5


@pytest.mark.parametrize(
    "bad",
    [{"capacity": 0}, {"capacity": 1.5}, {"predictor": "x"}, {"router_lr": 0}, {"sink": -1}],
)
def test_bad_options(bad):
    with pytest.raises(D2DError):
        ModConfig(**bad)


@pytest.mark.parametrize("predictor", ["aux-loss", "mlp"])
def test_mod_trains_routers_and_round_trips(predictor, model_dirs, tmp_path):
    out = tmp_path / "m"
    res = runner.invoke(
        app,
        ["mod", model_dirs["gated"], "-o", str(out), "--predictor", predictor, "--layers", "1"]
        + FAST,
        env={"COLUMNS": "200"},
    )
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "d2d.json").read_text())
    m = meta["stages"][-1]["metrics"]
    assert m["routed_layers"] == [1] and "causal predictor" in res.output
    # top-k processes the capacity's share of the routed block; the predictor was trained
    assert m["topk"]["routed_block_fraction"] == pytest.approx(0.25, abs=0.02)
    # better than the constant guess (always skip: 75% right at capacity 0.25)
    assert m["topk"]["predictor_accuracy"] > 0.8
    first, last = m["history"][0], m["history"][-1]
    assert last["capacity"] == 0.25 and first["capacity"] == 1.0
    model = d2d.load(out)
    blocks = mod_blocks(model)
    assert list(blocks) == [1] and blocks[1].mode == "causal"
    assert (blocks[1].predictor is not None) == (predictor == "mlp")
    # the loaded model computes what the trained one did: generation is deterministic
    ids = torch.randint(1, 96, (1, 6))
    with torch.no_grad():
        a = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        b = d2d.load(out).generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_mod_refuses_encoders(model_dirs, tmp_path):
    res = runner.invoke(app, ["mod", model_dirs["bert"], "-o", str(tmp_path / "m"), *FAST])
    assert res.exit_code == 2 and "decoder" in res.stderr


def test_freeze_base_changes_no_base_weight_and_distill_logs_the_kl(model_dirs, tmp_path):
    from d2d.models import load_base

    out = tmp_path / "m"
    args = ["mod", model_dirs["gated"], "-o", str(out), "--layers", "1", "--freeze-base"]
    args += ["--distill", "--distill-weight", "2"] + FAST[:-2] + ["--steps", "20"]
    res = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    base = load_base(model_dirs["gated"]).model.state_dict()
    model = d2d.load(out)
    got = {
        k.replace(".block.", "."): v
        for k, v in model.state_dict().items()
        if "router" not in k and "predictor" not in k
    }
    assert set(got) == set(base)
    for k, v in base.items():
        assert torch.equal(got[k], v), k  # bitwise
    block = mod_blocks(model)[1]
    assert any(p.abs().sum() > 0 for p in block.router.parameters())
    hist = json.loads((out / "d2d.json").read_text())["stages"][-1]["metrics"]["history"]
    assert all("kl" in h for h in hist) and hist[0]["kl"] < 1e-3  # starts at its teacher


def trains_records_and_replays(model_dirs, out, options, steps, key, value, described):
    """Run `d2d mod` with `options` on block 1; the lineage records `key` = `value`, the loaded
    block has it, two loads generate the same tokens, and inspect says `described`."""
    args = ["mod", model_dirs["gated"], "-o", str(out), "--layers", "1", *options]
    res = runner.invoke(app, args + FAST[:-2] + ["--steps", str(steps)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "d2d.json").read_text())
    assert meta["stages"][-1]["structure"][key] == value
    model = d2d.load(out)
    assert getattr(mod_blocks(model)[1], key) == value
    ids = torch.randint(1, 96, (1, 6))
    with torch.no_grad():
        a = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        b = d2d.load(out).generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)
    res = runner.invoke(app, ["inspect", str(out)], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and described in res.output


def test_skip_attention_trains_records_and_replays(model_dirs, tmp_path):
    trains_records_and_replays(
        model_dirs, tmp_path / "m", ["--skip", "attention"], 10, "skip", "attention",
        "skipping attention",
    )  # fmt: skip


def test_skip_mlp_trains_records_replays_and_is_named_where_measured(model_dirs, tmp_path):
    """--skip mlp through the CLI: trained, recorded, replayed; eval, bench and inspect say
    what the routed blocks skip and count the MLPs run."""
    out = tmp_path / "m"
    trains_records_and_replays(
        model_dirs, out, ["--skip", "mlp"], 6, "skip", "mlp", "skipping the MLP"
    )
    res = runner.invoke(
        app, ["eval", str(out), "--tokens", "256", "--seq-len", "32", "--no-bf16"],
        env={"COLUMNS": "250"},
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "skipping the MLP" in res.output and "MLPs run" in res.output
    args = ["--reps", "1", "--warmup", "0", "--prompt-len", "16", "--decode-batch", "1"]
    args += ["--decode-prompt", "4", "--new-tokens", "2", "--json", str(tmp_path / "b.json")]
    res = runner.invoke(app, ["bench", str(out), *args], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "b.json").read_text())["metrics"]["model"]
    assert all("skipping the MLP" in r["routing"] for r in rows)


def test_keep_kv_trains_records_and_replays(model_dirs, tmp_path):
    options = ["--skip", "block", "--keep-kv", "--routing", "threshold", "--freeze-base"]
    options += ["--distill"]
    trains_records_and_replays(
        model_dirs, tmp_path / "m", options, 6, "keep_kv", True, "keys and values kept"
    )
    args = ["mod", model_dirs["gated"], "-o", str(tmp_path / "m"), "--layers", "1"]
    bad = runner.invoke(app, [*args, "--skip", "mlp", "--keep-kv"])
    assert bad.exit_code != 0 and "--keep-kv is for --skip block or attention" in bad.output
    assert "Traceback" not in bad.output


def test_threshold_routing_trains_replays_and_agrees_with_itself(model_dirs, tmp_path):
    out = tmp_path / "m"
    args = ["mod", model_dirs["gated"], "-o", str(out), "--layers", "1", "--routing", "threshold"]
    res = runner.invoke(app, args + FAST[:-2] + ["--steps", "60"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "d2d.json").read_text())
    st, m = meta["stages"][-1]["structure"], meta["stages"][-1]["metrics"]
    assert st["predictor"] == "threshold" and st["hidden"] is None
    assert all(h["aux"] == 0 for h in m["history"])
    # the thresholds were fitted on the calibration split: on held-out text the decision takes
    # a share near the capacity (this tiny model's logits are not far apart, so loosely)
    assert m["thresholds"] and 0.1 < m["causal"]["routed_block_fraction"] < 0.45
    model = d2d.load(out)
    blk = mod_blocks(model)[1]
    assert blk.thresholded and blk.predictor is None and blk.mode == "causal"
    assert float(blk.threshold) != 0.0  # the running threshold was saved and loaded
    with pytest.raises(D2DError, match="routing must be one of"):
        ModConfig(routing="random")


def test_lora_adapters_train_and_merge_into_the_routed_blocks_only(model_dirs, tmp_path):
    from d2d.models import load_base

    out = tmp_path / "m"
    args = ["mod", model_dirs["gated"], "-o", str(out), "--layers", "1", "--freeze-base"]
    args += ["--lora-rank", "4"] + FAST[:-2] + ["--steps", "20"]
    res = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "d2d.json").read_text())
    assert meta["stages"][-1]["metrics"]["lora"] == {"rank": 4, "modules": 7}
    base = load_base(model_dirs["gated"]).model.state_dict()
    got = {
        k.replace(".block.", "."): v
        for k, v in d2d.load(out).state_dict().items()
        if "router" not in k and "predictor" not in k
    }
    assert set(got) == set(base)  # merged: no adapter weights, the plain structure
    moved = {k for k in base if not torch.equal(got[k], base[k])}
    assert moved and all(k.startswith("model.layers.1.") for k in moved)
    assert all(k.endswith("proj.weight") for k in moved)
    with pytest.raises(D2DError, match="add --freeze-base"):
        ModConfig(lora_rank=4)


@pytest.mark.parametrize("skip", ["block", "attention", "mlp"])
def test_block_sensitivity_by_construction(skip):
    """A block whose skipped part adds nothing costs nothing to skip; at capacity 1.0 no block
    costs anything; a block that does work costs something at capacity 0.25."""
    from test_mod import llama

    from d2d.measure.sensitivity import depth_sensitivity

    m = llama(seed=0, layers=4)
    layers = m.model.layers
    with torch.no_grad():
        if skip in ("block", "attention"):
            layers[1].self_attn.o_proj.weight.zero_()
        if skip in ("block", "mlp"):
            layers[1].mlp.down_proj.weight.zero_()
    batches = [
        {"input_ids": torch.randint(1, 96, (4, 16), generator=torch.Generator().manual_seed(0))}
    ]
    cands = list(range(1, len(layers)))
    low = depth_sensitivity(m, batches, cands, 0.25, skip, 1)
    full = depth_sensitivity(m, batches, cands, 1.0, skip, 1)
    assert low[1] == pytest.approx(0.0, abs=1e-6)
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in full.values())
    assert all(abs(low[i]) > 1e-5 for i in cands if i != 1)


def test_layers_auto_routes_the_least_sensitive_blocks(model_dirs, tmp_path):
    out = tmp_path / "m"
    args = ["mod", model_dirs["gated"], "-o", str(out), "--layers", "auto", "--every", "2"]
    args += ["--sensitivity-tokens", "256", *FAST, "--steps", "4"]
    res = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    m = json.loads((out / "d2d.json").read_text())["stages"][-1]["metrics"]
    sens = {int(k): v for k, v in m["block_sensitivity"].items()}
    n_blocks = len(sens) + 1  # every block but block 0 is a candidate
    k = len([i for i in range(n_blocks) if i % 2 == 1])
    assert m["routed_layers"] == sorted(sorted(sens, key=sens.get)[:k])
    assert list(mod_blocks(d2d.load(out))) == m["routed_layers"]


def test_allocate_gives_cheap_blocks_low_capacity(monkeypatch):
    """--allocate: from each block's cost at each capacity, the blocks and capacities of least
    summed cost that skip as many (token, block) pairs as --every blocks at --capacity."""
    from types import SimpleNamespace

    import d2d.stages.mod as mod

    # blocks 1-5: block 2 costs nothing to skip, block 4 a little, the others a lot
    base = {1: 1.0, 2: 0.0, 3: 1.0, 4: 0.1, 5: 1.0}

    def fake(art, cfg, n_layers, progress, capacity=None, calib=None):
        return {b: c * (1 - capacity) ** 2 for b, c in base.items()}

    monkeypatch.setattr(mod, "block_sensitivity", fake)
    monkeypatch.setattr(mod, "calibration_batches", lambda art, cfg: [])
    cfg = ModConfig(layers="auto", allocate=True, every=3, capacity=0.5)
    got = mod.allocate_depth(SimpleNamespace(), cfg, 6, None)
    # --every 3 of 6 blocks at 0.5 skips 2 x 0.5 = 1 block's worth of the 5 candidates
    caps = got["capacities"]
    assert got["processed_budget"] == pytest.approx(0.8)
    assert sum(1 - c for c in caps.values()) >= 1.0 - 1e-9  # at least as much skipped
    assert caps[2] == 0.25 and set(caps) <= {2, 4}  # the cheap blocks, the cheapest deepest
    assert got["estimated_cost"] == pytest.approx(
        sum(fake(0, 0, 0, 0, c)[b] for b, c in caps.items())
    )


def test_allocate_trains_records_and_replays(tmp_path, tokenizer):
    from tiny import tiny
    from transformers import LlamaConfig, LlamaForCausalLM

    m = tiny("gated", vocab=tokenizer.vocab_size)
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**{**m.config.to_dict(), "num_hidden_layers": 5})).eval()
    m.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    out = tmp_path / "m"
    args = ["mod", str(tmp_path / "base"), "-o", str(out), "--layers", "auto", "--allocate"]
    args += ["--sensitivity-tokens", "128", "--every", "2", "--capacity", "0.5"]
    args += ["--routing", "threshold", "--freeze-base"]
    short = FAST[:-2] + ["--steps", "4"]
    res = runner.invoke(app, args + short, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "--allocate: each block's cost of skipping" in res.output
    st = json.loads((out / "d2d.json").read_text())["stages"][-1]["structure"]
    caps = {int(b): c for b, c in st["capacities"].items()}
    assert sorted(caps) == st["layers"] and all(c < 1.0 for c in caps.values())
    assert sum(1 - c for c in caps.values()) >= 2 * 0.5 - 1e-9  # as much as 2 blocks at 0.5
    model = d2d.load(out)
    assert {i: b.capacity for i, b in mod_blocks(model).items()} == caps
    res = runner.invoke(app, ["inspect", str(out)], env={"COLUMNS": "250"})
    assert res.exit_code == 0 and "(allocated)" in res.output
    bad = runner.invoke(
        app, ["mod", str(tmp_path / "base"), "-o", str(tmp_path / "x"), "--allocate"]
    )
    assert bad.exit_code != 0 and "add --layers auto" in bad.output
