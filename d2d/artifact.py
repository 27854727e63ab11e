"""Artifacts: an HF model folder plus d2d.json (format, versions, lineage, routing).

Structure is replayed from d2d.json (no data needed; each stage's replay comes from the stage
registry, which passes it in), then weights load strictly from model.safetensors. Nothing is
unpickled. Writes go through d2d.io's atomic folder: complete or absent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from d2d import __version__
from d2d.errors import D2DError, StageOrderError
from d2d.io import atomic_dir, json_default
from d2d.lineage import last_stage
from d2d.models import auto_class, check_folder, task_of
from d2d.nn.routing import apply_routing

# 2: MoE down projections (w_out) stored [f, d]; format 1 stored them [d, f] (read by transposing)
FORMAT_VERSION = 2
META = "d2d.json"
WEIGHTS = "model.safetensors"


@dataclass
class Artifact:
    """A model in memory with its tokenizer and lineage."""

    model: nn.Module
    tokenizer: object
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def stages(self) -> list[dict]:
        return self.meta.get("stages", [])

    def has_stage(self, name: str) -> bool:
        return any(s["stage"] == name for s in self.stages)

    def require(self, *names: str, for_stage: str) -> None:
        for n in names:
            if not self.has_stage(n):
                raise StageOrderError(
                    f"{for_stage} needs an artifact that went through '{n}' first: "
                    f"run d2d {n} on it, then d2d {for_stage}"
                )

    def structure(self, stage: str) -> dict:
        s = last_stage(self.meta, stage)
        return s.get("structure", {}) if s else {}


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def new_meta(source: str, model: nn.Module) -> dict:
    import transformers

    return {
        "format_version": FORMAT_VERSION,
        "d2d_version": __version__,
        "base": {
            "source": source,
            "model_class": type(model).__name__,
            "task": task_of(model),
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "stages": [],
        "routing": None,
        "calibration": None,
    }


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise D2DError(f"{path / META} is not valid JSON ({e}): restore it or re-run") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("stages"), list):
        raise D2DError(f"{path / META} is malformed (no stage list): restore it or re-run")
    fv = meta.get("format_version")
    if not isinstance(fv, int):
        raise D2DError(f"{path / META} has no format_version: restore it or re-run the stage")
    if fv > FORMAT_VERSION:
        raise D2DError(
            f"{path} was written by a newer d2d (format {fv} > {FORMAT_VERSION}): upgrade d2d"
        )
    bad = f"{path / META} is malformed"
    for s in meta["stages"]:
        if not isinstance(s, dict) or not isinstance(s.get("stage"), str):
            raise D2DError(f"{bad} (a stage entry without a name): restore it or re-run")
        for key in ("config", "metrics", "structure"):
            if not isinstance(s.get(key, {}), dict):
                raise D2DError(f"{bad} (stage {s['stage']}: {key} is not a mapping): restore it")
    if not isinstance(meta.get("base"), dict) or not isinstance(
        meta["base"].get("model_class"), str
    ):
        raise D2DError(f"{bad} (no base model record): restore it or re-run")
    for key in ("routing", "calibration"):
        if not isinstance(meta.get(key) or {}, dict):
            raise D2DError(f"{bad} ({key} is not a mapping): restore it or re-run")
    if not isinstance(meta.get("model_class") or "", str):
        raise D2DError(f"{bad} (model_class is not a string): restore it or re-run")
    return meta


def save(art: Artifact, out: str | Path, overwrite: bool = False) -> Path:
    """Write the artifact atomically. The input folder is never touched."""
    out = Path(out)
    if art.path is not None and out.resolve() == Path(art.path).resolve():
        raise D2DError(f"--out {out} is the input artifact: write to a new folder")
    with atomic_dir(out, overwrite) as tmp:
        art.model.config.save_pretrained(tmp)
        save_model(art.model, str(tmp / WEIGHTS), metadata={LINEAGE_KEY: _structure_key(art.meta)})
        if art.tokenizer is not None:
            art.tokenizer.save_pretrained(tmp)
        (tmp / META).write_text(json.dumps(art.meta, indent=2, default=json_default) + "\n")
    return out


LINEAGE_KEY = "d2d_structure"


def _structure_key(meta: dict) -> str:
    """The structural part of the lineage, stored in the weights file's header too, so that a
    d2d.json edited (or swapped) after the fact is caught even where the shapes still fit."""
    return json.dumps([[s["stage"], s.get("structure") or {}] for s in meta["stages"]])


def _check_structure(path: Path, meta: dict) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path / WEIGHTS), "pt") as f:
            stored = (f.metadata() or {}).get(LINEAGE_KEY)
    except (SafetensorError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise D2DError(
            f"{path / WEIGHTS} is unreadable or corrupt ({first}): restore it or re-run the stage"
        ) from e
    if stored is not None and stored != _structure_key(meta):
        raise D2DError(
            f"{path / WEIGHTS} disagrees with {META}: the weights were written for another "
            "structure (the lineage was edited or swapped); restore d2d.json or re-run"
        )


# replays a lineage's structural changes on a freshly built model (d2d.stages.replay)
Replay = Callable[[nn.Module, dict], None]


def read_artifact(path: str | Path, replay: Replay, trust_remote_code: bool = False) -> Artifact:
    """Load an artifact folder written by d2d: structure from d2d.json (`replay`), weights
    strictly. `d2d.load_artifact` calls this with the stage registry's replay."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise D2DError(f"{path} does not exist: check the path")
    if not is_artifact(path):
        raise D2DError(f"{path} is not a d2d artifact (no {META})")
    meta = read_meta(path)
    if not (path / WEIGHTS).is_file():
        raise D2DError(f"{path} has no {WEIGHTS}: the artifact is incomplete, re-run the stage")
    check_folder(path, str(path), trust_remote_code)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    # a stage may have changed the head (sparsify adds a classifier to a bare encoder)
    cls = auto_class([meta.get("model_class") or meta["base"]["model_class"]])
    # built on the CPU, not the meta device: non-persistent buffers (rotary tables) must be real
    model = cls.from_config(config, trust_remote_code=trust_remote_code).float()
    try:
        replay(model, meta)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        raise D2DError(f"{path / META} has an incomplete stage record ({e}): re-run") from e
    _check_structure(path, meta)
    try:
        missing, unexpected = _load_weights(model, path / WEIGHTS, meta["format_version"])
    except (SafetensorError, OSError, RuntimeError) as e:
        first = str(e).splitlines()[0]
        raise D2DError(
            f"{path / WEIGHTS} is unreadable or corrupt ({first}): restore it or re-run the stage"
        ) from e
    missing = _untied_missing(model, missing)
    if missing or unexpected:
        raise D2DError(
            f"{path / WEIGHTS} disagrees with {META}: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}; the artifact was changed by hand, re-run the stage"
        )
    model.eval()
    tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    art = Artifact(model, tok, meta, path)
    if meta.get("routing"):
        try:
            apply_routing(model, meta["routing"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise D2DError(f"{path / META} has a malformed routing ({e}): re-run calibrate") from e
    return art


def _load_weights(model: nn.Module, file: Path, format_version: int):
    if format_version >= 2:
        return load_model(model, str(file), strict=False)
    from safetensors.torch import load_file

    sd = load_file(str(file))  # format 1: MoE down projections were [d, f]
    for k, v in sd.items():
        if k.endswith(".w_out") and v.dim() == 2:
            sd[k] = v.t().contiguous()
    return model.load_state_dict(sd, strict=False)


def _untied_missing(model: nn.Module, missing: list[str]) -> list[str]:
    """Missing names that are not aliases of a loaded tensor (safetensors stores one of each)."""
    sd = model.state_dict(keep_vars=True)
    loaded = {id(v) for k, v in sd.items() if k not in set(missing)}
    return [k for k in missing if id(sd[k]) not in loaded]
