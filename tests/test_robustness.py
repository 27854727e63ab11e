"""The bad-input contract (docs/robustness.md lists every case and its test).

Each bad input gets one line on stderr saying what is wrong and what to do, exit code 2, no
traceback, no output folder (nor a temporary one) left behind, and the input untouched.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from d2d_cli.main import app
from tiny import tree_bytes
from typer.testing import CliRunner

from d2d.stages import ConvertConfig, run_stage

runner = CliRunner()
TINY_ROUTERS = ["--tokens", "256", "--seq-len", "32", "--steps", "2", "--heldout-tokens", "64"]


@pytest.fixture(scope="module")
def converted(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "c"
    run_stage("convert", model_dirs["gated"], ConvertConfig(n_experts=8), out)
    return out


def copy(src, tmp_path, name="in") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def edit_meta(art: Path, fn) -> None:
    meta = json.loads((art / "d2d.json").read_text())
    fn(meta)
    (art / "d2d.json").write_text(json.dumps(meta))


# each case: (build(tmp_path, model_dirs, converted) -> (args, input path), expected text)
def c_missing(t, m, c):
    return ["convert", str(t / "nope"), "-o", "OUT"], None


def c_not_a_model(t, m, c):
    _write(t / "in" / "notes.txt", "hello")
    return ["convert", str(t / "in"), "-o", "OUT"], t / "in"


def c_config_garbage(t, m, c):
    d = copy(m["gated"], t)
    (d / "config.json").write_text("{not json")
    return ["convert", str(d), "-o", "OUT"], d


def c_config_disagrees_with_weights(t, m, c):
    d = copy(m["gated"], t)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] += 8  # edited by hand: the weights keep the old width
    (d / "config.json").write_text(json.dumps(cfg))
    return ["convert", str(d), "-o", "OUT"], d


def c_truncated_weights(t, m, c):
    d = copy(m["gated"], t)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    return ["convert", str(d), "-o", "OUT"], d


def c_truncated_artifact(t, m, c):
    d = copy(c, t)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 3])
    return ["eval", str(d), "--tau", "0", "--tokens", "64", "--seq-len", "32"], d


def c_corrupt_artifact(t, m, c):
    d = copy(c, t)
    (d / "model.safetensors").write_bytes(os.urandom(4096))
    return ["train-routers", str(d), "-o", "OUT", *TINY_ROUTERS], d


def c_meta_not_json(t, m, c):
    d = copy(c, t)
    (d / "d2d.json").write_text('{"format_version": 1, "stages": [')
    return ["train-routers", str(d), "-o", "OUT", *TINY_ROUTERS], d


def c_meta_not_object(t, m, c):
    d = copy(c, t)
    (d / "d2d.json").write_text("[1, 2, 3]")
    return ["train-routers", str(d), "-o", "OUT", *TINY_ROUTERS], d


def c_meta_newer(t, m, c):
    d = copy(c, t)
    edit_meta(d, lambda meta: meta.update(format_version=99))
    return ["train-routers", str(d), "-o", "OUT", *TINY_ROUTERS], d


def c_meta_disagrees(t, m, c):
    d = copy(c, t)
    edit_meta(d, lambda meta: meta["stages"][0]["structure"].update(n_experts=4))
    return ["train-routers", str(d), "-o", "OUT", *TINY_ROUTERS], d


def c_meta_incomplete(t, m, c):
    d = copy(c, t)
    edit_meta(d, lambda meta: meta["stages"][0].pop("structure"))
    return ["train-routers", str(d), "-o", "OUT", *TINY_ROUTERS], d


def c_unsupported_arch(t, m, c):
    from tiny import tiny

    tiny("opt").save_pretrained(t / "in")
    return ["convert", str(t / "in"), "-o", "OUT"], t / "in"


def c_order_routers_first(t, m, c):
    return ["train-routers", m["gated"], "-o", "OUT", *TINY_ROUTERS], Path(m["gated"])


def c_order_calibrate_no_routers(t, m, c):
    return ["calibrate", str(c), "-o", "OUT"], c


def c_order_sparsify_after_convert(t, m, c):
    return ["sparsify", str(c), "-o", "OUT", "--steps", "1"], c


def c_tau_eval(t, m, c):
    return ["eval", str(c), "--tau", "1.5"], c


def c_tau_calibrate(t, m, c):
    return ["calibrate", str(c), "-o", "OUT", "--taus", "0,2"], c


def c_tau_negative(t, m, c):
    return ["eval", str(c), "--tau", "-0.1"], c


def c_experts_divide(t, m, c):
    return ["convert", m["gated"], "-o", "OUT", "--n-experts", "7"], Path(m["gated"])


def c_unknown_clustering(t, m, c):
    return ["convert", m["gated"], "-o", "OUT", "--clustering", "random"], Path(m["gated"])


def c_distill_new_head(t, m, c):
    d = t / "data"
    for cls in ("a", "b"):
        (d / cls).mkdir(parents=True)
        for i in range(12):
            _write(d / cls / f"{i}.txt", f"{cls} words of document {i} " * 20)
    args = ["sparsify", m["bert"], "-o", "OUT", "--data", str(d), "--distill", "--steps", "1"]
    return args, Path(m["bert"])


def c_data_empty(t, m, c):
    _write(t / "data" / "a.txt", "  \n\n")
    return ["train-routers", str(c), "-o", "OUT", "--data", str(t / "data"), *TINY_ROUTERS], c


def c_data_no_files(t, m, c):
    (t / "data").mkdir()
    return ["train-routers", str(c), "-o", "OUT", "--data", str(t / "data"), *TINY_ROUTERS], c


def c_data_too_short(t, m, c):
    _write(t / "data" / "a.txt", "two words")
    return ["train-routers", str(c), "-o", "OUT", "--data", str(t / "data"), *TINY_ROUTERS], c


def c_data_no_text_column(t, m, c):
    _write(t / "d.csv", "title,body\n" + "".join(f"t{i},b{i}\n" for i in range(20)))
    return ["train-routers", str(c), "-o", "OUT", "--data", str(t / "d.csv"), *TINY_ROUTERS], c


def c_data_missing(t, m, c):
    return ["train-routers", str(c), "-o", "OUT", "--data", str(t / "none.txt")], c


def c_data_no_labels(t, m, c):
    _write(t / "d.txt", "\n".join(f"sentence number {i} about things" for i in range(40)))
    args = ["sparsify", m["bert"], "-o", "OUT", "--data", str(t / "d.txt")]
    return [*args, "--task", "classification", "--steps", "1"], Path(m["bert"])


def c_output_exists(t, m, c):
    (t / "o").mkdir()
    (t / "o" / "keep.txt").write_text("mine")
    return ["convert", m["gated"], "-o", str(t / "o")], t / "o"


def c_output_is_input(t, m, c):
    d = copy(c, t)
    return ["train-routers", str(d), "-o", str(d), "--overwrite", *TINY_ROUTERS], d


def c_output_unwritable(t, m, c):
    _write(t / "file", "a plain file")
    return ["convert", m["gated"], "-o", str(t / "file" / "sub")], t / "file"


def c_pickled_only(t, m, c):
    d = copy(m["gated"], t)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    return ["convert", str(d), "-o", "OUT"], d


def c_remote_code(t, m, c):
    d = copy(m["gated"], t)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    _write(d / "modeling_evil.py", "raise SystemExit('remote code ran')\n")
    return ["convert", str(d), "-o", "OUT"], d


def c_recipe_unknown_stage(t, m, c):
    r = _write(t / "r.yaml", f"model: {m['gated']}\nout: {t / 'OUT'}\nstages: [os.system]\n")
    return ["run", str(r)], r


def c_recipe_python_tag(t, m, c):
    r = _write(t / "r.yaml", "model: !!python/object/apply:os.system ['echo hi']\nstages: [x]\n")
    return ["run", str(r)], r


CASES = {
    "missing path": (c_missing, "does not exist"),
    "not a model folder": (c_not_a_model, "not a model folder"),
    "config.json not JSON": (c_config_garbage, "not valid JSON"),
    "config.json disagrees with the weights": (
        c_config_disagrees_with_weights,
        "down_proj.weight is [32, 64] in model.safetensors but config.json makes it [32, 72]",
    ),
    "truncated weights (HF folder)": (c_truncated_weights, "could not load model"),
    "truncated weights (artifact)": (c_truncated_artifact, "unreadable or corrupt"),
    "corrupt weights (artifact)": (c_corrupt_artifact, "unreadable or corrupt"),
    "d2d.json not JSON": (c_meta_not_json, "not valid JSON"),
    "d2d.json not an object": (c_meta_not_object, "malformed"),
    "d2d.json newer format": (c_meta_newer, "newer d2d"),
    "d2d.json disagrees with weights": (c_meta_disagrees, "disagrees with d2d.json"),
    "d2d.json stage record incomplete": (c_meta_incomplete, "incomplete stage record"),
    "unsupported architecture": (c_unsupported_arch, "unsupported architecture"),
    "train-routers before convert": (c_order_routers_first, "run d2d convert on it"),
    "calibrate without routers": (c_order_calibrate_no_routers, "d2d train-routers"),
    "sparsify after convert": (c_order_sparsify_after_convert, "must come before convert"),
    "eval tau > 1": (c_tau_eval, "tau must be in [0, 1]"),
    "calibrate tau > 1": (c_tau_calibrate, "tau must be in [0, 1]"),
    "eval tau < 0": (c_tau_negative, "tau must be in [0, 1]"),
    "experts do not divide the FFN": (c_experts_divide, "do not divide"),
    "unknown clustering": (c_unknown_clustering, "clustering must be one of"),
    "distillation onto a new head": (c_distill_new_head, "--distill needs"),
    "data empty": (c_data_empty, "is empty"),
    "data folder without text files": (c_data_no_files, "holds no"),
    "data too short for one sequence": (c_data_too_short, "too short for one sequence"),
    "table without a text column": (c_data_no_text_column, "no text column"),
    "data path missing": (c_data_missing, "does not exist"),
    "classification data without labels": (c_data_no_labels, "labels"),
    "output exists": (c_output_exists, "already exists"),
    "output is the input": (c_output_is_input, "is the input"),
    "output not writable": (c_output_unwritable, "is a file, not a folder"),
    "pickled weights only": (c_pickled_only, "never unpickles"),
    "remote code without the flag": (c_remote_code, "--trust-remote-code"),
    "recipe names an unknown stage": (c_recipe_unknown_stage, "unknown stage"),
    "recipe with a python tag": (c_recipe_python_tag, "not valid YAML"),
}


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_contract(case, model_dirs, converted, tmp_path):
    build, expected = CASES[case]
    work = tmp_path / "w"
    work.mkdir()
    args, inp = build(work, model_dirs, converted)
    args = [a.replace("OUT", str(work / "out")) if a.endswith("OUT") else a for a in args]
    before = tree_bytes(inp) if inp is not None else None
    conv_before = tree_bytes(converted)
    res = runner.invoke(app, args, env={"COLUMNS": "80"})
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in res.output
    assert not (work / "out").exists()
    assert _leftovers(work) == [] and _leftovers(converted.parent) == []
    if inp is not None:
        assert tree_bytes(inp) == before, "the input was modified"
    assert tree_bytes(converted) == conv_before


def test_trust_remote_code_is_opt_in(model_dirs, tmp_path):
    """With the flag, the folder's own code is allowed to run (here it refuses to import)."""
    args, _ = c_remote_code(tmp_path, model_dirs, None)
    res = runner.invoke(app, [*args[:2], "-o", str(tmp_path / "o"), "--trust-remote-code"])
    assert res.exit_code != 0 and "--trust-remote-code" not in (res.stderr or "")


