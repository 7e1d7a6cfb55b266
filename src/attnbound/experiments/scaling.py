"""Claim (Keles et al., SPEC §5.1): exact attention takes time growing as n² (log-log slope ≈ 2),
while the polynomial method at a fixed radius R grows as n (slope ≈ 1) — Alman–Song's
n^{1+o(1)} algorithm for bounded entries.

Falsified if the fitted slope of exact attention is far from 2, or that of the polynomial
method clearly above 1, over the measured range of n.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import attnbound

from .common import Result, combine, fit_slope, new_figure, slope_verdict, timeit

NS = {"test": [256, 512, 1024], "small": [2048, 4096, 8192, 16384, 32768],
      "medium": [2048, 4096, 8192, 16384, 32768], "large": [4096, 8192, 16384, 32768, 65536]}


def _inputs(n, d, radius, gen):
    q, k, v = (torch.randn(1, 1, n, d, generator=gen) for _ in range(3))
    c = math.sqrt(radius / (float(q.norm(dim=-1).max()) * float(k.norm(dim=-1).max()) / math.sqrt(d)))
    return q * c, k * c, v


def run(scale: str, seed: int, advance) -> Result:
    d, radius, eps = 8, 1.0, 1e-3
    gen = torch.Generator().manual_seed(seed)
    rows = []
    g = None
    for n in NS[scale]:
        q, k, v = _inputs(n, d, radius, gen)
        reps = 3 if n <= 8192 else 2
        if g is None:  # one degree for every n (the certified one at the first n), so only n varies
            g = attnbound.attention(q, k, v, method="polynomial", eps=eps, return_certificate=True)[1].degree
        _, cert = attnbound.attention(q[..., :8, :], k, v, method="polynomial", degree=g, return_certificate=True)
        rows.append({
            "n": n,
            "exact_blockwise_s": timeit(lambda: attnbound.attention(q, k, v, method="blockwise"), reps),
            "sdpa_s": timeit(lambda: F.scaled_dot_product_attention(q, k, v), reps),
            "polynomial_s": timeit(lambda: attnbound.attention(q, k, v, method="polynomial", degree=g), reps),
            "polynomial_degree": g,
            "polynomial_certificate": cert.output_error_bound,
        })
        advance()
    ns = [r["n"] for r in rows]
    fits, verdicts, reasons = {}, [], []
    for key, target, upper in (("exact_blockwise_s", 2.0, False), ("sdpa_s", 2.0, False), ("polynomial_s", 1.0, True)):
        tail = slice(1, None) if len(ns) > 3 else slice(None)  # the smallest n is dominated by overheads
        slope, lo, hi = fit_slope(ns[tail], [r[key] for r in rows][tail])
        fits[key] = {"slope": slope, "ci_low": lo, "ci_high": hi}
        v, why = slope_verdict(slope, lo, hi, target, 0.35, upper_only=upper)
        verdicts.append(v)
        reasons.append(f"{key.removesuffix('_s')}: {why} → {v}")
    fig, (ax,) = new_figure()
    for key, label in (("exact_blockwise_s", "attnbound exact (blockwise)"), ("sdpa_s", "torch SDPA"),
                       ("polynomial_s", f"attnbound polynomial (R={radius}, eps={eps:g})")):
        ax.loglog(ns, [r[key] for r in rows], "o-", label=f"{label}: slope {fits[key]['slope']:.2f}")
    ref = rows[-1]
    for p, style in ((2, ":"), (1, "--")):
        ax.loglog(ns, [ref["sdpa_s"] * (n / ns[-1]) ** p for n in ns], "k" + style, lw=0.8, label=f"n^{p} (prediction)")
    ax.set_xlabel("n"), ax.set_ylabel("seconds"), ax.set_title(f"Time vs n (d={d})"), ax.legend(fontsize=7)
    return Result("scaling", __doc__.split("\n\n")[0], combine(verdicts), "; ".join(reasons), rows,
                  {"fits": fits, "d": d, "radius": radius, "eps": eps}, {"scaling": fig})


def steps(scale: str) -> int:
    return len(NS[scale])
