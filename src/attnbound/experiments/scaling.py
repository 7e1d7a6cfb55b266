"""Claim (cost of the algorithms, the upper-bound side): exact attention — the standard algorithm —
performs Θ(n²d) operations (log-log slope 2 in n), the polynomial method at a fixed degree
Θ(n·r·d_v) (slope 1); and in Alman–Song's setting (ε = 1/n, B = (ln n)^{1/4} = o(√log n), degree
re-certified at each n) the cost stays Θ(n·r) while the rank r grows sub-polynomially, so the
exponent of n tends to 1. (Keles et al.'s quadratic lower bound is a conditional worst-case
statement about all algorithms; these bounded inputs are exactly where it does not apply.)

Verdicts come from operation counts (:func:`.common.count_ops`: matmul flops + elementwise ops),
which are deterministic: slope 2 ± 0.05 for exact (blockwise), 1 ± 0.05 for the polynomial method
at the degree certified for ε = 10⁻³ at R = 1; for the Alman–Song series ops/(n·r) constant within
a factor 1.5 and log r / log n falling (its largest value over the top half of 2⁸ … 2⁴⁰ below its
smallest over the bottom half; ranks there are arithmetic, d = 4 fixed so that the timed runs stay
affordable — the transition experiment has d = log₂ n).

Wall time is an illustration only: each point is the minimum over interleaved rounds, and
t = a + b·ops is fitted per method; while the fixed cost a is most of the largest time the timing
is reported INCONCLUSIVE (it says nothing about growth), and it never decides the verdict.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import attnbound

from .transition import needed_degree
from .common import Result, combine, count_ops, fit_slope, interleaved_min_times, new_figure, overhead_fit, slope_verdict

NS_COUNT = {"test": [256, 512, 1024], "small": [1024, 2048, 4096, 8192], "medium": [2048, 4096, 8192, 16384],
            "large": [4096, 8192, 16384, 32768]}
NS_TIME = {"test": [128, 256, 512], "small": [1024, 2048, 4096, 8192], "medium": [4096, 8192, 16384, 32768],
           "large": [8192, 16384, 32768, 65536]}
ROUNDS = {"test": 1, "small": 3, "medium": 3, "large": 3}
AS_LOG2NS = list(range(8, 41))
D, RADIUS, EPS = 8, 1.0, 1e-3
AS_D = 4
SLOPE_TOL = 0.05


def _inputs(n, d, radius, gen):
    q, k, v = (torch.randn(1, 1, n, d, generator=gen) for _ in range(3))
    c = math.sqrt(radius / (float(q.norm(dim=-1).max()) * float(k.norm(dim=-1).max()) / math.sqrt(d)))
    return q * c, k * c, v


def alman_song_inputs(n: int, gen) -> tuple:
    """d = 4, entries uniform in [−B, B] with B = (ln n)^{1/4}, float64 values in [−1, 1]."""
    b = math.log(n) ** 0.25
    q, k = ((torch.rand(1, 1, n, AS_D, generator=gen, dtype=torch.float64) * 2 - 1) * b for _ in range(2))
    v = torch.rand(1, 1, n, AS_D, generator=gen, dtype=torch.float64) * 2 - 1
    return q, k, v, b


def alman_song_rank(log2_n: int) -> tuple[int, int]:
    """(degree, rank) for ε = 1/n at R = B² = √ln n, d = 4: the Chebyshev tail summed in log space
    (:func:`.transition.needed_degree`; attnbound's float64 certificate cannot reach ε = 2^-40)."""
    ln_n = log2_n * math.log(2)
    g = needed_degree(math.sqrt(ln_n), -ln_n)
    return g, math.comb(AS_D + g, g)


def verdict_slopes(ns, ops: dict, targets: dict, tol: float = SLOPE_TOL) -> tuple[str, list[str], dict]:
    """Each series' op-count slope against its target (deterministic counts: the CI is the fit's)."""
    verdicts, reasons, fits = [], [], {}
    for key, target in targets.items():
        slope, lo, hi = fit_slope(ns, ops[key])
        fits[key] = {"slope": slope, "ci_low": lo, "ci_high": hi}
        v, why = slope_verdict(slope, lo, hi, target, tol)
        verdicts.append(v)
        reasons.append(f"{key} op-count {why} → {v}")
    return combine(verdicts), reasons, fits


def verdict_alman_song(series: list[dict], ranks: list[tuple[int, int]], band: float = 1.5) -> tuple[str, str]:
    """Cost Θ(n·r): ops/(n·r) within a factor ``band``; rank sub-polynomial: log r/log n over the top
    half of ``ranks`` [(log2 n, rank)] stays below its smallest value over the bottom half."""
    per = [s["ops"] / (s["n"] * s["rank"]) for s in series]
    spread = max(per) / min(per)
    expo = [math.log(r) / (lg * math.log(2)) for lg, r in ranks]
    half = len(expo) // 2
    falling = max(expo[half:]) < min(expo[:half])
    ok = spread <= band and falling
    why = (f"Alman–Song series (d = {AS_D}, ε = 1/n, B = (ln n)^(1/4)): degree {series[0]['degree']} → "
           f"{series[-1]['degree']}, rank {series[0]['rank']} → {series[-1]['rank']} over n = {series[0]['n']} … "
           f"{series[-1]['n']}; ops/(n·r) spread ×{spread:.2f} (Θ(n·r) if ≤ ×{band:g}); log r/log n "
           f"{expo[0]:.2f} (n = 2^{ranks[0][0]}) → {expo[-1]:.2f} (n = 2^{ranks[-1][0]}), "
           f"{'falling' if falling else 'not falling'}")
    return ("PASS" if ok else "FAIL"), why


def timing_status(fits: dict) -> str:
    parts = []
    for key, f in fits.items():
        if f["dominated"]:
            state = "INCONCLUSIVE (fixed cost dominates)"
        elif f["max_relative_residual"] > 0.3:
            state = f"INCONCLUSIVE (time off t = a + b·ops by up to {f['max_relative_residual']:.0%}: load or caches)"
        else:
            state = f"follows the op count (time slope {f['time_slope']:.2f})"
        parts.append(f"{key}: fixed cost {f['fixed_s'] * 1e3:.2g} ms = {f['fixed_share']:.0%} of the largest time, {state}")
    return "; ".join(parts)


def run(scale: str, seed: int, advance) -> Result:
    gen = torch.Generator().manual_seed(seed)
    ns_c, ns_t = NS_COUNT[scale], NS_TIME[scale]
    q0, k0, v0 = _inputs(ns_c[0], D, RADIUS, gen)
    g = attnbound.attention(q0, k0, v0, method="polynomial", eps=EPS, return_certificate=True)[1].degree
    rows, ops = [], {"exact": [], "polynomial": []}
    for n in ns_c:
        q, k, v = _inputs(n, D, RADIUS, gen)
        ce, _ = count_ops(lambda: attnbound.attention(q, k, v, method="blockwise"))
        cp, _ = count_ops(lambda: attnbound.attention(q, k, v, method="polynomial", degree=g))
        ops["exact"].append(ce.total)
        ops["polynomial"].append(cp.total)
        rows.append({"series": "op counts", "n": n, "exact_ops": ce.total, "polynomial_ops": cp.total,
                     "polynomial_degree": g, "polynomial_rank": attnbound.feature_rank(D, g)})
    advance()
    v1, reasons, fits = verdict_slopes(ns_c, ops, {"exact": 2.0, "polynomial": 1.0})

    # Alman–Song series: degree re-certified at each n (the api picks it for eps = 1/n and bound B)
    series = []
    for n in ns_t:
        q, k, v, b = alman_song_inputs(n, gen)
        _, cert = attnbound.attention(q[..., :4, :], k, v, scale=1 / AS_D, method="polynomial", eps=1.0 / n, bound=b,
                                      return_certificate=True)
        c, _ = count_ops(lambda: attnbound.attention(q, k, v, scale=1 / AS_D, method="polynomial",
                                                     degree=cert.degree, bound=b))
        series.append({"series": "alman-song", "n": n, "B": b, "R": cert.radius, "degree": cert.degree,
                       "rank": cert.rank, "ops": c.total, "certificate": cert.output_error_bound})
    ranks = [(lg, alman_song_rank(lg)[1]) for lg in AS_LOG2NS]
    v2, why2 = verdict_alman_song(series, ranks)
    advance()

    # wall time, illustration only
    timed_rows, fns, work = [], {}, {}
    for n, s in zip(ns_t, series):
        q, k, v = _inputs(n, D, RADIUS, gen)
        qa, ka, va, b = alman_song_inputs(n, gen)
        fns[("exact (blockwise)", n)] = lambda q=q, k=k, v=v: attnbound.attention(q, k, v, method="blockwise")
        fns[("torch SDPA", n)] = lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)
        fns[(f"polynomial g={g}", n)] = lambda q=q, k=k, v=v: attnbound.attention(q, k, v, method="polynomial", degree=g)
        fns[("Alman–Song series", n)] = lambda q=qa, k=ka, v=va, b=b, dg=s["degree"]: attnbound.attention(
            q, k, v, scale=1 / AS_D, method="polynomial", degree=dg, bound=b)
        # counts measured up to ns_c[-1]; beyond, scaled by the fitted powers (2 and 1)
        work[("exact (blockwise)", n)] = work[("torch SDPA", n)] = ops["exact"][-1] * (n / ns_c[-1]) ** 2
        work[(f"polynomial g={g}", n)] = ops["polynomial"][-1] * n / ns_c[-1]
        work[("Alman–Song series", n)] = s["ops"]
        advance()
    best = interleaved_min_times(fns, ROUNDS[scale])
    tfits = {}
    for label in dict.fromkeys(key[0] for key in fns):
        xs = [n for (lab, n) in fns if lab == label]
        ts = [best[(label, n)] for n in xs]
        f = overhead_fit([work[(label, n)] for n in xs], ts)
        f["time_slope"] = fit_slope(xs, ts)[0]
        tfits[label] = f
        for n, t in zip(xs, ts):
            timed_rows.append({"series": "time", "method": label, "n": n, "seconds_min": t, "ops": work[(label, n)]})
    verdict = combine([v1, v2])
    reason = ("; ".join(reasons) + f". {why2} → {v2}. Wall time (illustration, min of {ROUNDS[scale]} interleaved "
              f"rounds, not part of the verdict): {timing_status(tfits)}.")
    figs = _figures(ns_c, ops, fits, g, series, ranks, timed_rows, tfits)
    numbers = {"fits": fits, "time_fits": tfits, "d": D, "radius": RADIUS, "eps": EPS, "degree": g,
               "alman_song": series}
    return Result("scaling", __doc__.split("\n\n")[0], verdict, reason, rows + series + timed_rows, numbers, figs)


