"""Property-based tests: malformed recipes and d2d.json files give a D2DError (one clear line
in the CLI), never another exception, and never touch the artifact."""

import json
import shutil
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d2d import load_artifact
from d2d.artifact import read_meta
from d2d.errors import D2DError
from d2d.recipe import parse_recipe
from d2d.stages import STAGES, ConvertConfig, run_stage

OPTION_NAMES = sorted({f for s in STAGES.values() for f in s.config_cls.__dataclass_fields__})
KEYS = st.sampled_from(["model", "out", "data", "stages", *STAGES, *OPTION_NAMES]) | st.text(
    string.ascii_lowercase + "-_.", max_size=8
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["0,0.1", "all", "bbc-news", "0-1", "tau", "m", *STAGES])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)
STAGE_ENTRY = st.sampled_from(list(STAGES)) | st.dictionaries(
    st.sampled_from(list(STAGES)), st.dictionaries(KEYS, VALUES, max_size=3), min_size=1
)
RECIPES = st.fixed_dictionaries(
    {},
    optional={
        "model": VALUES | st.just("m"),
        "out": VALUES | st.just("o"),
        "data": VALUES,
        "stages": st.lists(STAGE_ENTRY | VALUES, max_size=4) | VALUES,
    },
)
OVERRIDE = st.builds(
    lambda k, v: f"{k}={v}",
    KEYS | st.sampled_from([f"{s}.{o}" for s in STAGES for o in ("steps", "tau", "data")]),
    st.text(max_size=8),
) | st.text(max_size=10)


def _valid_or_d2d_error(fn, *args):
    try:
        return fn(*args)
    except D2DError as e:
        assert str(e) and "\n" not in str(e)
        return None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_recipe_parser_on_any_text(text):
    _valid_or_d2d_error(parse_recipe, text)


@settings(max_examples=400, deadline=None)
@given(RECIPES, st.lists(OVERRIDE, max_size=3))
def test_recipe_parser_on_malformed_structures(recipe, overrides):
    r = _valid_or_d2d_error(parse_recipe, yaml.safe_dump(recipe), overrides)
    if r is not None:  # what it accepts is a well-formed recipe
        assert isinstance(r["model"], str) and isinstance(r["out"], str)
        assert r["stages"] and all(name in STAGES for name, _ in r["stages"])


META_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def converted(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "c"
    run_stage("convert", model_dirs["gated"], ConvertConfig(n_experts=8), out)
    return out


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=64)
    | st.text(max_size=64).map(str.encode)
    | META_VALUES.map(lambda v: json.dumps(v).encode())
)
def test_meta_reader_on_any_file(tmp_path_factory, blob):
    d = tmp_path_factory.mktemp("m")
    (d / "d2d.json").write_bytes(blob)
    meta = _valid_or_d2d_error(read_meta, d)
    if meta is not None:
        assert isinstance(meta["stages"], list) and all(
            isinstance(s["stage"], str) for s in meta["stages"]
        )


PATHS = st.sampled_from(
    [
        ("format_version",),
        ("base",),
        ("base", "model_class"),
        ("stages",),
        ("stages", 0),
        ("stages", 0, "stage"),
        ("stages", 0, "structure"),
        ("stages", 0, "structure", "layers"),
        ("stages", 0, "structure", "n_experts"),
        ("stages", 0, "config"),
        ("routing",),
        ("calibration",),
        ("model_class",),
    ]
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.tuples(PATHS, META_VALUES | st.just("__delete__")), min_size=1, max_size=3))
def test_load_artifact_on_mutated_meta(converted, tmp_path_factory, edits):
    d = tmp_path_factory.mktemp("a") / "a"
    shutil.copytree(converted, d)
    meta = json.loads((d / "d2d.json").read_text())
    for path, value in edits:
        node = meta
        try:
            for k in path[:-1]:
                node = node[k]
            if value == "__delete__":
                del node[path[-1]]
            else:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # the path no longer exists after an earlier edit
    (d / "d2d.json").write_text(json.dumps(meta))
    weights = (d / "model.safetensors").read_bytes()
    _valid_or_d2d_error(load_artifact, d)
    assert (d / "model.safetensors").read_bytes() == weights
