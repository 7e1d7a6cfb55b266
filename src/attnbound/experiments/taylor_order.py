"""Claim (Keles et al.'s Taylor attention): the order-p Taylor approximation has error at most
e^R R^{p+1}/(p+1)!, falling super-exponentially in p, while its cost is proportional to the rank
C(d+p, p) — exponential in p while p ≲ d (C(d+p, p) ≥ 2^p for p ≤ d), but a polynomial of degree
d in p for fixed d. (Keles et al.'s "exponential in the order" counts raw tensor powers d^p, or
the regime d ≳ p.)

Measured in float64: the error against exact attention at even orders p (n tokens, d = 4,
R = 1) beside the certificate; operation counts (:func:`.common.count_ops`, deterministic) of
each run. Two regimes of the rank: d = 4 fixed, p up to 12 or more (polynomial: the growth
factor rank(p+2)/rank(p) falls towards 1) and d = p (exponential: the factor stays ≥ 4 per two
orders). Falsified if the measured error exceeds the certificate at some order, the error
ratios between successive orders do not shrink (above the rounding floor), or the operation
count per token is not c₀ + c_d·d + c₁·rank (one fit over both regimes, every point within 10%).
"""

from __future__ import annotations

import math

import numpy as np
import torch

import attnbound

from .common import Result, combine, count_ops, new_figure
from ..engines.reference import dense_attention

SIZES = {"test": (128, 10), "small": (1024, 12), "medium": (2048, 12), "large": (4096, 14)}
D, RADIUS, DV = 4, 1.0, 4
EQUAL_D = {"test": (64, [2, 4, 6]), "small": (256, [2, 4, 6, 8]), "medium": (256, [2, 4, 6, 8]),
           "large": (256, [2, 4, 6, 8])}
FLOOR = 1e-13


def verdict(rows: list[dict], equal: list[dict], tol: float = 0.1) -> tuple[str, str]:
    """PASS when (1) measured ≤ certificate at every order, (2) successive error ratios shrink above the
    rounding floor, (3) the operations per token are c₀ + c_d·d + c₁·rank (reading the inputs, then the features) within ``tol``
    at every order p ≥ 2
    (relative) over both regimes."""
    errs = [r["measured_max_error"] for r in rows]
    above = [e for e in errs if e > FLOOR]
    ratios = [b / a for a, b in zip(above, above[1:])]
    superexp = len(ratios) >= 2 and all(r2 < r1 for r1, r2 in zip(ratios, ratios[1:]))
    over = [r["order"] for r in rows if not r["measured_max_error"] <= r["certificate"]]
    pts = [r for r in rows + equal if r["order"] > 0]  # order 0 is the constant map (plain mean)
    y = np.array([r["ops"] / r["n"] for r in pts])
    x = np.array([r["rank"] for r in pts], float)
    dd = np.array([r["d"] for r in pts], float)
    (c0, cd, c1), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), dd, x], 1), y, rcond=None)
    residual = float(np.max(np.abs(y - (c0 + cd * dd + c1 * x)) / y))
    fixed_growth = [b["rank"] / a["rank"] for a, b in zip(rows, rows[1:])]
    equal_growth = [b["rank"] / a["rank"] for a, b in zip(equal, equal[1:])]
    parts = [
        f"error ratios between successive orders {', '.join(f'{x:.2g}' for x in ratios)} "
        f"({'shrinking: super-exponential' if superexp else 'NOT shrinking'})",
        "measured ≤ certificate at every order" if not over else f"measured ABOVE the certificate at p = {over}",
        f"ops per token = {c0:.3g} + {cd:.3g}·d + {c1:.3g}·rank within {residual:.1%} over both regimes "
        f"({'linear in the rank' if residual <= tol else 'NOT linear in the rank'}, tolerance {tol:.0%})",
        f"rank growth per two orders at d = {D}: ×{fixed_growth[0]:.2f} → ×{fixed_growth[-1]:.2f} (polynomial in p); "
        f"at d = p: ×{min(equal_growth):.1f}–×{max(equal_growth):.1f} (exponential)" if fixed_growth and equal_growth else "",
    ]
    ok = superexp and not over and residual <= tol
    return ("PASS" if ok else "FAIL"), "; ".join(p for p in parts if p)


