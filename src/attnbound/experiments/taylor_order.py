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
ratios between successive orders do not shrink (above the rounding floor), or the operations
per token are not fixed + c·rank, with c = 4·d_v + 6 read off the engine's code
(:func:`ops_per_rank`) and the fixed part from the order-0 row: every row where the rank term
dominates (the fixed part ≤ 10% of the predicted total; at least 2 per regime) within 10%.
Rows where the fixed part is a larger share are shown, not judged: a per-token cost the model
leaves out (terms in d_v, d·p) is a large share of their tiny totals, and which of them a scale
includes must not decide the claim.
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


def ops_per_rank(d_v: int = DV) -> int:
    """Counted operations per token per unit of rank of the torch feature engine (the path
    :func:`.common.count_ops` runs), read off :mod:`attnbound.engines.features` for n_q = n_k = n:

    - key side, per key: its monomials φ(k), one multiply each (``monomial_features`` builds each
      monomial as a lower one times one variable), and its share of the key state S = φ(K)ᵀ[V, 1],
      one multiply-add — 2 flops — per monomial and column of [v, 1]: 1 + 2·(d_v + 1) per unit of rank;
    - query side, per query: φ(q), one multiply per monomial, and the readout φ(q)·S, again
      2·(d_v + 1) flops per monomial: 1 + 2·(d_v + 1).

    Together 4·(d_v + 1) + 2 = 4·d_v + 6 (22 at d_v = 4). Everything else is the fixed part of the
    prediction: per-token work that does not grow with the rank (scaling q and k, the radius, the
    normalisation by the row sums: terms in d and d_v; the constant monomial needs no multiply) and
    per-call work on the r × (d_v + 1) state (the weighting diag(w)·S, the sums over chunks), which
    is O(r/n) per token — under 0.2% of the rank term at these n."""
    return 4 * d_v + 6


def cost_verdict(rows: list[dict], equal: list[dict], tol: float = 0.1, d_v: int | None = None) -> tuple[str, str]:
    """Operations per token = fixed + c·rank, c = :func:`ops_per_rank` (derived from the code, not fitted),
    the fixed part from the order-0 row (ops/n − c). A row decides only where the rank term dominates its
    prediction — fixed ≤ ``tol``·(fixed + c·rank), a rule on the rank, not on the row's own count — so
    the smallest ranks, where a per-token cost the model leaves out is a large share of a tiny total, are
    shown but do not decide. PASS when every deciding row is within ``tol`` (relative) of fixed + c·rank and
    each regime has ≥ 2 deciding rows; FAIL when a deciding row is off (a cost growing like rank·d or rank²);
    INCONCLUSIVE when a regime has fewer than 2 deciding rows, or there is no order-0 row. The slope of ops
    per token against the rank, least squares over each regime's deciding rows, is shown beside c.
    ``d_v``: the value width (default: the rows' ``d_v``, else :data:`DV`)."""
    base = [r for r in rows if r["order"] == 0]
    if not base:
        return "INCONCLUSIVE", "no order-0 row to read the fixed part of the cost from"
    c = ops_per_rank(d_v if d_v is not None else base[0].get("d_v", DV))
    fixed = base[0]["ops"] / base[0]["n"] - c * base[0]["rank"]
    deciding, shown, off, slopes, few = {}, [], [], [], []
    for regime, rs in ((f"d = {D}", rows), ("d = p", equal)):
        deciding[regime] = []
        for r in rs:
            if r["order"] == 0:
                continue
            y, pred = r["ops"] / r["n"], fixed + c * r["rank"]
            dev = (y - pred) / y
            label = f"rank {r['rank']}" + ("" if regime == f"d = {D}" else f" (d = {r['d']})")
            if abs(fixed) <= tol * pred:
                deciding[regime].append(r)
                if abs(dev) > tol:
                    off.append(f"{regime} {label}: {y:.4g} vs {pred:.4g} predicted ({dev:+.1%})")
            else:
                shown.append(f"{regime} {label}: {y:.4g} vs {pred:.4g} ({dev:+.1%}, fixed part "
                             f"{abs(fixed) / pred:.0%} of it)")
        ds = deciding[regime]
        if len(ds) < 2:
            few.append(f"{regime} has {len(ds)} row{'s' * (len(ds) != 1)} where the rank term dominates (needs 2)")
            continue
        slope = float(np.polyfit([r["rank"] for r in ds], [r["ops"] / r["n"] for r in ds], 1)[0])
        slopes.append(f"{slope:.2f} ({regime})")
    judged = [r for ds in deciding.values() for r in ds]
    worst = max((abs(r["ops"] / r["n"] - fixed - c * r["rank"]) / (r["ops"] / r["n"]) for r in judged), default=0.0)
    ranges = "; ".join(f"{regime}: ranks {ds[0]['rank']}–{ds[-1]['rank']}" if ds else f"{regime}: none"
                       for regime, ds in deciding.items())
    v = "FAIL" if off else "INCONCLUSIVE" if few else "PASS"
    why = (f"ops per token = {fixed:.3g} + {c}·rank (c = 4·d_v + 6 from the engine's code, the fixed part from "
           f"the order-0 row) within {worst:.1%} at the {len(judged)} rows where the rank term dominates (fixed ≤ "
           f"{tol:.0%} of the total; {ranges}): ")
    why += {"FAIL": f"NOT proportional to the rank (tolerance {tol:.0%}) at {'; '.join(off)}",
            "INCONCLUSIVE": f"too few rows to decide ({'; '.join(few)})",
            "PASS": f"proportional to the rank (tolerance {tol:.0%})"}[v]
    if slopes:
        why += f"; slope fitted over them {', '.join(slopes)} beside c = {c}"
    if shown:
        why += f"; shown, not deciding: {'; '.join(shown)}"
    return v, why


