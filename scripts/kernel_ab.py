"""The threshold kernel of this checkout against the one at another git revision and dense, one
random SmolLM2-shaped SwiGLU layer (576 x 1,536, single neurons), TEAL-style thresholds at each
kept share, raw kernel calls at 1 token interleaved in one run (outputs checked equal):

    python scripts/kernel_ab.py --rev 0441244 --keep 0.6,0.4
"""

from __future__ import annotations

import argparse
import subprocess
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", required=True, help="git revision of the kernel to compare with")
    ap.add_argument("--keep", default="0.6,0.4")
    ap.add_argument("--reps", type=int, default=400)
    a = ap.parse_args()

    from torch.utils.cpp_extension import load_inline

    from d2d.nn import kernels
    from d2d.nn.moe import MoEFFN

    src = subprocess.run(
        ["git", "show", f"{a.rev}:d2d/nn/kernels.cpp"], capture_output=True, text=True, check=True
    ).stdout
    other = load_inline(
        name=f"d2d_kernel_{a.rev[:12]}",
        cpp_sources=[src],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
    )
    this = kernels.load()
    torch.manual_seed(0)
    d, f = 576, 1536
    m = MoEFFN(d, f, 1, torch.nn.SiLU(), gated=True, bias_in=False, bias_out=False)
    for p in m.parameters():
        p.data.normal_(0, 0.05)
    torch.set_grad_enabled(False)
    x = torch.randn(64, d)
    xx = x[:1].contiguous()
    none = torch.empty(0)
    wt = (m.w_in.t().contiguous(), m.w_gate.t().contiguous())
    for keep in (float(k) for k in a.keep.split(",")):
        t_in = float(x.abs().quantile(1 - keep))
        t_h = float(m.hidden(x * (x.abs() >= t_in)).abs().quantile(1 - keep))

        def call(mod, t_in=t_in, t_h=t_h):
            mask, kept = torch.empty(1, f, dtype=torch.bool), torch.empty(1)
            return mod.threshold_ffn(
                xx, t_in, t_h, 0, m.w_in, none, m.w_gate, none, wt[0], wt[1], m.w_out, none,
                none, 1, kernels.act_code(m.act), mask, kept,
            )  # fmt: skip

        def dense():
            return F.linear(F.silu(F.linear(xx, m.w_gate)) * F.linear(xx, m.w_in), m.w_out.t())

        torch.testing.assert_close(call(this), call(other), rtol=1e-4, atol=1e-5)
        runs = {"this": lambda: call(this), a.rev: lambda: call(other), "dense": dense}
        spent = dict.fromkeys(runs, 0.0)
        for _ in range(30):
            for fn in runs.values():
                fn()
        for _ in range(a.reps):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                spent[name] += time.perf_counter() - t0
        ms = {k: 1e3 * v / a.reps for k, v in spent.items()}
        print(
            f"keep {keep}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()),
            f"| this / {a.rev} {ms['this'] / ms[a.rev]:.2f}, this / dense "
            f"{ms['this'] / ms['dense']:.2f}",
        )


if __name__ == "__main__":
    main()