def _figures(ns_c, ops, fits, g, series, ranks, timed_rows, tfits):
    fig, axes = new_figure(3, width=5.0, height=4.2)
    ax = axes[0]
    for key, label in (("exact", "exact (blockwise)"), ("polynomial", f"polynomial, degree {g}")):
        ax.loglog(ns_c, ops[key], "o-", label=f"{label}: slope {fits[key]['slope']:.3f}")
    for p, style in ((2, ":"), (1, "--")):
        ref = ops["exact" if p == 2 else "polynomial"][-1]
        ax.loglog(ns_c, [ref * (n / ns_c[-1]) ** p for n in ns_c], "k" + style, lw=0.8, label=f"∝ n^{p} (prediction)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n"), ax.set_ylabel("operations (matmul flops + elementwise)")
    ax.set_title(f"Operation counts (d = {D}, R = {RADIUS:g})", fontsize=10), ax.legend(fontsize=7)
    ax = axes[1]
    lgs = [lg for lg, _ in ranks]
    ax.plot(lgs, [math.log(r) / (lg * math.log(2)) for lg, r in ranks], "o-", ms=3, label="log r / log n (certified)")
    ax.plot([math.log2(s["n"]) for s in series], [math.log(s["rank"]) / math.log(s["n"]) for s in series], "r*", ms=9,
            label="timed points")
    ax.set_xlabel("log₂ n"), ax.set_ylabel("log r / log n")
    ax.set_title(f"Alman–Song series: ε = 1/n, B = (ln n)^(1/4), d = {AS_D}", fontsize=10), ax.legend(fontsize=7)
    ax = axes[2]
    for i, label in enumerate(tfits):
        sub = [r for r in timed_rows if r["method"] == label]
        ax.loglog([r["n"] for r in sub], [r["seconds_min"] for r in sub], "o-", color=f"C{i}",
                  label=f"{label}: fixed {tfits[label]['fixed_s'] * 1e3:.2g} ms")
        f = tfits[label]
        ax.loglog([r["n"] for r in sub], [f["fixed_s"] + f["per_unit_s"] * r["ops"] for r in sub], ":", color=f"C{i}",
                  lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n"), ax.set_ylabel("seconds (min over rounds)")
    ax.set_title("Wall time (illustration; dotted: t = a + b·ops)", fontsize=10), ax.legend(fontsize=7)
    return {"scaling": fig}


def steps(scale: str) -> int:
    return 2 + len(NS_TIME[scale])