def run(scale: str, seed: int, advance) -> Result:
    n, p_max = SIZES[scale]
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(n, D, generator=gen, dtype=torch.float64) for _ in range(2))
    c = math.sqrt(RADIUS / (float(q.norm(dim=-1).max()) * float(k.norm(dim=-1).max()) / math.sqrt(D)))
    q, k = q * c, k * c
    v = torch.rand(n, DV, generator=gen, dtype=torch.float64) * 2 - 1
    ref = dense_attention(q, k, v, scale=1 / math.sqrt(D))
    rows = []
    for p in range(0, p_max + 1, 2):
        ops, (out, cert) = count_ops(lambda: attnbound.attention(q, k, v, method="taylor", order=p, strict=False,
                                                                 return_certificate=True))
        rows.append({"regime": f"d = {D}", "d": D, "order": p, "n": n, "rank": math.comb(D + p, p),
                     "measured_max_error": float((out - ref).abs().max()), "certificate": cert.output_error_bound,
                     "remainder_shape": math.exp(RADIUS) * RADIUS ** (p + 1) / math.factorial(p + 1),
                     "ops": ops.total})
        advance()
    n_eq, ps = EQUAL_D[scale]
    equal = []
    for p in ps:
        qe, ke = (torch.randn(n_eq, p, generator=gen, dtype=torch.float64) * 0.1 for _ in range(2))
        ve = torch.rand(n_eq, DV, generator=gen, dtype=torch.float64) * 2 - 1
        ops, _ = count_ops(lambda: attnbound.attention(qe, ke, ve, method="taylor", order=p, strict=False))
        equal.append({"regime": "d = p", "d": p, "order": p, "n": n_eq, "rank": math.comb(2 * p, p), "ops": ops.total})
    advance()
    v, reason = verdict(rows, equal)
    fig, axes = new_figure(2)
    ps_f = [r["order"] for r in rows]
    ax = axes[0]
    ax.semilogy(ps_f, [max(r["measured_max_error"], 1e-17) for r in rows], "o-", label="measured ‖out − exact‖∞")
    ax.semilogy(ps_f, [r["certificate"] if math.isfinite(r["certificate"]) else float("nan") for r in rows], "s--",
                label="certificate (none where η ≥ 1)")
    ax.semilogy(ps_f, [r["remainder_shape"] for r in rows], "k:", label="e^R R^(p+1)/(p+1)! (prediction)")
    ax.axhline(FLOOR, color="grey", lw=0.6, ls="-.", label="float64 rounding floor")
    ax.set_xlabel("Taylor order p"), ax.set_ylabel("error")
    ax.set_title(f"Error vs order (d = {D}, R = {RADIUS:g}, n = {n})", fontsize=10), ax.legend(fontsize=7)
    ax = axes[1]
    ax.semilogy(ps_f, [r["rank"] for r in rows], "o-", label=f"rank C(d+p, p), d = {D} (polynomial in p)")
    ax.semilogy(ps_f, [r["ops"] / (r["n"] * rows[-1]["ops"] / (rows[-1]["n"] * rows[-1]["rank"])) for r in rows], "x",
                color="C0", ms=8, label="operations per token (scaled to the last rank)")
    ax.semilogy([r["order"] for r in equal], [r["rank"] for r in equal], "s-", color="C3",
                label="rank C(2p, p), d = p (exponential)")
    ax.semilogy([r["order"] for r in equal],
                [r["ops"] / (r["n"] * equal[-1]["ops"] / (equal[-1]["n"] * equal[-1]["rank"])) for r in equal], "x",
                color="C3", ms=8, label="operations per token, d = p (scaled)")
    ax.semilogy(ps_f, [2.0**p for p in ps_f], "k:", lw=0.8, label="2^p")
    ax.set_xlabel("Taylor order p"), ax.set_ylabel("rank  (× : counted operations, rescaled)")
    ax.set_title("Cost follows the rank in both regimes", fontsize=10), ax.legend(fontsize=7)
    return Result("taylor_order", __doc__.split("\n\n")[0], v, reason, rows + equal,
                  {"n": n, "d": D, "radius": RADIUS}, {"taylor_order": fig})


def steps(scale: str) -> int:
    return SIZES[scale][1] // 2 + 2
