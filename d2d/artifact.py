"""Artifacts: an HF model folder plus d2d.json (format, versions, lineage, routing).

Structure is replayed from d2d.json (no data needed), then weights load strictly from
model.safetensors. Nothing is unpickled. Writes go to a temporary folder beside the target,
renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from d2d import __version__
from d2d.errors import D2DError, StageOrderError

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


def last_stage(meta: dict, name: str) -> dict | None:
    """The latest record of stage `name` in a lineage, or None."""
    return next((s for s in reversed(meta.get("stages", [])) if s["stage"] == name), None)


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def new_meta(source: str, model: nn.Module) -> dict:
    import transformers

    from d2d.models import task_of

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


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder; on success it replaces `out`, on any failure it vanishes."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise D2DError(f"output {out} already exists: choose another --out or pass --overwrite")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise D2DError(
            f"cannot write {out}: {blocker} is a file, not a folder; choose another --out"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the artifact is an ordinary folder
    except OSError as e:
        raise D2DError(f"cannot write to {out.parent} ({e.strerror}): use a writable --out") from e
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{int(time.time() * 1000)}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, D2DError):
            raise D2DError(
                f"could not write {out} ({e.strerror or e}): check the disk and "
                "permissions, then re-run"
            ) from e
        raise


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
        (tmp / META).write_text(json.dumps(art.meta, indent=2, default=_json_default) + "\n")
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


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a file through a temporary file in the same folder, then rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        raise D2DError(f"cannot write {path} ({e.strerror}): choose a writable path") from e
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; this is an ordinary file
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise D2DError(f"could not write {path} ({e.strerror or e}): check the disk") from e
        raise
    return path


def write_json_atomic(path: str | Path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def replay(model: nn.Module, meta: dict) -> None:
    """Rebuild the structural changes recorded in the lineage (no weights, no data)."""
    from d2d.mod import insert_mod, set_mode
    from d2d.moe.convert import build_structure, moe_layers
    from d2d.moe.routers import attach_routers
    from d2d.sparsify import relufy

    for s in meta["stages"]:
        st = s.get("structure") or {}
        if s["stage"] == "sparsify" and st.get("relu"):
            relufy(model)
        elif s["stage"] == "convert":
            build_structure(model, st["layers"], st["n_experts"])
        elif s["stage"] == "train-routers":
            attach_routers(moe_layers(model), st["hidden"])
        elif s["stage"] == "mod":
            blocks = insert_mod(model, st["layers"], st["capacity"], st.get("sink", 0))
            if st.get("predictor") == "mlp":
                for b in blocks.values():
                    b.add_predictor(st["hidden"])
            set_mode(model, "causal")  # generation needs the causal decision


def load_artifact(path: str | Path, trust_remote_code: bool = False) -> Artifact:
    """Load an artifact folder written by d2d: structure from d2d.json, weights strictly."""
    from transformers import AutoConfig, AutoTokenizer

    from d2d.models import auto_class, check_folder

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
    from d2d.moe.routing import apply_routing

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


def load(path: str | Path, trust_remote_code: bool = False) -> nn.Module:
    """The model of an artifact, ready to run at its chosen routing (if calibrated)."""
    return load_artifact(path, trust_remote_code).model
