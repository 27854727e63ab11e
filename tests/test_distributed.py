"""The training loop under a real multi-process launcher: 2 CPU processes (gloo) reach the same
losses and weights as 1 process, and as 1 process accumulating 2 micro-batches, with the same
global batch."""

import json
import os
import socket
import subprocess
import sys

import torch

from d2d import load_artifact

ARGS = [
    "--data", "shakespeare", "--steps", "4", "--batch-size", "4", "--seq-len", "32",
    "--eval-tokens", "128", "--no-bf16", "--lr", "1e-3", "--weight", "0.05",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


def _history(out):
    meta = json.loads((out / "d2d.json").read_text())
    return [h["loss"] for h in meta["stages"][0]["metrics"]["history"]]


def test_two_processes_match_one(model_dirs, tmp_path):
    model = model_dirs["gated"]
    one, accum, two = tmp_path / "one", tmp_path / "accum", tmp_path / "two"
    _run([sys.executable, "-m", "d2d_cli", "sparsify", model, "--out", str(one), *ARGS], tmp_path)
    _run(
        [sys.executable, "-m", "d2d_cli", "sparsify", model, "--out", str(accum), *ARGS]
        + ["--grad-accum", "2"],
        tmp_path,
    )
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    launcher += [f"--master_port={_free_port()}"]
    _run([*launcher, "-m", "d2d_cli", "sparsify", model, "--out", str(two), *ARGS], tmp_path)
    h1 = _history(one)
    assert len(h1) == 4 and h1[-1] < h1[0]
    for other in (accum, two):
        torch.testing.assert_close(
            torch.tensor(_history(other)), torch.tensor(h1), rtol=1e-5, atol=0
        )
        sa, sb = load_artifact(one).model.state_dict(), load_artifact(other).model.state_dict()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6)
    assert not list(tmp_path.glob(".two.tmp-*"))  # one process wrote, nothing half-written
