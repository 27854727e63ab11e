"""Wall-clock timing of a converted (or Mixture-of-Depths) model against its dense self.

Dense and converted are the same module under two routings: every expert (the dense function,
computed as one dense product, as the original FFN) and the routing under test, executed
sparsely. Every measurement is interleaved (dense, converted, dense, ...) after warm-up and
reported as the median; ratios are converted / dense, beside the FLOPs fraction of the same run.

1. Layer level: one FFN on real hidden states (captured from the model) at several token
   counts; each repetition takes another slice of tokens (another token for 1 token).
2. Whole model (fp32): prefill time for one prompt, and for causal LMs decode tokens/s with the
   KV cache at each batch size.

Mixture-of-Depths: dense is every block on every token (the same weights); top-k routing is
timed in prefill only (top-k needs the whole sequence), the causal decision in both.

Attention projections that d2d replaced (by MLPs, then experts) run, in the dense reference, as
linear layers of their original shape: the dense model is the one before the replacement.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import platform
import statistics
import time

import torch

from d2d import __version__
from d2d.data import encode_docs, lm_windows, load_corpus
from d2d.device import bf16_native
from d2d.errors import D2DError
from d2d.measure.evaluate import batches_for, forward
from d2d.measure.flops import fractions
from d2d.models import task_of
from d2d.nn import kernels
from d2d.nn.depth import mod_stats
from d2d.nn.policy import ALL as DENSE
from d2d.nn.projection import linear_projections, replacement_bytes
from d2d.nn.routing import collecting, routing
from d2d.nn.structure import cache_name, moe_layers
from d2d.options import parse_int_list
from d2d.progress import Progress


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "d2d": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "sparse_kernel": "available" if kernels.load() is not None else kernels.why_not(),
        "bf16_native": bf16_native("cpu"),
    }


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so that a clock read after it measures it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timer(fn, device: torch.device | str = "cpu"):
    """A callable(rep) for `interleaved` that times fn() alone (GPU work included)."""

    def timed(r):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - t0

    return timed


def interleaved(fns: dict, reps: int, warmup: int) -> dict[str, float]:
    """Median of the seconds each callable(rep) reports for itself (it times only the part
    that counts), the callables run in turn, rep after rep, after `warmup` rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + reps):
        for k, fn in fns.items():
            dt = fn(r)
            if r >= warmup:
                times[k].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def _inputs(art, cfg, layer: int, n_tokens: int) -> torch.Tensor:
    """Real FFN inputs of `layer`: the model run (every expert) on the calibration split, in
    256-token windows (a causal LM's first position left out: its hidden state, the attention
    sink's, is unlike any other token's and runs dense under the usual routing)."""
    moe = moe_layers(art.model, "ffn")[layer]
    causal = task_of(art.model) == "causal-lm"
    seq = 256
    # documents are padded to seq: ask for twice the tokens, keep the real ones
    batches = batches_for(art.model, art.tokenizer, cfg.data, "calib", seq, 2 * n_tokens, cfg.seed)
    got = []

    def hook(mod, args):
        x = args[0].detach()
        if causal and x.dim() == 3 and x.shape[1] > 1:
            x = x[:, 1:]
        got.append(x.reshape(-1, x.shape[-1]))

    h = moe.register_forward_pre_hook(hook)
    n = 0
    try:
        with routing(art.model, DENSE):
            for b in batches:
                forward(art.model, b, bf16=False)
                real = b.get("attention_mask")
                if real is not None:  # padding is not a token anyone pays for
                    real = real[:, 1:] if causal and real.shape[1] > 1 else real
                    got[-1] = got[-1][real.reshape(-1).bool()]
                n += len(got[-1])
                if n >= n_tokens:
                    break
    finally:
        h.remove()
    x = torch.cat(got)
    if len(x) < n_tokens:
        raise D2DError(
            f"data {cfg.data} gave {len(x)} tokens for the layer benchmark, fewer than "
            f"{n_tokens}: use more data or smaller --token-counts"
        )
    return x.contiguous()


