"""Claim (Baur–Strassen; seed 002's large-embedding argument): reverse mode computes the gradient of
a function with at most 5 times the operations of the function, for every attention method at
every n; and at small scale s the gradient of f(Q) = ⟨W, Att(Q, K, V)⟩ is the matrix product
(s/N)·W·Vᵀ(I − J/N)·K + O(s²), so a fast forward pass would give fast matrix multiplication.

Part 1 counts operations (matmul flops + elementwise ops, :func:`.common.count_ops`) of f alone
and of f plus its backward pass, with the *same* forward code in both (inputs require gradients
in both; the first count simply stops before ``backward``). Deterministic: shapes decide the
counts. Falsified if any ratio ops(f + ∇f)/ops(f) exceeds 5.

Part 2 (N tokens, embedding m = N, float64): ∇_Q f by autograd at s = 10⁻² … 10⁻⁵ against
(s/N)·W·Vᵀ(I − J/N)·K, J the all-ones matrix. The relative error must shrink like s (log-log
slope 1 ± 0.15) and be below 10⁻³ at the smallest s. Seed 002 concludes T ≥ N^{ω−o(1)} operations
per head for a forward pass in the large-embedding regime m = N; the error slope is what can be
measured of that mechanism.
"""

from __future__ import annotations

import math

import torch

import attnbound

from .common import Result, combine, count_ops, fit_slope, fmt_count, new_figure

NS = {"test": [64, 256], "small": [128, 512, 2048], "medium": [256, 1024, 4096], "large": [256, 1024, 4096]}
METHODS = (("dense", {}), ("blockwise", {"block_size": 256}), ("polynomial", {"degree": 4}), ("taylor", {"order": 2}))
LARGE_N = {"test": 32, "small": 64, "medium": 128, "large": 128}
SCALES_S = (1e-2, 1e-3, 1e-4, 1e-5)
BAUR_STRASSEN = 5.0


def op_ratio(method: str, kw: dict, n: int, d: int, seed: int) -> dict:
    """Operation counts of f = ⟨W, attention(q, k, v)⟩ and of f with its backward pass."""
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(1, 2, n, d, generator=gen, dtype=torch.float64) * 0.5 for _ in range(3)]
    w = torch.randn(1, 2, n, d, generator=gen, dtype=torch.float64)
    leaves = [b.clone().requires_grad_() for b in base]

    def f():
        return (attnbound.attention(*leaves, method=method, strict=False, **kw) * w).sum()

    def f_and_grad():
        y = f()
        y.backward()
        return y

    fwd, _ = count_ops(f)
    both, _ = count_ops(f_and_grad)
    return {"n": n, "d": d, "method": method, "forward_ops": fwd.total, "forward_matmul": fwd.matmul,
            "forward_backward_ops": both.total, "ratio": both.total / fwd.total}


