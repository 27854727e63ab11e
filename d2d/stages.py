"""The registry of stages, shared by the CLI and the recipe runner.

Each stage is one library function over an Artifact and a small validated config dataclass.
`run_stage` adds what every stage needs: loading the input, refusing a wrong stage order,
recording the lineage (resolved config, times, metrics, peak memory) and the atomic write.
"""

from __future__ import annotations

import os
import resource
import threading
import time
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from d2d.configs import (
    BenchConfig,
    CalibrateConfig,
    ConvertConfig,
    EvalConfig,
    ModConfig,
    SparsifyConfig,
    TrainRoutersConfig,
)
from d2d.dist import is_main_process
from d2d.errors import D2DError
from d2d.progress import Progress, null_progress

if TYPE_CHECKING:
    from d2d.artifact import Artifact

# stage functions import torch and friends when called: `d2d --help` stays fast


def _sparsify(art: Artifact, cfg: SparsifyConfig, progress: Progress, out=None):
    from d2d.sparsify import sparsify

    return sparsify(art, cfg, progress, out)


def _convert(art: Artifact, cfg: ConvertConfig, progress: Progress):
    from d2d.moe.convert import convert

    structure = convert(art.model, cfg, progress)
    metrics = {
        "converted_layers": len(structure["layers"]),
        "n_experts": structure["n_experts"],
        "expert_size": structure["expert_size"],
    }
    return metrics, structure


def _train_routers(art: Artifact, cfg: TrainRoutersConfig, progress: Progress):
    from d2d.moe.routers import train_routers

    metrics = train_routers(art.model, art.tokenizer, cfg, progress)
    return metrics, {"hidden": cfg.hidden}


def _calibrate(art: Artifact, cfg: CalibrateConfig, progress: Progress):
    from d2d.calibrate import calibrate
    from d2d.moe.routing import apply_routing

    record = calibrate(art.model, art.tokenizer, cfg, progress)
    chosen = record["rows"][record["choice"]]
    art.meta["calibration"] = record
    art.meta["routing"] = chosen["policy"]
    apply_routing(art.model, chosen["policy"])
    metrics = {k: chosen[k] for k in ("rule", "ffn_fraction", "model_fraction", "quality", "drop")}
    metrics["metric"] = record["metric"]
    metrics["dense_quality"] = record["dense_quality"]
    return metrics, {}


def _eval(art: Artifact, cfg: EvalConfig, progress: Progress):
    from d2d.evaluate import Evaluator, quality_drop
    from d2d.mod import mod_blocks
    from d2d.moe.convert import moe_layers
    from d2d.moe.routing import global_tau

    if cfg.tau is not None:
        if not moe_layers(art.model):
            raise D2DError("--tau needs a converted model: run d2d convert first")
        policy = global_tau(cfg.tau, art.meta.get("routing"))
    elif art.meta.get("routing"):
        policy = art.meta["routing"]
    elif moe_layers(art.model):
        raise D2DError("this artifact has no chosen tau: run d2d calibrate first, or pass --tau")
    else:
        policy = {"rule": "all"}
    ev = Evaluator(
        art.model, art.tokenizer, cfg.data, "heldout", cfg.seq_len, cfg.tokens, cfg.seed, cfg.bf16
    )
    runs = [("dense", {"rule": "all"}, "dense model")]
    blocks = mod_blocks(art.model)
    if blocks:  # routed blocks: the top-k choice and the causal decision
        runs += [
            ("d2d top-k", {**policy, "depth": "topk"}, "top-k routing"),
            ("d2d causal", {**policy, "depth": "causal"}, "causal routing"),
        ]
    else:
        runs.append(("d2d", policy, "converted model"))
    rows, dense = [], None
    for name, pol, label in runs:
        t0 = time.perf_counter()
        m = ev.measure(art.model, pol, progress, label)
        dense = dense or m
        rows.append(
            {
                "model": name,
                "metric": ev.metric,
                "quality": m.quality,
                "drop": quality_drop(ev.metric, m.quality, dense.quality),
                "ffn_fraction": m.ffn_fraction,
                "model_fraction": m.model_fraction,
                "seconds": time.perf_counter() - t0,
                "layer_fractions": m.layer_fractions,
                **({"depth": m.depth} if m.depth else {}),
            }
        )
    out = {"split": "heldout", "tokens": ev.tokens, "policy": policy, "rows": rows}
    if blocks:
        out["mod"] = {"layers": sorted(blocks), "capacity": next(iter(blocks.values())).capacity}
    return out, {}


def _mod(art: Artifact, cfg: ModConfig, progress: Progress, out=None):
    from d2d.mod_train import mod

    return mod(art, cfg, progress, out)


def _bench(art: Artifact, cfg: BenchConfig, progress: Progress):
    from d2d.bench import bench

    return bench(art, cfg, progress), {}


