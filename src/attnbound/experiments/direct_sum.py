"""Claim (seed 002, Saha–Xu–Ye–Yu, SPEC §5.4): an L-layer, H-head transformer costs about L·H
times one head — computing the heads separately is essentially optimal, there is no shared
work to exploit. Measured with :class:`attnbound.nn.Transformer` (attention part dominant:
small embedding per head) against L·H × a one-layer, one-head model of the same head size.

Falsified if the ratio time(L, H) / (L·H · time(1, 1)) falls well below 1 as L·H grows.
"""

from __future__ import annotations

import torch

from ..nn import Transformer
from .common import Result, new_figure, timeit

SIZES = {"test": (256, [1, 2, 4]), "small": (2048, [1, 2, 4, 8]), "medium": (4096, [1, 2, 4, 8, 16]),
         "large": (8192, [1, 2, 4, 8, 16])}
HEAD_DIM = 8


def _model(layers, heads, method):
    torch.manual_seed(0)
    m = Transformer(layers, HEAD_DIM * heads, heads, mlp_ratio=1, method=method, eps=1e-3)
    with torch.no_grad():  # keep the data radius bounded so the polynomial degree is the same in every layer
        for blk in m.blocks:
            blk.attn.in_proj_weight.mul_(0.5)
    return m


def run(scale: str, seed: int, advance) -> Result:
    n, lhs = SIZES[scale]
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for method in ("exact", "polynomial"):
        base = None
        for lh in lhs:
            layers = 1 if lh == 1 else 2
            heads = lh // layers
            m = _model(layers, heads, method)
            x = torch.randn(1, n, HEAD_DIM * heads, generator=gen) * 0.5
            with torch.no_grad():
                t = timeit(lambda: m(x), 2)
            if base is None:
                base = t
            rows.append({"method": method, "layers": layers, "heads": heads, "LH": lh, "seconds": t,
                         "one_head_seconds": base, "ratio": t / (lh * base)})
            advance()
    worst = min(r["ratio"] for r in rows if r["LH"] == lhs[-1])
    verdict = "PASS" if worst >= 0.5 else "FAIL"
    reason = (f"time(L·H) / (L·H × one head) at L·H = {lhs[-1]}: "
              + ", ".join(f"{r['method']} {r['ratio']:.2f}" for r in rows if r["LH"] == lhs[-1])
              + " (≈ 1: no shared work; batching only trims per-call overhead)")
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