def layer_bench(art, cfg, policies, progress: Progress) -> dict:
    moes = moe_layers(art.model, "ffn")
    layer = cfg.layer if cfg.layer >= 0 else sorted(moes)[len(moes) // 2]
    if layer not in moes:
        raise D2DError(f"layer {layer} is not converted: pick one of {sorted(moes)}")
    moe = moes[layer]
    counts = parse_int_list(cfg.token_counts, "token-counts")
    x = _inputs(art, cfg, layer, max(counts))
    dense_macs = moe.expert_macs() * moe.n_experts
    rows = []
    total = len(counts) * len(policies)
    for n in counts:
        span = len(x) - n + 1

        def slab(r, n=n, span=span):
            start = (r * max(n, 97)) % span  # another slice of tokens each repetition
            return x[start : start + n]

        for name, pol in policies:
            with routing(art.model, pol), collecting(art.model) as stats, torch.no_grad():
                for i in range(cfg.reps):
                    moe(slab(i))
                flops = moe.token_macs(stats[layer]) / dense_macs

            def run(pol_):
                def f(r):  # times the layer call only, not the switch of routing
                    xs = slab(r)
                    with routing(art.model, pol_), torch.no_grad():
                        t0 = time.perf_counter()
                        moe(xs)
                        return time.perf_counter() - t0

                return f

            t = interleaved({"dense": run(DENSE), "d2d": run(pol)}, cfg.reps, cfg.warmup)
            rows.append(
                {
                    "tokens": n,
                    "routing": name,
                    "flops_fraction": flops,
                    "dense_ms": 1e3 * t["dense"],
                    "d2d_ms": 1e3 * t["d2d"],
                    "time_fraction": t["d2d"] / t["dense"],
                }
            )
            progress("layer benchmark", len(rows), total)
    return {
        "layer": layer,
        "n_experts": moe.n_experts,
        "expert_size": moe.expert_size,
        "rows": rows,
    }


def model_bench(art, cfg, policies, progress: Progress) -> list[dict]:
    model = art.model
    causal = task_of(model) == "causal-lm"
    limit = getattr(model.config, "max_position_embeddings", None) or cfg.prompt_len
    plen = min(cfg.prompt_len, limit)
    corpus = load_corpus(cfg.data).split("calib", cfg.seed)
    if causal:
        prompt = {"input_ids": lm_windows(art.tokenizer, corpus, plen, 1), "use_cache": False}
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            prompt["logits_to_keep"] = 1  # as generate() prefills: the next token's logits only
    else:
        ids, mask, _ = encode_docs(art.tokenizer, corpus, plen, 1)
        prompt = {"input_ids": ids, "attention_mask": torch.ones_like(mask)}
    batches = parse_int_list(cfg.decode_batch, "decode-batch") if causal else []
    total = sum(1 + (len(batches) if p.get("depth") != "topk" else 0) for _, p in policies)
    rows = []

    def prefill(pol):
        def f(r):
            with routing(model, pol), _reference(model, pol), torch.no_grad():
                t0 = time.perf_counter()
                model(**prompt)
                return time.perf_counter() - t0

        return f

    for name, pol in policies:
        with routing(model, pol), collecting(model) as stats, mod_stats(model) as ds:
            with torch.no_grad():
                model(**prompt)
        last_only = "logits_to_keep" in prompt
        ffn_f, model_f = fractions(model, plen, causal, stats, ds, head=not last_only)
        t = interleaved({"dense": prefill(DENSE), "d2d": prefill(pol)}, cfg.reps, cfg.warmup)
        rows.append(
            {
                "measure": f"prefill {plen} tokens",
                "routing": name,
                "ffn_flops_fraction": ffn_f,
                "model_flops_fraction": model_f,
                "dense": 1e3 * t["dense"],
                "d2d": 1e3 * t["d2d"],
                "unit": "ms",
                "speedup": t["dense"] / t["d2d"],
            }
        )
        progress("model benchmark", len(rows), total)
        for b in batches if pol.get("depth") != "topk" else []:  # top-k cannot decode
            start = lm_windows(art.tokenizer, corpus, cfg.decode_prompt, b)

            def decode(pol_, start=start):
                def f(r):
                    with routing(model, pol_), _reference(model, pol_), torch.no_grad():
                        return decode_loop(model, start, cfg.new_tokens)

                return f

            with routing(model, pol), collecting(model) as stats, mod_stats(model) as ds:
                with torch.no_grad():
                    decode_loop(model, start, cfg.new_tokens, ds, stats)
            ctx = cfg.decode_prompt + cfg.new_tokens
            ffn_f, model_f = fractions(model, ctx, True, stats, ds)
            t = interleaved({"dense": decode(DENSE), "d2d": decode(pol)}, cfg.reps, cfg.warmup)
            tokens = b * cfg.new_tokens
            rows.append(
                {
                    "measure": f"decode, batch {b}",
                    "routing": name,
                    "ffn_flops_fraction": ffn_f,
                    "model_flops_fraction": model_f,
                    "dense": tokens / t["dense"],
                    "d2d": tokens / t["d2d"],
                    "unit": "tokens/s",
                    "speedup": t["dense"] / t["d2d"],
                }
            )
            progress("model benchmark", len(rows), total)
    return rows


def _reference(model, pol):
    """The dense reference runs attention projections that d2d replaced as the linear layers
    they were (an MLP with every neuron costs more than its projection)."""
    return linear_projections(model) if pol is DENSE else contextlib.nullcontext()


def decode_loop(
    model, prompt: torch.Tensor, n: int, dstats: dict | None = None, stats: dict | None = None
) -> float:
    """Prefill the prompt, then decode n tokens greedily with the KV cache; returns the seconds
    of the n decode steps only. `dstats` (Mixture-of-Depths counts) and `stats` (the MoE
    layers', from `collecting`) keep the decode steps' counts only, as the time does."""
    name = cache_name(model)
    out = model(input_ids=prompt, use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    for s in (dstats or {}).values():
        s.update(real=0, chosen=0, agree=0)
    for s in (stats or {}).values():
        s.reset()
    synchronize(prompt.device)
    t0 = time.perf_counter()
    for _ in range(n):
        out = model(input_ids=tok, use_cache=True, **{name: out[name]})
        tok = out.logits[:, -1:].argmax(-1)
    synchronize(prompt.device)
    return time.perf_counter() - t0


def memory(art) -> dict:
    """Tensor bytes of the converted model against the dense model's (routers, MoD predictors
    and the neuron permutation are what conversion adds; after a run under exact-value
    thresholds, also the threshold kernel's [d, f] copies of gate and up)."""
    from d2d.nn.structure import moe_layers

    total = added = 0
    for name, t in list(art.model.named_parameters()) + list(art.model.named_buffers()):
        b = t.numel() * t.element_size()
        total += b
        if ".router." in name or ".predictor." in name or name.endswith(".perm"):
            added += b
    derived = sum(m.derived_bytes() for m in moe_layers(art.model).values())
    # attention projections as MLPs or experts hold more than the projections they replaced
    added += replacement_bytes(art.model)
    total, added = total + derived, added + derived
    path = art.path / "model.safetensors" if art.path else None
    disk = path.stat().st_size if path and path.exists() else None
    return {
        "tensor_bytes": total,
        "dense_tensor_bytes": total - added,
        "ratio": total / max(1, total - added),
        "file_bytes": disk,
    }
