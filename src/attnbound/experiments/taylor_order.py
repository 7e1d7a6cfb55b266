"""Claim (Keles et al., SPEC §5.3): the order-p Taylor approximation of attention has error
falling like R^{p+1}/(p+1)! (super-exponentially in p) while its cost grows like the rank
C(d+p, p) (exponentially in p): linear in n, exponential in the order.

Falsified if the measured error does not fall faster than geometrically in p, exceeds the
certificate where one exists, or the rank/time do not grow with p.
"""

from __future__ import annotations

import math

import torch

import attnbound

from .common import Result, new_figure, timeit
from ..exact import dense_attention

SIZES = {"test": (256, 10), "small": (2048, 10), "medium": (4096, 12), "large": (8192, 12)}


def run(scale: str, seed: int, advance) -> Result:
    n, p_max = SIZES[scale]
    d, radius = 4, 1.0
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(n, d, generator=gen, dtype=torch.float64) for _ in range(2))
    c = math.sqrt(radius / (float(q.norm(dim=-1).max()) * float(k.norm(dim=-1).max()) / math.sqrt(d)))
    q, k = q * c, k * c
    v = torch.rand(n, 4, generator=gen, dtype=torch.float64) * 2 - 1
    ref = dense_attention(q, k, v, scale=1 / math.sqrt(d))
    rows = []
    for p in range(0, p_max + 1, 2):
        out, cert = attnbound.attention(q, k, v, method="taylor", order=p, strict=False, return_certificate=True)
        t = timeit(lambda: attnbound.attention(q, k, v, method="taylor", order=p, strict=False), 1)
        rows.append({"order": p, "rank": math.comb(d + p, p), "measured_max_error": float((out - ref).abs().max()),
                     "certificate": cert.output_error_bound, "predicted_shape": radius ** (p + 1) / math.factorial(p + 1),
                     "seconds": t})
        advance()
    errs = [r["measured_max_error"] for r in rows]
    above_floor = [e for e in errs if e > 1e-13]
    ratios = [b / a for a, b in zip(above_floor, above_floor[1:])]
    superexp = len(ratios) >= 2 and all(r2 < r1 for r1, r2 in zip(ratios, ratios[1:]))
    within = all(r["measured_max_error"] <= r["certificate"] for r in rows)
    cost_grows = all(b["rank"] > a["rank"] for a, b in zip(rows, rows[1:])) and rows[-1]["seconds"] > rows[1]["seconds"]
    verdict = "PASS" if superexp and within and cost_grows else "FAIL"
    reason = (f"error ratios between successive orders {', '.join(f'{x:.2g}' for x in ratios)} "
              f"({'shrinking: super-exponential' if superexp else 'not shrinking'}); measured ≤ certificate at every "
              f"order: {within}; rank {rows[0]['rank']} → {rows[-1]['rank']}, time {rows[1]['seconds']:.3g}s → "
              f"{rows[-1]['seconds']:.3g}s")
    fig, axes = new_figure(2)
    ps = [r["order"] for r in rows]
    ax = axes[0]
    ax.semilogy(ps, errs, "o-", label="measured max error")
    ax.semilogy(ps, [r["certificate"] if math.isfinite(r["certificate"]) else float("nan") for r in rows], "s--",
                label="certificate (∞ where η ≥ 1)")
    scale0 = errs[1] / rows[1]["predicted_shape"]
    ax.semilogy(ps, [scale0 * r["predicted_shape"] for r in rows], "k:", label="∝ R^{p+1}/(p+1)! (prediction)")
    ax.set_xlabel("Taylor order p"), ax.set_ylabel("‖out − exact‖∞"), ax.set_title(f"Error vs order (d={d}, R={radius})")
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.semilogy(ps, [r["rank"] for r in rows], "o-", label="rank C(d+p, p)")
    ax2 = ax.twinx()
    ax2.semilogy(ps, [r["seconds"] for r in rows], "s--", color="C1", label="time [s]")
    ax.set_xlabel("Taylor order p"), ax.set_ylabel("rank"), ax2.set_ylabel("seconds")
    ax.set_title(f"Cost vs order (n={n})"), ax.legend(loc="upper left", fontsize=7), ax2.legend(loc="lower right", fontsize=7)
    return Result("taylor_order", __doc__.split("\n\n")[0], verdict, reason, rows, {"n": n, "d": d, "radius": radius},
                  {"taylor_order": fig})


def steps(scale: str) -> int:
    return SIZES[scale][1] // 2 + 1
