"""Claim (Alman–Song, SPEC §5.2): with d = ⌈log₂ n⌉, entries bounded by B = c·√(ln n) and error
ε = 1/n, the rank C(d+g, g) the polynomial method needs stays n^{o(1)} for small c and becomes
n^{Ω(1)} past a constant c — the sharp transition at B = Θ(√log n).

Here R = s·d·B² = B² = c² ln n (s = 1/d), and g is the smallest degree whose certificate
η/(1−η)·2 ≤ 1/n (values in [−1, 1]), with δ_g = 2Σ_{k>g} I_k(R) computed in log space.
Falsified if log r / log n does not fall with n for small c, or stays small for large c.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import special

import attnbound

from .common import Result, new_figure, timeit

CS = {"test": [0.25, 0.5, 1.0, 2.0], "small": [0.125, 0.25, 0.375, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0]}
LOG2NS = {"test": [8, 16, 32], "small": [8, 12, 16, 24, 32, 48, 64]}
TIMED = {"test": (512, [0.25]), "small": (4096, [0.2, 0.35])}


def log_tail(radius: float, g: int) -> float:
    """An upper bound on log(2 Σ_{k>g} I_k(R)), in log space (no overflow or underflow).

    log I_k comes from scipy's scaled ive while it is representable; beyond, it continues with
    Amos' bound I_{k+1}(R)/I_k(R) ≤ R/(k + 1/2 + √((k + 3/2)² + R²)), which only overestimates.
    """
    k_stop = g + 200 + int(3 * radius)
    ks = np.arange(0, k_stop + 1)
    with np.errstate(divide="ignore"):
        logs = np.log(special.ive(ks, radius)) + radius
    for k in range(1, k_stop + 1):
        if not np.isfinite(logs[k]) or logs[k] > logs[k - 1] + 1e-9 and k > radius:
            logs[k] = logs[k - 1] + math.log(radius / (k - 0.5 + math.sqrt((k + 0.5) ** 2 + radius**2)))
    tail = logs[g + 1:]
    top = float(tail.max())
    return math.log(2.0) + top + math.log(float(np.exp(tail - top).sum()) * 1.0000001)


def needed_degree(radius: float, eps: float, max_degree: int = 2000) -> int:
    """Smallest g with η/(1−η)·2 ≤ eps, η = δ_g e^R (the certificate of SPEC §3)."""
    target = math.log(eps / (2 + eps))
    lo = 0
    hi = max(8, int(4 * radius) + 8)
    while hi < max_degree and log_tail(radius, hi) + radius > target:
        hi *= 2
    while lo < hi:  # δ_g decreases in g: bisect
        mid = (lo + hi) // 2
        if log_tail(radius, mid) + radius <= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def log_rank(d: int, g: int) -> float:
    return math.lgamma(d + g + 1) - math.lgamma(d + 1) - math.lgamma(g + 1)


def run(scale: str, seed: int, advance) -> Result:
    key = "test" if scale == "test" else "small"
    cs, log2ns = CS[key], LOG2NS[key] if scale in ("test", "small") else LOG2NS["small"] + [96, 128]
    rows = []
    for lg in log2ns:
        n_ln = lg * math.log(2)
        d = lg
        for c in cs:
            radius = c * c * n_ln
            g = needed_degree(radius, 2.0 ** -lg)
            rows.append({"log2_n": lg, "d": d, "c": c, "B": c * math.sqrt(n_ln), "R": radius, "degree": g,
                         "log_rank_over_log_n": log_rank(d, g) / n_ln})
        advance()
    # measured time at a few points below the threshold
    n, tcs = TIMED[key]
    gen = torch.Generator().manual_seed(seed)
    d = math.ceil(math.log2(n))
    timed = []
    for c in tcs:
        B = c * math.sqrt(math.log(n))
        q, k = ((torch.rand(n, d, generator=gen, dtype=torch.float64) * 2 - 1) * B for _ in range(2))
        v = torch.rand(n, 4, generator=gen, dtype=torch.float64) * 2 - 1
        try:
            _, cert = attnbound.attention(q[:4], k, v, scale=1 / d, method="polynomial", eps=1 / n, bound=B,
                                          return_certificate=True)
            tp = timeit(lambda: attnbound.attention(q, k, v, scale=1 / d, method="polynomial", degree=cert.degree,
                                                    bound=B), 1)
            te = timeit(lambda: attnbound.attention(q, k, v, scale=1 / d, method="blockwise"), 1)
            timed.append({"n": n, "d": d, "c": c, "degree": cert.degree, "rank": cert.rank,
                          "polynomial_s": tp, "exact_s": te, "speedup": te / tp})
        except ValueError as exc:
            timed.append({"n": n, "d": d, "c": c, "error": str(exc)})
    advance()
    # verdict: the rank reaches n (exact is then as cheap) at a threshold c* that stays constant as n
    # grows — B* = c*·√(ln n) = Θ(√log n) — and explodes (rank ≥ n²) a constant factor past it.
    crossing = {}
    for lg in log2ns:
        over = [r["c"] for r in rows if r["log2_n"] == lg and r["log_rank_over_log_n"] >= 1.0]
        crossing[lg] = min(over) if over else None
    cstars = [c for c in crossing.values() if c is not None]
    stable = len(cstars) == len(log2ns) and max(cstars) <= 2 * min(cstars)
    explode = all(max(r["log_rank_over_log_n"] for r in rows if r["log2_n"] == lg) >= 2.0 for lg in log2ns)
    verdict = "PASS" if stable and explode else "FAIL"
    s_small = [r["log_rank_over_log_n"] for r in rows if r["c"] == cs[0]]
    reason = (f"rank first reaches n at c* = {', '.join(f'{crossing[lg]}' for lg in log2ns)} for log2 n = "
              f"{', '.join(map(str, log2ns))} ({'a constant' if stable else 'not constant'}: B* = Θ(√ln n)); "
              f"past it log r/log n reaches {max(r['log_rank_over_log_n'] for r in rows):.1f} (rank ≫ n). Below it "
              f"(c={cs[0]}) log r/log n is {s_small[0]:.2f}..{s_small[-1]:.2f}: sub-linear rank, though the o(1) "
              f"with ε = 1/n and d = log₂ n decays only like 1/log log n in this range")
    fig, axes = new_figure(2)
    ax = axes[0]
    for lg in log2ns:
        sub = [r for r in rows if r["log2_n"] == lg]
        ax.plot([r["c"] for r in sub], [r["log_rank_over_log_n"] for r in sub], "o-", ms=3, label=f"n = 2^{lg}")
    ax.axhline(1.0, color="k", ls=":", lw=0.8, label="rank = n (exact is as cheap)")
    if crossing[log2ns[-1]] is not None:
        ax.axvline(crossing[log2ns[-1]], color="r", ls="--", lw=0.8, label="threshold c* (largest n)")
    ax.set_xlabel("c  (B = c·√ln n)"), ax.set_ylabel("log r / log n"), ax.set_yscale("log")
    ax.set_title("Rank needed for ε = 1/n, d = log₂ n"), ax.legend(fontsize=6)
    ax = axes[1]
    for c in cs[:: max(1, len(cs) // 5)]:
        sub = [r for r in rows if r["c"] == c]
        ax.plot([r["log2_n"] for r in sub], [r["degree"] for r in sub], "o-", ms=3, label=f"c = {c}")
    ax.set_xlabel("log₂ n"), ax.set_ylabel("certified degree g"), ax.set_yscale("log")
    ax.set_title("Degree grows like R = c² ln n past the threshold"), ax.legend(fontsize=6)
    return Result("transition", __doc__.split("\n\n")[0], verdict, reason, rows,
                  {"crossing_c": {str(k): v for k, v in crossing.items()}, "timed": timed}, {"transition": fig})


def steps(scale: str) -> int:
    key = "test" if scale == "test" else "small"
    return len(LOG2NS[key]) + 1 + (2 if scale in ("medium", "large") else 0)
