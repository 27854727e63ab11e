"""`d2d bench`: wall-clock time of a converted (or Mixture-of-Depths) model against its dense
self, in one run (d2d.measure.timing): one FFN layer at several token counts, whole-model
prefill, and decode with the KV cache; ratios beside the FLOPs fractions, memory, machine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from d2d.errors import D2DError
from d2d.options import parse_int_list, parse_taus
from d2d.progress import Progress, null_progress
from d2d.stages.base import Stage, Table, pct


@dataclass
class BenchConfig:
    data: str = field(
        default="bbc-news", metadata={"help": "Text for real hidden states and prompts."}
    )
    taus: str = field(
        default="",
        metadata={
            "help": "Global taus to measure, one value or a comma list (default: the "
            "calibrated routing; --taus: the same).",
            "flag": "tau",
        },
    )
    token_counts: str = field(
        default="1,16,512,4096", metadata={"help": "Token counts for the one-layer benchmark."}
    )
    layer: int = field(default=-1, metadata={"help": "Layer to benchmark (-1: the middle one)."})
    model: bool = field(default=True, metadata={"help": "Also time the whole model."})
    prompt_len: int = field(default=512, metadata={"help": "Prompt tokens for prefill timing."})
    decode_batch: str = field(default="1,8", metadata={"help": "Batch sizes for decode timing."})
    decode_prompt: int = field(default=32, metadata={"help": "Prompt tokens before decoding."})
    new_tokens: int = field(default=32, metadata={"help": "Tokens decoded per measurement."})
    reps: int = field(default=10, metadata={"help": "Timed repetitions (medians are reported)."})
    warmup: int = field(default=2, metadata={"help": "Untimed repetitions first."})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)."})
    seed: int = field(default=0, metadata={"help": "Seed of the data split."})
    execution: str = field(
        default="auto",
        metadata={
            "help": "auto: a call that its routing cannot make faster than the dense product "
            "(exact-value thresholds on a prompt or a decoding batch) runs every expert, "
            "counted so in the FLOPs; sparse: every call routed."
        },
    )

    def __post_init__(self):
        if self.execution not in ("auto", "sparse"):
            raise D2DError(f"execution must be auto or sparse, got {self.execution!r}")
        if self.taus:
            parse_taus(self.taus)
        parse_int_list(self.token_counts, "token-counts")
        parse_int_list(self.decode_batch, "decode-batch")
        for name in ("prompt_len", "decode_prompt", "new_tokens", "reps"):
            if getattr(self, name) < 1:
                raise D2DError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.threads < 0:
            raise D2DError("warmup and threads must be >= 0")


def policies(art, taus: str = "") -> list[tuple[str, dict]]:
    """(label, policy) to time: the chosen routing or the given global taus; for routed blocks
    each under top-k and under the causal decision."""
    from d2d.nn.depth import mod_blocks, skip_text
    from d2d.nn.policy import global_tau, label
    from d2d.nn.structure import moe_layers

    out = []
    if art.meta.get("routing") and not taus:
        out.append((f"chosen ({label(art.meta['routing'])})", art.meta["routing"]))
    for t in parse_taus(taus) if taus else []:
        out.append((f"tau {t:g}", global_tau(t, art.meta.get("routing"))))
    blocks = mod_blocks(art.model)
    if blocks and not moe_layers(art.model):
        out.append(("", {}))  # the FFNs as they are
    if not out:
        raise D2DError("this artifact has no chosen routing: run d2d calibrate, or pass --tau")
    if not blocks:
        return out
    b = next(iter(blocks.values()))
    caps = sorted({blk.capacity for blk in blocks.values()})
    cap = f"capacity {caps[0]:g}" if len(caps) == 1 else f"capacities {caps[0]:g}-{caps[-1]:g}"
    what = f"{cap}, skipping {skip_text(b.skip, b.keep_kv)}"
    return [
        (f"{name}{', ' if name else ''}MoD {mode} ({what})", {**pol, "depth": mode})
        for name, pol in out
        for mode in ("topk", "causal")
    ]


def bench(art, cfg: BenchConfig, progress: Progress = null_progress) -> dict:
    import torch

    from d2d.measure.flops import dense_ffn_macs
    from d2d.measure.timing import layer_bench, machine, memory, model_bench
    from d2d.nn.depth import mod_blocks
    from d2d.nn.routing import execution
    from d2d.nn.structure import moe_layers

    moes = moe_layers(art.model)
    if not moes and not mod_blocks(art.model):
        raise D2DError(
            "bench compares a converted model with its dense self: run d2d convert or d2d mod"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    art.model.float().eval()
    pols = policies(art, cfg.taus)
    out = {"machine": machine(), "config": asdict(cfg)}
    moe_policies = [(n, p) for n, p in pols if p.get("depth") != "topk"]
    with execution(art.model, cfg.execution):
        out["layer"] = layer_bench(art, cfg, moe_policies, progress) if moes else None
        out["model"] = model_bench(art, cfg, pols, progress) if cfg.model else []
    out["memory"] = memory(art)
    out["dense_ffn_macs_per_token"] = sum(dense_ffn_macs(art.model))
    return out


def run(art, cfg: BenchConfig, progress):
    return bench(art, cfg, progress), {}


def view(record: dict) -> list:
    """Time ratios (converted / dense) beside FLOPs fractions, and the machine."""
    m = record["metrics"]
    out: list = []
    lay = m["layer"]
    if lay:
        t = Table(
            f"one FFN layer (layer {lay['layer']}: {lay['n_experts']} experts of "
            f"{lay['expert_size']}); medians, converted / dense",
            ["tokens", "routing", "FLOPs", "time", "time / FLOPs", "dense", "d2d"],
            left=("routing",),
        )
        for r in lay["rows"]:
            t.add(
                r["tokens"],
                r["routing"],
                pct(r["flops_fraction"]),
                pct(r["time_fraction"]),
                f"{r['time_fraction'] / r['flops_fraction']:.2f}",
                f"{r['dense_ms']:.3f} ms",
                f"{r['d2d_ms']:.3f} ms",
            )
        out.append(t)
    if m["model"]:
        t = Table(
            "whole model (fp32); speed-up = dense time / converted time",
            ["measure", "routing", "FFN FLOPs", "model FLOPs", "dense", "d2d", "speed-up"],
            left=("measure", "routing"),
        )
        for r in m["model"]:
            t.add(
                r["measure"],
                r["routing"],
                pct(r["ffn_flops_fraction"]),
                pct(r["model_flops_fraction"]),
                f"{r['dense']:.1f} {r['unit']}",
                f"{r['d2d']:.1f} {r['unit']}",
                f"{r['speedup']:.2f}x",
            )
        out.append(t)
    if m["config"].get("execution", "sparse") == "auto":
        out.append(
            "execution auto: calls that exact-value thresholds cannot make faster than the "
            "dense product (more tokens than the threshold kernel takes) run every expert; "
            "the FLOPs above count them so (--execution sparse routes every call)"
        )
    mem, mach = m["memory"], m["machine"]
    out.append(
        f"memory: tensors {mem['tensor_bytes'] / 2**20:.1f} MB = {mem['ratio']:.3f} x the dense "
        f"model's ({mem['dense_tensor_bytes'] / 2**20:.1f} MB; routers, predictors, the "
        "neuron permutation, the sparse kernels' copies of gate and up, and attention "
        "projections' MLPs beyond the projections they replaced are the difference)"
    )
    out.append(
        f"machine: {mach['cpu']}, {mach['torch_threads']} torch threads of "
        f"{mach['cpu_count']} CPUs, torch {mach['torch']}, sparse kernel: "
        f"{mach['sparse_kernel']}, native bf16: {'yes' if mach.get('bf16_native') else 'no'}"
    )
    return out


STAGE = Stage(
    "bench",
    BenchConfig,
    run,
    help="Wall-clock time of a converted / MoD model against the dense one (ratios).",
    writes_artifact=False,
    view=view,
)
