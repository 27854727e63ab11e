"""What a routing costs over every expert on a prompt: one artifact's forward on a random
prompt under its own routing and with every expert, interleaved in one run (median of --reps).
Where the routing cannot skip work on many tokens at once (per-token thresholds run the masked
path), the ratio is the price of computing the scores and masks.

    python scripts/prefill_overhead.py ARTIFACT --tokens 512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()

    import d2d
    from d2d.nn.policy import ALL
    from d2d.nn.routing import routing

    model = d2d.load(a.artifact).model.eval()
    ids = torch.randint(100, 20000, (1, a.tokens), generator=torch.Generator().manual_seed(0))
    torch.set_grad_enabled(False)
    model(input_ids=ids)  # warm-up
    routed, every = [], []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        model(input_ids=ids)
        t1 = time.perf_counter()
        with routing(model, ALL):
            model(input_ids=ids)
        routed.append(t1 - t0)
        every.append(time.perf_counter() - t1)
    r, e = statistics.median(routed), statistics.median(every)
    print(f"routed {1e3 * r:.0f} ms, every expert {1e3 * e:.0f} ms, speed-up {e / r:.3f}")


if __name__ == "__main__":
    main()