def verdict(rows: list[dict], equal: list[dict], tol: float = 0.1, d_v: int | None = None) -> tuple[str, str]:
    """PASS when (1) measured ≤ certificate at every order, (2) successive error ratios shrink above the
    rounding floor, (3) the operations per token are fixed + c·rank within ``tol`` wherever the rank term
    dominates (:func:`cost_verdict`); FAIL when any part fails, INCONCLUSIVE when (3) cannot decide."""
    errs = [r["measured_max_error"] for r in rows]
    above = [e for e in errs if e > FLOOR]
    ratios = [b / a for a, b in zip(above, above[1:])]
    superexp = len(ratios) >= 2 and all(r2 < r1 for r1, r2 in zip(ratios, ratios[1:]))
    over = [r["order"] for r in rows if not r["measured_max_error"] <= r["certificate"]]
    v_cost, why_cost = cost_verdict(rows, equal, tol, d_v)
    fixed_growth = [b["rank"] / a["rank"] for a, b in zip(rows, rows[1:])]
    equal_growth = [b["rank"] / a["rank"] for a, b in zip(equal, equal[1:])]
    parts = [
        f"error ratios between successive orders {', '.join(f'{x:.2g}' for x in ratios)} "
        f"({'shrinking: super-exponential' if superexp else 'NOT shrinking'})",
        "measured ≤ certificate at every order" if not over else f"measured ABOVE the certificate at p = {over}",
        why_cost,
        f"rank growth per two orders at d = {D}: ×{fixed_growth[0]:.2f} → ×{fixed_growth[-1]:.2f} (polynomial in p); "
        f"at d = p: ×{min(equal_growth):.1f}–×{max(equal_growth):.1f} (exponential)" if fixed_growth and equal_growth else "",
    ]
    v = combine(["PASS" if superexp and not over else "FAIL", v_cost])
    return v, "; ".join(p for p in parts if p)


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
        rows.append({"regime": f"d = {D}", "d": D, "d_v": DV, "order": p, "n": n, "rank": math.comb(D + p, p),
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
        equal.append({"regime": "d = p", "d": p, "d_v": DV, "order": p, "n": n_eq, "rank": math.comb(2 * p, p),
                      "ops": ops.total})
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
