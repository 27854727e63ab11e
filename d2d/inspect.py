"""What an artifact (or a plain model folder) is, read from its files without building the model.

`describe` reads config.json, d2d.json and the safetensors header (tensor names, shapes and
dtypes, no tensor data), so it is fast on any size of model and never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from d2d.artifact import WEIGHTS, is_artifact, read_meta
from d2d.errors import D2DError
from d2d.stages import STAGES, summary

_LAYERS = ("num_hidden_layers", "n_layer", "num_layers")
_HIDDEN = ("hidden_size", "n_embd", "d_model")
_FFN = ("intermediate_size", "n_inner", "ffn_dim")


def _first(cfg: dict, names: tuple[str, ...]):
    return next((cfg[n] for n in names if cfg.get(n) is not None), None)


def weights_summary(path: Path) -> dict:
    """Tensor count, parameter count, dtypes and bytes from the safetensors header."""
    from safetensors import SafetensorError, safe_open

    f = path / WEIGHTS
    if not f.is_file():
        raise D2DError(f"{path} has no {WEIGHTS}: the artifact is incomplete, re-run the stage")
    params, dtypes, groups = 0, {}, {"experts": 0, "routers": 0}
    try:
        with safe_open(str(f), "pt") as st:
            names = list(st.keys())
            for k in names:
                sl = st.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                params += n
                dt = str(sl.get_dtype())
                dtypes[dt] = dtypes.get(dt, 0) + n
                if ".router." in k:
                    groups["routers"] += n
                elif k.rsplit(".", 1)[-1] in ("w_in", "w_gate", "w_out", "b_in", "b_gate"):
                    groups["experts"] += n
    except (SafetensorError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise D2DError(f"{f} is unreadable or corrupt ({first}): restore it or re-run") from e
    return {
        "tensors": len(names),
        "parameters": params,
        "dtypes": dtypes,
        "file_bytes": f.stat().st_size,
        **{f"{k}_parameters": v for k, v in groups.items()},
    }


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def describe_folder(path: str | Path) -> dict:
    """A JSON-able summary of a d2d artifact or an HF model folder."""
    path = Path(path)
    if not path.exists():
        raise D2DError(f"{path} does not exist: check the path")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise D2DError(f"{path} is not a model folder (no config.json): pass a d2d artifact")
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise D2DError(f"{path / 'config.json'} is not valid JSON ({e}): restore it") from e
    if not isinstance(cfg, dict):
        raise D2DError(f"{path / 'config.json'} is not a JSON object: restore it")
    out = {
        "path": str(path),
        "artifact": is_artifact(path),
        "model": {
            "model_type": cfg.get("model_type"),
            "architecture": (cfg.get("architectures") or [None])[0],
            "layers": _first(cfg, _LAYERS),
            "hidden": _first(cfg, _HIDDEN),
            "ffn": _first(cfg, _FFN),
            "activation": cfg.get("hidden_act") or cfg.get("activation_function"),
        },
        "weights": weights_summary(path),
        "size_bytes": folder_bytes(path),
    }
    if not out["artifact"]:
        return out
    meta = read_meta(path)
    out["format_version"] = meta["format_version"]
    out["d2d_version"] = meta.get("d2d_version")
    out["versions"] = meta.get("versions", {})
    out["base"] = meta.get("base", {})
    out["stages"] = [
        {
            "stage": s["stage"],
            "finished": s.get("finished"),
            "seconds": s.get("seconds"),
            "peak_rss_mb": s.get("peak_rss_mb"),
            "summary": summary(s),
        }
        for s in meta["stages"]
    ]
    out["routing"] = meta.get("routing")
    for spec in STAGES.values():  # each stage adds what it knows ("moe", "mod", "calibration")
        out.update(spec.about(meta) or {})
    return out
