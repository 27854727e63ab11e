"""Where the threshold kernel pays: one random SmolLM2-shaped SwiGLU layer (576 x 1,536,
single-neuron experts) under TEAL-style thresholds that keep about 60% of the input entries and
of the neurons, timed against the dense FFN at 1-32 tokens a call, interleaved in one run.
MoEFFN.THRESHOLD_MAX_TOKENS is the largest count where the kernel is faster.

    python scripts/threshold_crossover.py
"""

import time

import torch
import torch.nn.functional as F

from d2d.nn.moe import MoEFFN
from d2d.nn.policy import RoutingPolicy


def main(reps: int = 40) -> None:
    torch.manual_seed(0)
    d, f = 576, 1536
    m = MoEFFN(d, f, 1, torch.nn.SiLU(), gated=True, bias_in=False, bias_out=False)
    for p in m.parameters():
        p.data.normal_(0, 0.05)
    x = torch.randn(64, d)
    t_in = float(x.abs().quantile(0.4))
    with torch.no_grad():
        t_unit = float(m.hidden(x * (x.abs() >= t_in)).abs().quantile(0.4))
    m.policy = RoutingPolicy(
        "threshold", per_layer={0: t_unit}, scores="activation", input_thresholds={0: t_in}
    )
    m.THRESHOLD_MAX_TOKENS = 64  # every count below takes the kernel

    def dense(xx):
        h = F.silu(F.linear(xx, m.w_gate)) * F.linear(xx, m.w_in)
        return F.linear(h, m.w_out.t())

    with torch.no_grad():
        for n in (1, 2, 4, 8, 16, 32):
            xx = x[:n].contiguous()
            for _ in range(5):
                dense(xx), m(xx)
            t_dense = t_kernel = 0.0
            for _ in range(reps):
                t0 = time.perf_counter()
                dense(xx)
                t1 = time.perf_counter()
                m(xx)
                t2 = time.perf_counter()
                t_dense, t_kernel = t_dense + t1 - t0, t_kernel + t2 - t1
            print(
                f"{n:3d} tokens: dense {1e3 * t_dense / reps:.3f} ms, kernel "
                f"{1e3 * t_kernel / reps:.3f} ms, kernel / dense {t_kernel / t_dense:.2f}"
            )


if __name__ == "__main__":
    main()