@dataclass(frozen=True)
class Stage:
    name: str
    config_cls: type
    run: Callable
    requires: tuple[str, ...] = ()
    writes_artifact: bool = True
    help: str = ""
    takes_out: bool = False  # the stage writes beside its output (checkpoints)
    before: tuple[str, ...] = ()  # stages that must not have run yet


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "sparsify",
            SparsifyConfig,
            _sparsify,
            (),
            help="Fine-tune with a sparsity penalty on FFN activations (before convert).",
            takes_out=True,
            before=("convert",),
        ),
        Stage(
            "convert",
            ConvertConfig,
            _convert,
            (),
            help="Split every FFN into equal-size experts (same function, new structure).",
        ),
        Stage(
            "train-routers",
            TrainRoutersConfig,
            _train_routers,
            ("convert",),
            help="Train per-layer routers that predict each expert's output norm.",
        ),
        Stage(
            "calibrate",
            CalibrateConfig,
            _calibrate,
            ("convert", "train-routers"),
            help="Sweep tau, measure FLOPs and quality, choose the operating point.",
        ),
        Stage(
            "eval",
            EvalConfig,
            _eval,
            (),
            writes_artifact=False,
            help="Quality and FLOPs on held-out data, beside the dense model.",
        ),
        Stage(
            "mod",
            ModConfig,
            _mod,
            (),
            help="Mixture-of-Depths: insert block routers into a decoder and fine-tune them in.",
            takes_out=True,
        ),
        Stage(
            "bench",
            BenchConfig,
            _bench,
            (),  # a converted or a Mixture-of-Depths artifact: bench() checks
            writes_artifact=False,
            help="Wall-clock time of a converted / MoD model against the dense one (ratios).",
        ),
    )
}


def make_config(stage: str, options: dict):
    """Build a stage config from a dict of options; unknown options are an error."""
    spec = STAGES[stage]
    names = {f.name for f in fields(spec.config_cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise D2DError(
            f"{stage} has no option {unknown[0]!r}: options are {', '.join(sorted(names))}"
        )
    hints = typing.get_type_hints(spec.config_cls)
    typed = {k: _typed(stage, k, hints[k], v) for k, v in options.items()}
    try:
        return spec.config_cls(**typed)
    except TypeError as e:
        raise D2DError(f"bad options for {stage}: {e}") from None


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _typed(stage: str, name: str, tp, value):
    """Check an option's value against its field type (recipes and overrides are untyped
    YAML); numbers given for a text option (a tau list of one, a layer index) become text."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    if value is None and type(None) in typing.get_args(tp):
        return None
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is bool and isinstance(value, bool):
        return value
    if base is int and is_num and float(value).is_integer():
        return int(value)
    if base is float and is_num:
        return float(value)
    if base is str and (isinstance(value, str) or is_num):
        return str(value)
    if base not in _KINDS:
        return value
    raise D2DError(f"{stage} option {name.replace('_', '-')} must be {_KINDS[base]}, got {value!r}")


def open_input(spec: str, trust_remote_code: bool = False) -> Artifact:
    from d2d.artifact import Artifact, is_artifact, load_artifact, new_meta
    from d2d.models import load_base

    if is_artifact(spec):
        return load_artifact(spec, trust_remote_code)
    loaded = load_base(spec, trust_remote_code)
    return Artifact(loaded.model, loaded.tokenizer, new_meta(loaded.source, loaded.model), None)


class PeakMemory:
    """Peak resident memory during a block, sampled from /proc (the process-wide maximum of
    getrusage would include earlier stages of the same recipe run)."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()

    @staticmethod
    def _rss_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    def __enter__(self):
        self.peak_mb = self._rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss_mb())
        return False


def run_stage(
    stage: str,
    input: str | Artifact,
    cfg,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress = null_progress,
    trust_remote_code: bool = False,
) -> dict:
    """Run one stage; write its artifact to `out` (stages that write one). Returns the record.
    `trust_remote_code` lets a model folder run its own code (never done otherwise)."""
    spec = STAGES[stage]
    if spec.writes_artifact and out is None:
        raise D2DError(f"{stage} writes an artifact: give --out DIR")
    if out is not None and Path(out).exists() and not overwrite and spec.writes_artifact:
        raise D2DError(f"output {out} already exists: choose another --out or pass --overwrite")
    from d2d.artifact import Artifact, save

    art = input if isinstance(input, Artifact) else open_input(input, trust_remote_code)
    art.require(*spec.requires, for_stage=stage)
    for later in spec.before:
        if art.has_stage(later):
            raise D2DError(
                f"{stage} must come before {later}: run it on the model before d2d {later}"
            )
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        kw = {"out": out} if spec.takes_out else {}
        metrics, structure = spec.run(art, cfg, progress, **kw)
    record = {
        "stage": stage,
        "config": asdict(cfg),
        "parent": str(art.path) if art.path else art.meta["base"]["source"],
        "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_mb": round(mem.peak_mb, 1),
        "metrics": metrics,
    }
    if structure:
        record["structure"] = structure
    if spec.writes_artifact:
        art.meta = {**art.meta, "stages": [*art.stages, record]}
        if is_main_process():  # under a multi-process launcher, one process writes
            save(art, out, overwrite)
        art.path = Path(out)
    return record
