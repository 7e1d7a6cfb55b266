"""Claim (Alman–Song, NeurIPS 2024, the backward pass): in the bounded regime certified attention trains beside
exact attention with a gradient bound that holds at every step, its backward costs a constant times its forward
in operations (Baur–Strassen: ≤ 5), and the gradient has the forward's threshold B* ∝ √(ln n).

Part 1 (training): a 2-layer transformer (embedding 16, 2 heads of 8, no LayerNorm so the radius stays small,
n tokens) trained with SGD from one initialisation on one synthetic task, once with exact attention and once
with ``method="relative", eps=1e-3``. Every step records both losses and, per layer, the forward bound and the
gradient bounds (:mod:`attnbound.gradient`). At sampled steps each layer's certified backward is recomputed on
the layer's saved q, k, v and upstream gradient and compared with exact attention's gradient in float64 (whose
own gradient certificate is added to the bound): every measured error must be ≤ its bound (FAIL otherwise). The
losses are shown, not judged.

Part 2 (operations): ops(f + ∇f)/ops(f) for one certified call, counted by :func:`.common.count_ops` (the
torch reference path of the same products), and for the fused backward the multiply-adds it performs
(2·n·r·C for dS and dV, 2·(n·r·C + 3n·r) for the two adjoint walks) over the forward's (2·n·r·C + 2n·r): both ≤ 5.

Part 3 (threshold, exact arithmetic as in ``transition``): d = ⌈log₂ n⌉, R = B², gradient error 1/n needs
η₁ ≤ 1/(2n) beside η ≤ 1/(2n), with the Chebyshev derivative tail η₁ ≤ e^R/R·2Σ_{k>g} k²I_k(R) (|T_k'| ≤ k²);
B*_grad is where the rank reaches n. The exponent a of B*_grad ∝ (ln n)^a over the top sizes must be ½ ± 0.05
(the forward's law); the ratio B*_grad/B*_fwd is shown.
"""

from __future__ import annotations

import math

import numpy as np
import torch

import attnbound

from .common import Result, combine, new_figure
from .gradient import op_ratio
from .transition import LOG2NS, log_bessel, log_rank, needed_degree, threshold_bound, verdict_exponent

STEPS = {"test": 12, "small": 100, "medium": 300, "large": 300}
TOKENS = {"test": 32, "small": 64, "medium": 96, "large": 128}
EVERY = {"test": 4, "small": 20, "medium": 30, "large": 30}
EMBED, HEADS, LAYERS, LR, EPS = 16, 2, 2, 0.2, 1e-3
BAUR_STRASSEN = 5.0


def _task(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, n, EMBED, generator=g) * 0.3
    mix = torch.randn(EMBED, EMBED, generator=g) / math.sqrt(EMBED)
    return x, torch.roll(x, 1, dims=1) @ mix  # a linear map of the previous token


def _model(seed: int, method: str):
    from ..nn import Transformer

    torch.manual_seed(seed)
    return Transformer(LAYERS, EMBED, HEADS, method=method, eps=EPS if method != "exact" else None, norm=False)


def check_layer(cert) -> dict:
    """Recompute one layer's certified backward on its saved inputs and upstream gradient; compare with exact
    attention's float64 gradient. Returns the measured errors and the bounds (the reference's own added)."""
    slot = cert.__dict__["_gradient_slot"]
    q, k, v = slot._tensors[:3]
    grad = slot._grad
    gc = slot.certificate
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = attnbound.attention(*leaves, method=cert.method, degree=cert.degree, is_causal=slot.spec.is_causal,
                              scale=slot.spec.scale)
    out.backward(grad)
    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref, rcert = attnbound.attention(*exact, method="dense", is_causal=slot.spec.is_causal, scale=slot.spec.scale,
                                     return_certificate=True)
    ref.backward(grad.double())
    rgc = rcert.gradient_certificate
    errs = [float((a.grad.double() - b.grad).abs().max()) for a, b in zip(leaves, exact)]
    bounds = [gc.dq_bound + rgc.dq_bound, gc.dk_bound + rgc.dk_bound, gc.dv_bound + rgc.dv_bound]
    return {"dq_error": errs[0], "dk_error": errs[1], "dv_error": errs[2], "dq_bound": bounds[0],
            "dk_bound": bounds[1], "dv_bound": bounds[2], "degree": cert.degree, "radius": cert.radius}