def gradient_vs_product(n: int, s: float, seed: int) -> dict:
    """Relative error of ∇_Q⟨W, Att(Q, K, V)⟩ / s against (1/N)·W·Vᵀ(I − J/N)·K, embedding m = N."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, w = (torch.randn(n, n, generator=gen, dtype=torch.float64) for _ in range(4))
    q.requires_grad_()
    f = (attnbound.attention(q, k, v, scale=s, method="dense") * w).sum()
    (grad,) = torch.autograd.grad(f, q)
    centred = v.T - v.T.mean(1, keepdim=True)  # Vᵀ(I − J/N)
    product = (w @ centred @ k) / n
    err = float((grad / s - product).norm() / product.norm())
    return {"N": n, "m": n, "s": s, "relative_error": err}


def verdict_ratios(rows: list[dict], bound: float = BAUR_STRASSEN) -> tuple[str, str]:
    """PASS when every ops(f + ∇f)/ops(f) ≤ bound (and ≥ 1: a backward pass cannot be free)."""
    if not rows:
        return "INCONCLUSIVE", "no operation counts"
    worst = max(rows, key=lambda r: r["ratio"])
    low = min(rows, key=lambda r: r["ratio"])
    ok = worst["ratio"] <= bound and low["ratio"] >= 1.0
    methods = sorted({r["method"] for r in rows})
    per = ", ".join(f"{m} {min(r['ratio'] for r in rows if r['method'] == m):.2f}–"
                    f"{max(r['ratio'] for r in rows if r['method'] == m):.2f}" for m in methods)
    ns = sorted({r["n"] for r in rows if r.get("d") != r["n"]})
    why = (f"ops(f + ∇f)/ops(f) over n = {', '.join(map(str, ns))}: {per}; largest {worst['ratio']:.2f} "
           f"({worst['method']}, n = {worst['n']}) {'≤' if worst['ratio'] <= bound else '>'} {bound:g}")
    if low["ratio"] < 1.0:
        why += f"; {low['method']} at n = {low['n']} counts {low['ratio']:.2f} < 1, impossible for a backward pass"
    return ("PASS" if ok else "FAIL"), why


def verdict_product(rows: list[dict], slope_tol: float = 0.15, floor: float = 1e-3) -> tuple[str, str]:
    """PASS when the relative error of ∇f/s against the matrix product shrinks like s (slope 1)
    and is below ``floor`` at the smallest s."""
    ss = [r["s"] for r in rows]
    errs = [r["relative_error"] for r in rows]
    if len(rows) < 3 or min(errs) <= 0:
        return "INCONCLUSIVE", "too few scales to fit how the error shrinks"
    slope, lo, hi = fit_slope(ss, errs)
    smallest = errs[ss.index(min(ss))]
    ok = abs(slope - 1.0) <= slope_tol and smallest <= floor
    why = (f"‖∇_Q f/s − W·Vᵀ(I − J/N)K/N‖/‖…‖ falls from {max(errs):.2g} to {smallest:.2g} as s goes "
           f"{max(ss):g} → {min(ss):g}: slope {slope:.2f} (predicted 1 ± {slope_tol:g}, error "
           f"{'≤' if smallest <= floor else '>'} {floor:g} at the smallest s)")
    return ("PASS" if ok else "FAIL"), why


def run(scale: str, seed: int, advance) -> Result:
    d = 8
    rows = []
    for n in NS[scale]:
        for method, kw in METHODS:
            rows.append(op_ratio(method, kw, n, d, seed))
        advance()
    n_large = LARGE_N[scale]
    large = op_ratio("dense", {}, n_large, n_large, seed)  # m = N: the large-embedding regime
    large["method"] = "dense, m = N"
    rows.append(large)
    product = [gradient_vs_product(n_large, s, seed) for s in SCALES_S]
    advance()
    v1, why1 = verdict_ratios(rows)
    v2, why2 = verdict_product(product)
    verdict = combine([v1, v2])
    reason = f"{why1} → {v1}. Large embedding (N = m = {n_large}): {why2} → {v2}."
    fig, axes = new_figure(2)
    ax = axes[0]
    for m in [m for m, _ in METHODS]:
        sub = [r for r in rows if r["method"] == m]
        ax.plot([r["n"] for r in sub], [r["ratio"] for r in sub], "o-", label=m)
    ax.plot([large["n"]], [large["ratio"]], "k*", ms=10, label=f"dense, m = N = {n_large}")
    ax.axhline(BAUR_STRASSEN, color="r", ls="--", lw=1, label="Baur–Strassen bound 5")
    ax.axhline(1.0, color="k", ls=":", lw=0.8)
    ax.set_xscale("log", base=2), ax.set_ylim(0, 6)
    ax.set_xlabel("n (tokens)"), ax.set_ylabel("ops(f + ∇f) / ops(f)")
    ax.set_title("Gradient cost by operation count (d = 8)", fontsize=10), ax.legend(fontsize=7, loc="lower right")
    ax = axes[1]
    ss = [r["s"] for r in product]
    errs = [r["relative_error"] for r in product]
    ax.loglog(ss, errs, "o-", label="measured relative error")
    ax.loglog(ss, [errs[0] * s / ss[0] for s in ss], "k:", label="∝ s (prediction)")
    ax.set_xlabel("scale s"), ax.set_ylabel("‖∇f/s − W·Vᵀ(I−J/N)K/N‖ / ‖…‖")
    ax.set_title(f"Gradient = matrix product + O(s²) (N = m = {n_large})", fontsize=10), ax.legend(fontsize=7)
    numbers = {"d": d, "bound": BAUR_STRASSEN, "product": product,
               "max_ratio": max(r["ratio"] for r in rows), "forward_ops_largest": fmt_count(max(r["forward_ops"] for r in rows))}
    return Result("gradient", __doc__.split("\n\n")[0], verdict, reason, rows, numbers, {"gradient": fig})


def steps(scale: str) -> int:
    return len(NS[scale]) + 1
