"""Claim (seed 002, Saha–Xu–Ye–Yu, small embedding m = N^{o(1)}): one Orthogonal Vectors instance
with |A| = n and |B| = L·H·n splits into L·H sub-instances (A, B_p) that pack into one transformer
of L layers × H heads; one forward pass decides the whole instance (the OR of the L·H answers). So
an evaluator of such transformers much faster than L·H·n^{2−o(1)} would break SETH — a conditional,
worst-case statement that no measurement reproduces. What is measured: the packing decides
correctly, and the standard algorithm's heads share no work.

Measured: (1) on fresh random instances (planted and not), the packed transformer's one forward pass
(:func:`attnbound.hardness.pack_transformer`, exact attention, float64) against brute force on the
big instance and on every part; (2) operation counts (:func:`.common.count_ops`, deterministic) of
one attention call over L·H independent heads against L·H × one head, for exact (blockwise) and
polynomial attention — the standard algorithms cost exactly L·H × one head; (3) the packed pass's
operations split into attention and the rest (projections, MLPs): the packed width grows as
L·H·(2m + 2), so at these sizes the projections dominate.

Falsified if any packed decision differs from brute force, or an operation ratio leaves
[0.99, 1.01] (below: shared work; above: overhead that grows with the heads).
"""

from __future__ import annotations

import contextlib
import math

import torch

import attnbound
from attnbound import nn as ab_nn

from ..hardness import OVInstance, ov_instance, pack_transformer, solve_ov
from .common import Result, combine, count_ops, fmt_count, new_figure

CONFIGS = {"test": [(1, 2), (2, 2)], "small": [(1, 2), (2, 2), (2, 4)], "medium": [(1, 2), (2, 2), (2, 4), (4, 4)],
           "large": [(1, 2), (2, 2), (2, 4), (4, 4)]}
PART_N = {"test": 16, "small": 32, "medium": 64, "large": 64}
TRIALS = {"test": 2, "small": 4, "medium": 6, "large": 6}
HEAD_COUNT = {"test": (128, [1, 2, 4]), "small": (1024, [1, 2, 4, 8, 16]), "medium": (2048, [1, 2, 4, 8, 16]),
              "large": (2048, [1, 2, 4, 8, 16])}
HEAD_DIM = 8
TOL = 0.01
HEAD_METHODS = (("exact (blockwise)", {"method": "blockwise"}),
                ("polynomial (degree 4)", {"method": "polynomial", "degree": 4, "strict": False}))


def split_instance(n: int, parts: int, m: int, *, planted: bool, seed: int) -> tuple[OVInstance, list[OVInstance]]:
    """One OV instance with |A| = n, |B| = parts·n, and its split into (A, B_p), p < parts.

    Built from a random instance with |A| = |B| = parts·n (one orthogonal pair when ``planted``,
    none otherwise) by keeping n rows of A (the planted row among them): dropping rows cannot
    create an orthogonal pair."""
    full = ov_instance(parts * n, m, planted=planted, seed=seed)
    keep = list(range(n))
    if planted:
        hit, (i_star, _) = solve_ov(full)
        if i_star >= n:
            keep[seed % n] = i_star
    big = OVInstance(full.A[keep], full.B)
    return big, [OVInstance(big.A, big.B[p * n:(p + 1) * n]) for p in range(parts)]


@contextlib.contextmanager
def attention_counter():
    """Within the block, every attnbound.attention call made by attnbound.nn modules adds its
    operation count to the yielded list (the outer count still sees them too)."""
    counts = []
    inner = ab_nn.attention

    def counted(*args, **kwargs):
        c, out = count_ops(lambda: inner(*args, **kwargs))
        counts.append(c)
        return out

    ab_nn.attention = counted
    try:
        yield counts
    finally:
        ab_nn.attention = inner


def packed_trial(layers: int, heads: int, n: int, seed: int, planted: bool) -> dict:
    parts = layers * heads
    m = max(8, round(1.5 * math.log2(parts * n)))
    big, subs = split_instance(n, parts, m, planted=planted, seed=seed)
    truth = solve_ov(big)[0]
    packed = pack_transformer(subs, layers, heads)
    with attention_counter() as att:
        total, answers = count_ops(lambda: packed.decide("exact"))
    part_truth = [solve_ov(s)[0] for s in subs]
    attn = sum((c for c in att), start=type(total)(0, 0))
    return {"L": layers, "H": heads, "parts": parts, "n_per_part": n, "B_size": parts * n, "m": m,
            "width": packed.model.embed_dim, "planted": planted, "truth": truth, "answer": any(answers),
            "correct": any(answers) == truth, "parts_correct": answers == part_truth,
            "ops_total": total.total, "ops_attention": attn.total, "attention_share": attn.total / total.total}