def train(scale: str, seed: int, advance=lambda: None) -> tuple[list[dict], list[dict]]:
    """(per-step rows, sampled gradient checks) of the side-by-side training."""
    n, steps, every = TOKENS[scale], STEPS[scale], EVERY[scale]
    x, y = _task(n, seed)
    models = {m: _model(seed, m) for m in ("exact", "relative")}
    opts = {m: torch.optim.SGD(models[m].parameters(), lr=LR) for m in models}
    rows, checks = [], []
    for step in range(steps):
        row = {"step": step}
        for m, model in models.items():
            loss = (model(x) - y).square().mean()
            opts[m].zero_grad()
            loss.backward()
            row[f"loss_{m}"] = loss.item()
            if m == "relative":
                fwd = model.last_certificates
                grads = model.last_gradient_certificates
                row["forward_bound"] = max(c.output_error_bound for c in fwd)
                row["gradient_bound"] = max(g.bound for g in grads)
                row["radius"] = max(c.radius for c in fwd)
                row["degree"] = max(c.degree for c in fwd)
                if step % every == 0 or step == steps - 1:
                    for layer, c in enumerate(fwd):
                        checks.append({"step": step, "layer": layer} | check_layer(c))
            opts[m].step()
        rows.append(row)
        if step % max(1, steps // 4) == 0:
            advance()
    return rows, checks


def op_ratios(n: int, seed: int) -> dict:
    """Counted ops of f and f + ∇f for one certified call (:func:`.gradient.op_ratio`: the torch reference path),
    and the fused backward's multiply-adds over its forward's (the formula of the module docstring)."""
    row = op_ratio("relative", {"eps": EPS}, n, 8, seed)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) * 0.5 for _ in range(3))
    r = attnbound.attention(q, k, v, method="relative", eps=EPS, return_certificate=True)[1].rank
    fused_fwd, fused_bwd = fused_multiply_adds(n, r, 9)
    return row | {"rank": r, "fused_ratio": (fused_fwd + fused_bwd) / fused_fwd}


def fused_multiply_adds(n: int, rank: int, columns: int) -> tuple[int, int]:
    """(forward, backward) multiply-adds of the fused kernels for one head of n rows, rank r, C = d_v + 1 columns:
    key state and readout n·r·C each plus n·r monomials; backward dS and dV n·r·C each plus the two adjoint walks,
    n·r·C + 3n·r each."""
    fwd = 2 * n * rank * columns + 2 * n * rank
    return fwd, 2 * n * rank * columns + 2 * (n * rank * columns + 3 * n * rank)


# ---------------------------------------------------------------- the gradient threshold (exact arithmetic)


def log_derivative_tail_all(radius: float, k_max: int) -> np.ndarray:
    """t[g] ≥ log(2 Σ_{k>g} k² I_k(R)) for g = 0..k_max, closed geometrically past k_max
    ((k+1)² I_{k+1} ≤ ρ k² I_k with ρ = R(k+1)/(2k²) ≤ ½ once k_max ≥ 2R + 2)."""
    k_max = max(k_max, int(math.ceil(2 * radius)) + 4)
    logs = log_bessel(radius, k_max) + 2.0 * np.log(np.maximum(np.arange(k_max + 1), 1e-300))
    rho = radius * (k_max + 1) / (2.0 * k_max * k_max)
    remainder = logs[-1] + math.log(rho / (1 - rho))
    suffix = np.logaddexp.accumulate(logs[::-1])[::-1]
    above = np.append(suffix[1:], -np.inf)
    return math.log(2.0) + np.logaddexp(above, remainder)


def gradient_degree(radius: float, log_eps: float) -> int:
    """Smallest g with η₁ = e^R/R·2Σ_{k>g} k²I_k(R) ≤ ε/2 and the forward's η ≤ ε/2 (``log_eps`` = ln ε)."""
    if radius <= 0:
        return 1
    g_fwd = needed_degree(radius, log_eps - math.log(2.0))
    k_max = int(3 * radius) + 400
    target = log_eps - math.log(2.0) - radius + math.log(radius)
    while True:
        ok = np.nonzero(log_derivative_tail_all(radius, k_max) <= target)[0]
        if len(ok) and ok[0] < k_max - 10:
            return max(int(ok[0]), g_fwd)
        k_max *= 2


def gradient_rank_exponent(log2_n: int, bound: float) -> tuple[int, float]:
    ln_n = log2_n * math.log(2)
    g = gradient_degree(bound * bound, -ln_n)
    return g, log_rank(log2_n, g) / ln_n


def gradient_threshold(log2_n: int, iters: int = 30) -> float:
    """B*_grad: the smallest B at which the gradient's certified rank reaches n (bisection, as the forward's)."""
    return threshold_bound(log2_n, iters, exponent=gradient_rank_exponent)


# ---------------------------------------------------------------- verdicts (pure functions of the data)


