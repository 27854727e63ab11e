"""Recipes: an ordered list of stages with their options, in YAML.

    model: minilm-l6           # INPUT of the first stage
    data: bbc-news             # default --data of every stage that reads data
    out: runs/quickstart       # stage i writes out/<i>-<stage>; eval writes out/<i>-eval.json
    report: true               # optional: d2d report of the last artifact into out/report
    stages:
      - sparsify: {steps: 300}   # optional; resumes from its checkpoints after a crash
      - convert: {expert_size: 16}
      - train-routers: {steps: 300}
      - calibrate: {}
      - eval: {}

Stages are looked up in d2d's own registry only.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, fields
from pathlib import Path

import yaml

from d2d.artifact import META, read_meta
from d2d.errors import D2DError
from d2d.io import write_json_atomic, write_text_atomic
from d2d.progress import Progress, null_progress
from d2d.report import build_report
from d2d.stages import STAGES, make_config, run_stage
from d2d.train import latest_checkpoint


def _coerce(value: str):
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def parse_recipe(text: str, overrides: list[str] = ()) -> dict:
    """Validate a recipe; overrides are key=value (top level) or stage.key=value."""
    try:
        r = yaml.safe_load(text)  # plain data only: no tags that build Python objects
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise D2DError(
            f"the recipe is not valid YAML ({first}): fix it (plain YAML only)"
        ) from None
    if not isinstance(r, dict):
        raise D2DError("a recipe is a mapping with model, out and stages (see recipes/)")
    parsed = []
    for ov in overrides:
        key, eq, val = ov.partition("=")
        stage, dot, opt = key.partition(".")
        if not eq or not key or (dot and not (stage and opt)):
            raise D2DError(f"override {ov!r} is not key=value or stage.key=value")
        if not dot and key == "stages":
            raise D2DError("the stage list cannot be overridden: edit the recipe")
        parsed.append((stage if dot else None, opt if dot else key, _coerce(val)))
    for stage, key, val in parsed:
        if stage is None:
            r[key] = val
    if not isinstance(r.get("stages"), list) or not r["stages"]:
        raise D2DError("a recipe needs a non-empty 'stages' list (see recipes/quickstart.yaml)")
    for key in ("model", "out"):
        if not isinstance(r.get(key), str) or not r[key]:
            raise D2DError(f"the recipe needs a '{key}' string")
    if "data" in r and not isinstance(r["data"], str):
        raise D2DError("the recipe's 'data' must be a string (a path or a bundled name)")
    if not isinstance(r.get("report", False), bool):
        raise D2DError("the recipe's 'report' must be true or false")
    stages = []
    for s in r["stages"]:
        if isinstance(s, str):
            s = {s: {}}
        if not isinstance(s, dict) or len(s) != 1:
            raise D2DError(f"each recipe stage is a name or a one-key mapping, got {s!r}")
        ((name, opts),) = s.items()
        if not isinstance(name, str) or name not in STAGES:
            raise D2DError(f"unknown stage {name!r} in the recipe: stages are {', '.join(STAGES)}")
        if opts is not None and not isinstance(opts, dict):
            raise D2DError(f"options of stage {name} must be a mapping, got {opts!r}")
        if any(not isinstance(k, str) for k in opts or {}):
            raise D2DError(f"option names of stage {name} must be strings")
        stages.append([name, dict(opts or {})])
    r["stages"] = stages
    for stage, opt, val in parsed:
        if stage is None:
            continue
        hits = [s for s in stages if s[0] == stage]
        if not hits:
            raise D2DError(f"an override names stage {stage!r}, which the recipe lacks")
        for s in hits:
            s[1][opt] = val
    for name, opts in stages:
        names = {f.name for f in fields(STAGES[name].config_cls)}
        if "data" in names and "data" not in opts and r.get("data"):
            opts["data"] = r["data"]
        make_config(name, opts)  # validate now, before any work
    return r


def run_recipe(
    path: str | Path,
    overrides: list[str] = (),
    force: bool = False,
    progress: Progress = null_progress,
    on_stage=None,
) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise D2DError(f"recipe {path} does not exist: check the path")
    r = parse_recipe(p.read_text(), overrides)
    out = Path(r["out"])
    current = r["model"]
    # the resolved recipe (overrides applied) first: an interrupted run still records it
    resolved = {**r, "stages": [{n: o} for n, o in r["stages"]]}
    write_text_atomic(out / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))
    records = []
    for i, (name, opts) in enumerate(r["stages"]):
        cfg = make_config(name, opts)
        spec = STAGES[name]
        target = out / f"{i}-{name}" if spec.writes_artifact else None
        if target is not None and target.exists() and not force:
            if _matches(target, name, cfg):
                records.append({"stage": name, "skipped": True, "out": str(target)})
                if on_stage:
                    on_stage(name, records[-1])
                current = str(target)
                continue
            raise D2DError(f"{target} exists with another config: pass --force to redo it")
        if target is not None and not force and _has_checkpoint(cfg, target):
            cfg.resume = True  # an interrupted training stage continues where it stopped
        rec = run_stage(name, current, cfg, target, overwrite=force, progress=progress)
        if not spec.writes_artifact:
            write_json_atomic(out / f"{i}-{name}.json", rec)
        rec["out"] = str(target or out / f"{i}-{name}.json")
        records.append(rec)
        if on_stage:
            on_stage(name, rec)
        if target is not None:
            current = str(target)
    if r.get("report") and current != r["model"]:  # the last artifact, as a page to look at
        rep = build_report(current, out / "report", overwrite=True, progress=progress)
        records.append({"stage": "report", **rep})
        if on_stage:
            on_stage("report", records[-1])
    return records


def _has_checkpoint(cfg, target: Path) -> bool:
    if not getattr(cfg, "checkpoint_every", 0) or not hasattr(cfg, "checkpoints"):
        return False
    return latest_checkpoint(Path(cfg.checkpoints(target))) is not None


def _matches(target: Path, name: str, cfg) -> bool:
    try:
        meta = read_meta(target)
    except D2DError:
        return False
    last = meta["stages"][-1] if meta["stages"] else {}
    done = {k: v for k, v in (last.get("config") or {}).items() if k != "resume"}
    # a resumed run is the same run; an option added since the stage ran counts as its default
    defaults = {f.name: f.default for f in fields(cfg) if f.default is not MISSING}
    want = {
        k: v
        for k, v in asdict(cfg).items()
        if k != "resume" and not (k not in done and k in defaults and v == defaults[k])
    }
    return last.get("stage") == name and done == want and (target / META).exists()