def head_ratio(label: str, kw: dict, n: int, heads: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, HEAD_DIM, generator=gen) * 0.3 for _ in range(3))
    many, _ = count_ops(lambda: attnbound.attention(q, k, v, **kw))
    one, _ = count_ops(lambda: attnbound.attention(q[:, :1], k[:, :1], v[:, :1], **kw))
    return {"method": label, "LH": heads, "n": n, "ops_all_heads": many.total, "ops_one_head": one.total,
            "ratio": many.total / (heads * one.total)}


def verdict(trials: list[dict], ratios: list[dict], tol: float = TOL) -> tuple[str, str]:
    """PASS when every packed decision (whole instance and each part) matches brute force and every
    ops(L·H heads)/(L·H·ops(one head)) is within ``tol`` of 1."""
    if not trials or not ratios:
        return "INCONCLUSIVE", "nothing measured"
    wrong = [t for t in trials if not t["correct"]]
    wrong_parts = [t for t in trials if not t["parts_correct"]]
    off = [r for r in ratios if abs(r["ratio"] - 1.0) > tol]
    lo, hi = min(r["ratio"] for r in ratios), max(r["ratio"] for r in ratios)
    yes = sum(t["truth"] for t in trials)
    why = (f"packed forward pass decided {len(trials) - len(wrong)}/{len(trials)} fresh instances correctly "
           f"({yes} with an orthogonal pair; each part right in {len(trials) - len(wrong_parts)}/{len(trials)}); "
           f"ops(L·H heads)/(L·H·ops(one head)) ∈ [{lo:.4f}, {hi:.4f}] (predicted 1 ± {tol:g})")
    if wrong or wrong_parts or off:
        extra = "; ratio off at " + ", ".join(f"{r['method']} L·H={r['LH']}: {r['ratio']:.3f}" for r in off) if off else ""
        return "FAIL", why + extra
    return "PASS", why


def run(scale: str, seed: int, advance) -> Result:
    trials = []
    n = PART_N[scale]
    for layers, heads in CONFIGS[scale]:
        for i in range(TRIALS[scale]):
            trials.append(packed_trial(layers, heads, n, seed=seed + 97 * i + 13 * layers + heads, planted=i % 2 == 0))
        advance()
    n_heads, lhs = HEAD_COUNT[scale]
    ratios = [head_ratio(label, kw, n_heads, lh, seed) for label, kw in HEAD_METHODS for lh in lhs]
    advance()
    v, why = verdict(trials, ratios)
    shares = {(t["L"], t["H"]): t for t in trials}
    share_txt = ", ".join(f"L×H = {L}×{H} (width {t['width']}): {t['attention_share']:.0%}"
                          for (L, H), t in shares.items())
    reason = f"{why}. Attention's share of the packed pass's operations: {share_txt} (the rest is projections and MLPs)."
    fig, axes = new_figure(2)
    ax = axes[0]
    for (label, _), style in zip(HEAD_METHODS, ("o-", "s--")):
        sub = [r for r in ratios if r["method"] == label]
        ax.plot([r["LH"] for r in sub], [r["ratio"] for r in sub], style, ms=9 if style == "o-" else 5, label=label)
    ax.axhline(1.0, color="k", ls=":", lw=1, label="prediction: L·H × one head")
    ax.axhspan(1 - TOL, 1 + TOL, color="grey", alpha=0.15, label=f"tolerance ±{TOL:g}")
    ax.set_xscale("log", base=2), ax.set_ylim(0.9, 1.1)
    ax.set_xlabel("L·H (independent heads in one call)"), ax.set_ylabel("ops / (L·H × ops of one head)")
    ax.set_title(f"Heads share no work (n = {n_heads}, head dim {HEAD_DIM})", fontsize=10), ax.legend(fontsize=7)
    ax = axes[1]
    labels = [f"{L}×{H}" for (L, H) in shares]
    att = [t["ops_attention"] for t in shares.values()]
    rest = [t["ops_total"] - t["ops_attention"] for t in shares.values()]
    xs = list(range(len(labels)))
    ax.bar([x - 0.2 for x in xs], att, width=0.4, label="attention")
    ax.bar([x + 0.2 for x in xs], rest, width=0.4, label="projections + MLP")
    ax.set_xticks(xs, labels)
    ax.set_yscale("log")
    ax.set_xlabel("L × H of the packed transformer"), ax.set_ylabel("operations in one forward pass")
    ax.set_title(f"Packed pass: |B| = L·H·{n} split into L·H parts", fontsize=10), ax.legend(fontsize=7)
    numbers = {"part_n": n, "trials": len(trials), "correct": sum(t["correct"] for t in trials),
               "ratio_range": [min(r["ratio"] for r in ratios), max(r["ratio"] for r in ratios)],
               "largest_pass_ops": fmt_count(max(t["ops_total"] for t in trials))}
    return Result("direct_sum", __doc__.split("\n\n")[0], v, reason, trials + ratios, numbers, {"direct_sum": fig})


def steps(scale: str) -> int:
    return len(CONFIGS[scale]) + 1