def verdict_bounds(checks: list[dict]) -> tuple[str, str]:
    """PASS when every sampled measured gradient error is ≤ its bound and every bound is finite (an infinite bound
    certifies nothing: FAIL)."""
    if not checks:
        return "INCONCLUSIVE", "no sampled gradient checks"
    unbounded = [c for c in checks for x in ("dq", "dk", "dv") if not math.isfinite(c[f"{x}_bound"])]
    if unbounded:
        c = unbounded[0]
        return "FAIL", f"step {c['step']} layer {c['layer']}: no finite gradient bound"
    bad = [c for c in checks for x in ("dq", "dk", "dv") if not c[f"{x}_error"] <= c[f"{x}_bound"]]
    worst = max((c[f"{x}_error"] / c[f"{x}_bound"] for c in checks for x in ("dq", "dk", "dv") if c[f"{x}_bound"] > 0),
                default=0.0)
    why = (f"{len(checks)} layer-steps checked against float64 exact gradients: largest error/bound "
           f"{worst:.2g}")
    if bad:
        c = bad[0]
        return "FAIL", why + f"; step {c['step']} layer {c['layer']} exceeds its bound"
    return "PASS", why + " ≤ 1"


def verdict_ops(rows: list[dict], bound: float = BAUR_STRASSEN) -> tuple[str, str]:
    """PASS when every counted ratio ops(f + ∇f)/ops(f) is in [1, bound] (the fused backward's formula ratio, the
    same at every n, is shown beside it, not judged)."""
    if not rows:
        return "INCONCLUSIVE", "no operation counts"
    ok = all(1.0 <= r["ratio"] <= bound for r in rows)
    why = (f"ops(f + ∇f)/ops(f) counted {min(r['ratio'] for r in rows):.2f}–{max(r['ratio'] for r in rows):.2f} "
           f"({'within' if ok else 'not within'} [1, {bound:g}]; the fused backward's multiply-adds "
           f"{max(r['fused_ratio'] for r in rows):.2f}× its forward's)")
    return ("PASS" if ok else "FAIL"), why


def run(scale: str, seed: int, advance) -> Result:
    rows, checks = train(scale, seed, advance)
    ops = [op_ratios(n, seed) for n in ((64, 256) if scale == "test" else (64, 256, 1024))]
    advance()
    log2ns = LOG2NS if scale != "test" else LOG2NS[:9]
    grad_b = [gradient_threshold(lg) for lg in log2ns]
    fwd_b = [threshold_bound(lg) for lg in log2ns]
    advance()
    ln_ns = [lg * math.log(2) for lg in log2ns]
    v1, why1 = verdict_bounds(checks)
    v2, why2 = verdict_ops(ops)
    v3, why3, fit = verdict_exponent(ln_ns, grad_b)
    ratio = [g / f for g, f in zip(grad_b, fwd_b)]
    verdict = combine([v1, v2, v3])
    last = rows[-1]
    reason = (f"Training {len(rows)} steps (n = {TOKENS[scale]}, R ≤ {max(r['radius'] for r in rows):.2f}, degree "
              f"{last['degree']}): final loss exact {last['loss_exact']:.4g}, certified {last['loss_relative']:.4g}; "
              f"{why1} → {v1}. {why2} → {v2}. Gradient threshold: {why3} → {v3}; B*_grad/B*_fwd "
              f"{ratio[0]:.2f} → {ratio[-1]:.2f}.")
    fig, axes = new_figure(3)
    ax = axes[0]
    ax.plot([r["step"] for r in rows], [r["loss_exact"] for r in rows], label="exact")
    ax.plot([r["step"] for r in rows], [r["loss_relative"] for r in rows], "--", label=f"relative, eps={EPS:g}")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_title("Training side by side", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.semilogy([r["step"] for r in rows], [r["forward_bound"] for r in rows], label="forward bound")
    ax.semilogy([r["step"] for r in rows], [r["gradient_bound"] for r in rows], label="gradient bound")
    for x, mk in (("dq", "o"), ("dk", "s"), ("dv", "^")):
        ax.semilogy([c["step"] for c in checks], [c[f"{x}_error"] for c in checks], mk, ms=3,
                    label=f"measured {x} error")
    ax.set_xlabel("step"), ax.set_title("Bounds every step, errors at sampled steps", fontsize=10)
    ax.legend(fontsize=6)
    ax = axes[2]
    ax.plot(ln_ns, [b / math.sqrt(x) for b, x in zip(fwd_b, ln_ns)], "o-", label="forward B*/√ln n")
    ax.plot(ln_ns, [b / math.sqrt(x) for b, x in zip(grad_b, ln_ns)], "s--", label="gradient B*/√ln n")
    ax.set_xscale("log"), ax.set_xlabel("ln n"), ax.set_ylabel("B* / √(ln n)")
    ax.set_title("Where the rank reaches n (ε = 1/n)", fontsize=10), ax.legend(fontsize=7)
    numbers = {"steps": len(rows), "n": TOKENS[scale], "checks": checks, "ops": ops,
               "threshold": [{"log2_n": lg, "B_fwd": f, "B_grad": g} for lg, f, g in zip(log2ns, fwd_b, grad_b)],
               "fit": fit}
    return Result("training", __doc__.split("\n\n")[0], verdict, reason, rows, numbers, {"training": fig})


def steps(scale: str) -> int:
    return 4 + 2
