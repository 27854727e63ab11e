"""The registry of stages, shared by the CLI, the recipe runner, `d2d.load`, inspect and report.

Each stage is one module (d2d/stages/<name>.py) that declares a `Stage`: its config dataclass,
its run, its structural replay, its summary and its terminal view. `run_stage` adds what every
stage needs: loading the input, refusing a wrong stage order, recording the lineage (resolved
config, times, metrics, peak memory) and the atomic write. Nothing here imports torch until a
stage runs, so `d2d --help` stays fast.
"""

from __future__ import annotations

import time
import typing
from dataclasses import asdict, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from d2d.errors import D2DError
from d2d.progress import Progress, null_progress
from d2d.stages import attention_mlp as _attention_mlp
from d2d.stages import bench as _bench
from d2d.stages import calibrate as _calibrate
from d2d.stages import convert as _convert
from d2d.stages import evaluation as _evaluation
from d2d.stages import heal as _heal
from d2d.stages import mod as _mod
from d2d.stages import sparsify as _sparsify
from d2d.stages import train_routers as _train_routers
from d2d.stages.base import Record, Stage

if TYPE_CHECKING:
    from d2d.artifact import Artifact

__all__ = [
    "STAGES",
    "AttentionMLPConfig",
    "BenchConfig",
    "CalibrateConfig",
    "ConvertConfig",
    "EvalConfig",
    "HealConfig",
    "ModConfig",
    "SparsifyConfig",
    "TrainRoutersConfig",
    "convert",
    "load_artifact",
    "make_config",
    "run_stage",
]

STAGES: dict[str, Stage] = {
    m.STAGE.name: m.STAGE
    for m in (
        _sparsify,
        _convert,
        _train_routers,
        _calibrate,
        _heal,
        _evaluation,
        _mod,
        _attention_mlp,
        _bench,
    )
}
# the configs (and convert, usable on its own) where library users look for them
AttentionMLPConfig = _attention_mlp.AttentionMLPConfig
BenchConfig = _bench.BenchConfig
CalibrateConfig = _calibrate.CalibrateConfig
ConvertConfig = _convert.ConvertConfig
EvalConfig = _evaluation.EvalConfig
HealConfig = _heal.HealConfig
ModConfig = _mod.ModConfig
SparsifyConfig = _sparsify.SparsifyConfig
TrainRoutersConfig = _train_routers.TrainRoutersConfig
convert = _convert.convert


def option_names(stage: str) -> dict[str, str]:
    """Every accepted option name of a stage -> its config field (a field's "flag" metadata
    names its primary spelling; the field name is always accepted too)."""
    out = {}
    for f in fields(STAGES[stage].config_cls):
        out[f.name] = f.name
        if "flag" in f.metadata:
            out[f.metadata["flag"].replace("-", "_")] = f.name
    return out


def make_config(stage: str, options: dict):
    """Build a stage config from a dict of options; unknown options are an error."""
    spec = STAGES[stage]
    names = option_names(stage)
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise D2DError(
            f"{stage} has no option {unknown[0]!r}: options are {', '.join(sorted(names))}"
        )
    hints = typing.get_type_hints(spec.config_cls)
    typed = {}
    for k, v in options.items():
        name = names[k]
        if name in typed:
            raise D2DError(f"{stage} option {k!r} is given twice (as {name!r} too): give it once")
        typed[name] = _typed(stage, name, hints[name], v)
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


def replay(model, meta: dict) -> None:
    """Rebuild the structural changes a lineage records (no weights, no data)."""
    for s in meta["stages"]:
        spec = STAGES.get(s["stage"])
        if spec is None:
            raise ValueError(f"unknown stage {s['stage']!r}")
        if spec.replay is not None:
            spec.replay(model, s.get("structure") or {})


def load_artifact(path: str | Path, trust_remote_code: bool = False) -> Artifact:
    """Load an artifact folder written by d2d: structure replayed, weights loaded strictly."""
    from d2d.artifact import read_artifact

    return read_artifact(path, replay, trust_remote_code)


def open_input(spec: str | Path, trust_remote_code: bool = False) -> Artifact:
    """A stage's input: a d2d artifact, or a base model (alias, folder, GGUF, cached hub id)."""
    from d2d.artifact import Artifact, is_artifact, new_meta
    from d2d.models import load_base

    if is_artifact(spec):
        return load_artifact(spec, trust_remote_code)
    loaded = load_base(str(spec), trust_remote_code)
    return Artifact(loaded.model, loaded.tokenizer, new_meta(loaded.source, loaded.model), None)


def run_stage(
    stage: str,
    input: str | Artifact,
    cfg,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress = null_progress,
    trust_remote_code: bool = False,
) -> Record:
    """Run one stage; write its artifact to `out` (stages that write one). Returns the record.
    `trust_remote_code` lets a model folder run its own code (never done otherwise)."""
    spec = STAGES[stage]
    if spec.writes_artifact and out is None:
        raise D2DError(f"{stage} writes an artifact: give --out DIR")
    if out is not None and Path(out).exists() and not overwrite and spec.writes_artifact:
        raise D2DError(f"output {out} already exists: choose another --out or pass --overwrite")
    from d2d.artifact import Artifact, save
    from d2d.device import device_type, use_bf16
    from d2d.dist import is_main_process
    from d2d.measure.memory import PeakMemory

    art = input if isinstance(input, Artifact) else open_input(input, trust_remote_code)
    art.require(*spec.requires, for_stage=stage)
    for later in spec.must_precede:
        if art.has_stage(later):
            raise D2DError(
                f"{stage} must come before {later}: run it on the model before d2d {later}"
            )
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        kw = {"out": out} if spec.takes_out else {}
        metrics, structure = spec.run(art, cfg, progress, **kw)
    record = Record(
        stage=stage,
        config=asdict(cfg),
        parent=str(art.path) if art.path else art.meta["base"]["source"],
        started=started,
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        seconds=round(time.perf_counter() - t0, 2),
        peak_rss_mb=round(mem.peak_mb, 1),
        # bf16 was asked for and the hardware runs it natively (else the stage computed in fp32)
        bf16_autocast=use_bf16(getattr(cfg, "bf16", False), device_type()),
        metrics=metrics,
    )
    if structure:
        record["structure"] = structure
    if spec.writes_artifact:
        art.meta = {**art.meta, "stages": [*art.stages, dict(record)]}
        if is_main_process():  # under a multi-process launcher, one process writes
            save(art, out, overwrite)
        art.path = Path(out)
    record.meta = art.meta
    return record


def summary(record: dict) -> str:
    """One line of a stage record's outcome (inspect's lineage), or "" where the record lacks
    what the summary reads (an older or a partial record)."""
    spec = STAGES.get(record.get("stage"))
    try:
        return spec.summary(record) if spec else ""
    except (KeyError, TypeError):
        return ""