def test_debug_shows_the_traceback(tmp_path):
    res = runner.invoke(app, ["convert", str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and res.exception is not None and "Traceback" not in res.output
    res = runner.invoke(
        app, ["convert", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "--debug"]
    )
    assert res.exit_code == 1 and type(res.exception).__name__ == "D2DError"


def test_full_disk_while_saving(model_dirs, tmp_path, monkeypatch):
    """ENOSPC in the middle of writing the weights: one line, nothing left, input untouched."""
    import d2d.artifact

    real = d2d.artifact.save_model

    def full_disk(model, filename, *a, **k):
        real(model, filename, *a, **k)
        Path(filename).write_bytes(Path(filename).read_bytes()[:1000])  # a partial file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(d2d.artifact, "save_model", full_disk)
    before = tree_bytes(Path(model_dirs["gated"]))
    res = runner.invoke(app, ["convert", model_dirs["gated"], "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "No space left on device" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    assert tree_bytes(Path(model_dirs["gated"])) == before


def test_permission_denied_on_output(model_dirs, tmp_path, monkeypatch):
    """The output's parent refuses new folders (simulated: tests may run as root)."""
    import tempfile

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    res = runner.invoke(app, ["convert", model_dirs["gated"], "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "Permission denied" in res.stderr, res.output
    assert not (tmp_path / "o").exists()


def test_existing_output_is_replaced_only_with_overwrite(model_dirs, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("x")
    res = runner.invoke(app, ["convert", model_dirs["gated"], "-o", str(out), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert not (out / "old.txt").exists() and (out / "d2d.json").is_file()
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------ real processes, real signals


def _spawn(args, cwd, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _wait_for(pred, proc, timeout=120):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.communicate()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_while_saving_leaves_nothing(sig, model_dirs, tmp_path):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler) arrives while the artifact is being written (the
    weights file is on disk, the rename has not happened): the temporary folder is removed and
    the exit code is 130."""
    marker = tmp_path / "writing"
    script = tmp_path / "slow_save.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            from pathlib import Path
            import d2d.artifact
            real = d2d.artifact.save_model
            def slow(model, filename, *a, **k):
                real(model, filename, *a, **k)
                Path({str(marker)!r}).write_text(filename)
                time.sleep(120)
            d2d.artifact.save_model = slow
            from d2d_cli.main import app
            sys.argv = ["d2d", *sys.argv[1:]]
            app()
            """
        )
    )
    out = tmp_path / "out" / "o"
    before = tree_bytes(Path(model_dirs["gated"]))
    p = _spawn([str(script), "convert", model_dirs["gated"], "-o", str(out)], tmp_path)
    _wait_for(marker.exists, p)
    partial = Path(marker.read_text())
    assert partial.exists() and ".tmp-" in partial.parent.name  # caught mid-write
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err.strip().startswith("interrupted:") and "Traceback" not in err
    assert list((tmp_path / "out").iterdir()) == []  # neither the output nor its temporary
    assert tree_bytes(Path(model_dirs["gated"])) == before


def test_sigint_during_training_keeps_only_checkpoints(model_dirs, tmp_path):
    """SIGINT in the middle of sparsify: no output; the complete checkpoints stay for --resume."""
    out = tmp_path / "s"
    args = ["-m", "d2d_cli", "sparsify", model_dirs["gated"], "-o", str(out)]
    args += ["--steps", "100000", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "64"]
    args += ["--eval-every", "0", "--checkpoint-every", "3", "--no-bf16"]
    p = _spawn(args, tmp_path)
    ckpts = tmp_path / "s.checkpoints"
    _wait_for(lambda: any(ckpts.glob("step-*/state.json")), p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted:" in err and "--resume" in err and "Traceback" not in err
    assert not out.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["s.checkpoints"]
    steps = list(ckpts.iterdir())
    assert len(steps) == 1 and (steps[0] / "state.json").is_file()  # complete, latest only


@pytest.mark.parametrize("complete", [True, False])
def test_interrupt_around_a_checkpoint_keeps_the_latest_complete_one(
    tmp_path, monkeypatch, complete
):
    """A Ctrl-C that lands right after a checkpoint's write (or in the middle of it) still
    leaves exactly one checkpoint: the latest complete one."""
    from d2d import train

    folder = tmp_path / "s.checkpoints"
    (folder / "step-3").mkdir(parents=True)
    (folder / "step-3" / "state.json").write_text("{}")

    def write(target, *args):
        target.mkdir()
        if complete:
            (target / "state.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_write_checkpoint", write)
    with pytest.raises(KeyboardInterrupt):
        train._save_checkpoint(folder, 6, None, None, None, "fp", None)
    assert [p.name for p in folder.iterdir()] == ["step-6" if complete else "step-3"]


def test_real_process_errors_are_one_line_exit_2(converted, tmp_path):
    p = _spawn(["-m", "d2d_cli", "eval", str(converted), "--tau", "3"], tmp_path)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and err.strip().splitlines() == [
        "error: tau must be in [0, 1], got 3.0"
    ], err
