"""The (token, expert) pair kernels (`pairs_in`: each pair's pre-activations; `pairs_out`: each
pair's down-projection rows added into its token's output) of this checkout against the ones at
another git revision, on random MLP shapes of the bundled models (MiniLM's FFN and projection
MLPs in experts of 16 and 4, a SmolLM2-shaped gated FFN), raw kernel calls interleaved in one
run, outputs checked equal. Where this checkout has the tiled kernels for a shape (experts of 16
or 32 neurons on AVX-512), "this checkout" times them (`pairs_in_packed` on the packed weights,
`pairs_out_strips`), as the sparse FFN runs them:

    python scripts/pairs_ab.py --rev HEAD~1

With --cold L, instead: a SmolLM2-shaped gated FFN (96 experts of 16) with L layers' worth of
distinct random weights, a call of each token count swept through all L in turn (as a forward
pass meets its layers: weights from memory, not cache), the revision's pair kernels against
this checkout's tiled pre-activations followed by either down-projection kernel, and dense:

    python scripts/pairs_ab.py --rev 193cd88 --cold 30
"""

from __future__ import annotations

import argparse
import subprocess
import time

import torch

# (d, expert size, experts, tokens, share of pairs selected, gated)
SHAPES = [
    (384, 16, 24, 256, 0.26, False),
    (384, 4, 96, 256, 0.25, False),
    (384, 16, 96, 256, 0.12, False),
    (576, 16, 96, 256, 0.4, True),
    (384, 32, 12, 256, 0.3, False),
    (384, 16, 24, 16, 0.26, False),
    (576, 16, 96, 16, 0.3, True),
    (576, 16, 96, 1, 0.3, True),
    (576, 1, 1536, 1, 0.6, True),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", required=True, help="git revision of the kernel to compare with")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cold", type=int, default=0, help="layers of weights to sweep (0: off)")
    a = ap.parse_args()

    from torch.utils.cpp_extension import load_inline

    from d2d.nn import kernels

    src = subprocess.run(
        ["git", "show", f"{a.rev}:d2d/nn/kernels.cpp"], capture_output=True, text=True, check=True
    ).stdout
    flags = dict(extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    old = load_inline(name=f"d2d_pairs_{a.rev.replace('~', '_')}", cpp_sources=[src], **flags)
    new = kernels.load()
    torch.manual_seed(0)
    if a.cold:
        return cold(old, new, a.rev, a.cold, a.rounds)
    print(f"| kernel | d | expert size | experts | tokens | pairs | {a.rev} | this checkout "
          "| speed-up |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for d, s, n_exp, n, frac, gated in SHAPES:
        x = torch.randn(n, d)
        w1 = torch.randn(n_exp * s, d)
        w2 = torch.randn(n_exp * s, d) if gated else torch.empty(0)
        _, tok, pos, off = new.route(torch.rand(n, n_exp) < frac)
        pairs = tok.numel()
        tiled = hasattr(new, "tiled") and new.tiled(s, d)
        if tiled:
            p1, p2 = (w.view(n_exp, s, d).transpose(1, 2).contiguous() if w.numel() else w
                      for w in (w1, w2))  # fmt: skip
        ins = {  # kernel -> (function, weights) per side
            "old": (old.pairs_in, w1, w2),
            "new": (new.pairs_in_packed, p1, p2) if tiled else (new.pairs_in, w1, w2),
        }
        outs = {"old": old.pairs_out, "new": new.pairs_out_strips if tiled else new.pairs_out}
        out = {}
        for name in ("old", "new"):
            up, gate = torch.empty(pairs, s), torch.empty(pairs, s) if gated else torch.empty(0)
            fn, u1, u2 = ins[name]
            fn(x, u1, u2, tok, pos, off, up, gate, s)
            out[name] = (up, gate)
        for u, v in zip(out["old"], out["new"], strict=True):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)
        up, gate = out["new"]
        h = torch.relu(up).contiguous()
        ys = [outs[k](h, w1, tok, pos, off, n, s) for k in ("old", "new")]
        torch.testing.assert_close(ys[0], ys[1], rtol=1e-4, atol=1e-3)
        calls = {  # kernel -> per side, the function and its arguments
            "pairs_in": {
                k: (ins[k][0], (x, ins[k][1], ins[k][2], tok, pos, off, up, gate, s)) for k in ins
            },
            "pairs_out": {k: (outs[k], (h, w1, tok, pos, off, n, s)) for k in outs},
        }
        reps = 200 if n > 1 else 2000
        for kernel, sides in calls.items():
            times = {"old": [], "new": []}
            for _ in range(a.rounds):
                for name in ("old", "new"):
                    fn, args = sides[name]
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        fn(*args)
                    times[name].append((time.perf_counter() - t0) / reps)
            to, tn = (sorted(times[k])[len(times[k]) // 2] for k in ("old", "new"))
            gflop = 2 * pairs * s * d * (2 if gated and kernel == "pairs_in" else 1) / 1e9
            label = kernel + (" (tiled)" if tiled else "")
            print(f"| {label} | {d} | {s} | {n_exp}{' (gated)' if gated else ''} | {n} | "
                  f"{pairs} | {1e6 * to:.0f} us ({gflop / to:.0f} GFLOP/s) | {1e6 * tn:.0f} us "
                  f"({gflop / tn:.0f} GFLOP/s) | {to / tn:.2f}x |")  # fmt: skip


def cold(old, new, rev: str, layers: int, rounds: int) -> None:
    import statistics

    F = torch.nn.functional
    d, E, s = 576, 96, 16
    f = E * s
    weights = []
    for _ in range(layers):
        wi, wg, wo = torch.randn(f, d), torch.randn(f, d), torch.randn(f, d)
        packed = [w.view(E, s, d).transpose(1, 2).contiguous() for w in (wi, wg)]
        weights.append((wi, wg, wo, *packed))
    print(f"| tokens | experts run | {rev}: pair kernels | tiled in, strips out "
          "| tiled in, pairs_out | dense |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for n, frac in ((1, 0.3), (1, 0.6), (16, 0.3), (128, 0.3), (256, 0.1), (256, 0.3), (512, 0.3)):
        x = torch.randn(n, d)
        routes = [new.route(torch.rand(n, E) < frac) for _ in range(layers)]

        def sweep(kind, x=x, routes=routes, n=n):
            t0 = time.perf_counter()
            for (wi, wg, wo, pi, pg), (_, tok, pos, off) in zip(weights, routes, strict=True):
                up, gate = torch.empty(tok.numel(), s), torch.empty(tok.numel(), s)
                if kind == "pairs":
                    old.pairs_in(x, wi, wg, tok, pos, off, up, gate, s)
                    old.pairs_out(up, wo, tok, pos, off, n, s)
                elif kind == "dense":
                    F.linear(F.linear(x, wi) * F.linear(x, wg), wo.t())
                else:
                    new.pairs_in_packed(x, pi, pg, tok, pos, off, up, gate, s)
                    out = new.pairs_out_strips if kind == "strips" else new.pairs_out
                    out(up, wo, tok, pos, off, n, s)
            return time.perf_counter() - t0

        kinds = ("pairs", "strips", "rows", "dense")
        times = {k: [] for k in kinds}
        for r in range(rounds + 2):
            for k in kinds:
                dt = sweep(k)
                if r >= 2:
                    times[k].append(dt)
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        print(f"| {n} | {frac:.0%} | " + " | ".join(f"{ms[k]:.2f} ms" for k in kinds) + " |")


if __name__ == "__main__":
    main()
