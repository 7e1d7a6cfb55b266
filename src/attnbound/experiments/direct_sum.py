"""Claim (seed 002, Saha–Xu–Ye–Yu, SPEC §5.4): an L-layer, H-head transformer costs about L·H
times one head — computing the heads separately is essentially optimal, there is no shared
work to exploit. Measured on the attention itself: one :func:`attnbound.attention` call over
L·H independent heads (as :class:`attnbound.nn.Transformer` issues them, layer by layer) against
L·H × the same call for one head. (A whole Transformer forward would add the projections,
whose cost grows as (H·d_h)², and hide the claim.)

Falsified if the ratio time(L·H heads) / (L·H · time(one head)) falls well below 1 (shared
work) as L·H grows. A ratio above 1 does not contradict the lower bound: it is batched tiles
outgrowing the CPU caches, and the reason says so.
"""

from __future__ import annotations

import torch

import attnbound
from .common import Result, new_figure, timeit

SIZES = {"test": (256, [1, 2, 4]), "small": (2048, [1, 2, 4, 8]), "medium": (4096, [1, 2, 4, 8, 16]),
         "large": (8192, [1, 2, 4, 8, 16])}
HEAD_DIM = 8


def run(scale: str, seed: int, advance) -> Result:
    n, lhs = SIZES[scale]
    gen = torch.Generator().manual_seed(seed)
    rows = []
    # one algorithm at every L·H: method="exact" would switch from dense to blockwise as the batch grows
    for method, kw in (("exact", {"method": "blockwise"}),
                       ("polynomial", {"method": "polynomial", "degree": 4, "strict": False})):
        base = None
        for lh in lhs:
            q, k, v = (torch.randn(1, lh, n, HEAD_DIM, generator=gen) * 0.3 for _ in range(3))
            t = timeit(lambda: attnbound.attention(q, k, v, **kw), 2)
            if base is None:
                base = t
            rows.append({"method": method, "LH": lh, "seconds": t, "one_head_seconds": base, "ratio": t / (lh * base)})
            advance()
    worst = min(r["ratio"] for r in rows if r["LH"] == lhs[-1])
    top = max(r["ratio"] for r in rows if r["LH"] == lhs[-1])
    verdict = "PASS" if worst >= 0.5 else "FAIL"
    reason = (f"time(L·H) / (L·H × one head) at L·H = {lhs[-1]}: "
              + ", ".join(f"{r['method']} {r['ratio']:.2f}" for r in rows if r["LH"] == lhs[-1])
              + (" (never well below 1: no shared work to exploit"
                 + ("; above 1 where batched tiles outgrow the caches)" if top > 1.2 else ")")))
    fig, (ax,) = new_figure()
    for method in ("exact", "polynomial"):
        sub = [r for r in rows if r["method"] == method]
        ax.plot([r["LH"] for r in sub], [r["ratio"] for r in sub], "o-", label=method)
    ax.axhline(1.0, color="k", ls=":", lw=0.8, label="prediction: L·H × one head")
    ax.set_xscale("log", base=2), ax.set_ylim(0, max(1.6, max(r["ratio"] for r in rows) * 1.1))
    ax.set_xlabel("L·H (heads × layers)"), ax.set_ylabel("time / (L·H × one head)")
    ax.set_title(f"Direct sum (n={n}, head dim {HEAD_DIM})"), ax.legend(fontsize=7)
    return Result("direct_sum", __doc__.split("\n\n")[0], verdict, reason, rows, {"n": n}, {"direct_sum": fig})


def steps(scale: str) -> int:
    return 2 * len(SIZES[scale][1])
