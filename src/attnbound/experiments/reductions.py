"""Claim (Keles et al.; Alman–Song): attention decides Orthogonal Vectors and the gap-Hamming close
pair problem through the extra-key reductions — exact attention always correctly, and any
approximation whose certified error is below the decision margin correctly too. Approximations
without such a certificate (the Taylor-2 map that Based uses, low-degree Chebyshev, Performer's
random features) carry no guarantee; at these instances' radii the certified degree needed is in
the hundreds and its rank far beyond n². The instances (m = Θ(log n) with a small constant, gap
1 + γ = 1.5) show the reductions' mechanics, not hardness: SETH-hardness needs m = ω(log n) and
γ → 0, and is a conditional worst-case statement that no run reproduces.

Measured on fresh random instances of the experiment's real size n (half with a planted
solution): the decisions of the exact oracle, of the uncertified oracles (Taylor order 2,
Chebyshev of the largest degree ≤ 8 whose rank stays ≤ 5·10⁴, Performer FAVOR+ with 256 features
when the peers extra is installed) against brute force; the data radius R of each reduction and
the smallest Chebyshev degree whose certificate meets the margin there (Bessel tail in log space,
:func:`.transition.needed_degree`), with its rank C(dim+g, g) beside n². On tiny OV instances
(n = 4, m = 3) a certified degree exists: every certified decision must be right.

Falsified if the exact oracle or any certified approximate decision disagrees with brute force.
"""

from __future__ import annotations

import math

import torch

import attnbound

from ..hardness import (
    gap_hamming_instance,
    gap_hamming_to_attention,
    ov_instance,
    ov_to_attention,
    solve_gap_hamming,
    solve_ov,
    solve_via_attention,
)
from .common import Result, new_figure
from .transition import log_rank, needed_degree

SIZES = {"test": (6, 32), "small": (16, 128), "medium": (40, 256), "large": (60, 512)}
DEGREES = list(range(2, 31, 2))
RANK_CAP = 50_000
PERFORMER_FEATURES = 256


def performer_available() -> bool:
    try:
        import performer_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def performer_decide(red, seed: int) -> bool:
    """Performer FAVOR+ (softmax kernel with scale 1/√dim) on the reduction, its scale folded into q."""
    from performer_pytorch import FastAttention

    torch.manual_seed(seed)
    dim = red.q.shape[-1]
    fa = FastAttention(dim_heads=dim, nb_features=PERFORMER_FEATURES, causal=False).double()
    q = (red.q * (red.scale * math.sqrt(dim)))[None, None]
    with torch.no_grad():
        out = fa(q, red.k[None, None], red.v[None, None])[0, 0]
    return red.decide(out)


def certified_need(red) -> dict:
    """Data radius, the smallest Chebyshev degree certified below the margin (values in [0, 1]) and its rank."""
    radius = red.scale * float(red.q.norm(dim=-1).max() * red.k.norm(dim=-1).max())
    if red.kind == "l2":
        radius *= 2.0  # weights exp(2s⟨q,k⟩ − s‖k‖²): the key factor is exact, the polynomial covers 2s⟨q,k⟩
    g = needed_degree(radius, math.log(2 * red.margin))  # 2η/(1−η) ≤ 2·margin ⇔ η/(1−η)·1 ≤ margin
    dim = red.q.shape[-1]
    return {"R": radius, "needed_degree": g, "log10_rank_needed": log_rank(dim, g) / math.log(10), "dim": dim}


def uncertified_oracles(red, seed: int) -> list[tuple[str, bool]]:
    dim = red.q.shape[-1]
    cheb = max(g for g in range(1, 9) if attnbound.feature_rank(dim, g) <= RANK_CAP)
    out = [("taylor-2 (Based map)", solve_via_attention(red, method="taylor", order=2)),
           (f"chebyshev degree {cheb}", solve_via_attention(red, method="polynomial", degree=cheb))]
    answers = [(label, dec.answer) for label, dec in out if not dec.certified]
    if red.kind == "softmax" and performer_available():
        answers.append((f"performer ({PERFORMER_FEATURES} features)", performer_decide(red, seed)))
    return answers


def verdict(rows: list[dict]) -> tuple[str, str]:
    exact = [r for r in rows if r["method"] == "exact"]
    certified = [r for r in rows if r["method"] != "exact" and r["certified"]]
    uncert = [r for r in rows if r["method"] != "exact" and not r["certified"] and r["problem"] != "ov_tiny"]
    if not exact:
        return "INCONCLUSIVE", "no exact decisions"
    exact_ok = sum(r["correct"] for r in exact)
    cert_ok = sum(r["correct"] for r in certified)
    per = {}
    for r in uncert:
        per.setdefault(f"{r['problem']} {r['method']}", []).append(r["correct"])
    yes_rate = sum(r["truth"] for r in exact) / len(exact)
    shown = ", ".join(f"{m} {sum(v)}/{len(v)}" for m, v in per.items())
    why = (f"exact oracle right on {exact_ok}/{len(exact)} decisions; certified approximate decisions right on "
           f"{cert_ok}/{len(certified)}; uncertified oracles at the real size right on {shown} (always answering "
           f"'yes' scores {yes_rate:.0%})")
    ok = exact_ok == len(exact) and cert_ok == len(certified) and len(certified) > 0
    if not certified:
        why += "; no certified approximate decision to check"
    return ("PASS" if ok else "FAIL"), why


def run(scale: str, seed: int, advance) -> Result:
    trials, n = SIZES[scale]
    rows, needs = [], {}
    for i in range(trials):
        planted = i % 2 == 0
        ov = ov_instance(n, max(8, round(1.5 * math.log2(n))), planted=planted, seed=seed + i)
        gh = gap_hamming_instance(n, 8 * math.ceil(math.log2(n)), t=math.ceil(math.log2(n)), gamma=0.5,
                                  planted=planted, seed=seed + i)
        for problem, red, truth in (("ov", ov_to_attention(ov), solve_ov(ov)[0]),
                                    ("ov_l2", ov_to_attention(ov, kind="l2"), solve_ov(ov)[0]),
                                    ("gap_hamming", gap_hamming_to_attention(gh), solve_gap_hamming(gh)[0])):
            dec = solve_via_attention(red)
            need = certified_need(red)
            needs.setdefault(problem, []).append(need)
            rows.append({"problem": problem, "n": n, "method": "exact", "degree": None, "truth": truth,
                         "answer": dec.answer, "correct": dec.answer == truth, "certified": dec.certified,
                         "certificate": dec.certificate.output_error_bound, "margin": red.margin, "B": red.entry_bound,
                         "B_over_sqrt_ln_n": red.meta["B_over_sqrt_ln_n"], **need})
            if problem != "ov_l2":
                for label, answer in uncertified_oracles(red, seed + i):
                    rows.append({"problem": problem, "n": n, "method": label, "truth": truth, "answer": answer,
                                 "correct": answer == truth, "certified": False, **need})
        advance()
    # approximate oracles on tiny OV instances, where some degree can be certified
    tiny = []
    for i in range(trials):
        inst = ov_instance(4, 3, planted=i % 2 == 0, seed=seed + 1000 + i)
        red, truth = ov_to_attention(inst), solve_ov(inst)[0]
        for g in DEGREES:
            dec = solve_via_attention(red, method="polynomial", degree=g)
            tiny.append({"problem": "ov_tiny", "n": 4, "method": "polynomial", "degree": g, "truth": truth,
                         "answer": dec.answer, "correct": dec.answer == truth, "certified": dec.certified,
                         "certificate": dec.certificate.output_error_bound, "margin": red.margin,
                         "out_margin": dec.out_margin, "R": dec.certificate.radius})
    advance()
    rows += tiny
    v, why = verdict(rows)
    need_txt = "; ".join(
        f"{p}: R {min(x['R'] for x in xs):.0f}–{max(x['R'] for x in xs):.0f}, certified degree "
        f"{min(x['needed_degree'] for x in xs)}–{max(x['needed_degree'] for x in xs)}, rank 10^"
        f"{min(x['log10_rank_needed'] for x in xs):.0f}–10^{max(x['log10_rank_needed'] for x in xs):.0f}"
        for p, xs in needs.items())
    min_cert = min((r["degree"] for r in tiny if r["certified"]), default=None)
    reason = (f"{why}. At n = {n} (n² = 10^{2 * math.log10(n):.1f}): {need_txt}. Lowest certifying degree on the "
              f"tiny OV instances (n = 4, m = 3): {min_cert}. These sizes show the mechanics, not hardness.")
    fig = _figure(rows, tiny, needs, n, trials)
    exact_rows = [r for r in rows if r["method"] == "exact"]
    numbers = {"exact_accuracy": sum(r["correct"] for r in exact_rows) / len(exact_rows),
               "min_certifying_degree": min_cert,
               "needed": {p: {"degree": [x["needed_degree"] for x in xs],
                              "log10_rank": [x["log10_rank_needed"] for x in xs]} for p, xs in needs.items()}}
    return Result("reductions", __doc__.split("\n\n")[0], v, reason, rows, numbers, {"reductions": fig})


def _figure(rows, tiny, needs, n, trials):
    fig, axes = new_figure(3, width=4.8, height=4.2)
    ax = axes[0]
    labels, accs = [], []
    for problem in ("ov", "ov_l2", "gap_hamming"):
        for method in dict.fromkeys(r["method"] for r in rows if r["problem"] == problem):
            sub = [r for r in rows if r["problem"] == problem and r["method"] == method]
            labels.append(f"{problem}: {method}")
            accs.append(sum(r["correct"] for r in sub) / len(sub))
    ys = list(range(len(labels)))
    ax.barh(ys, accs, color=["C2" if lab.endswith("exact") else "C1" for lab in labels])
    ax.set_yticks(ys, labels, fontsize=7)
    ax.axvline(0.5, color="k", ls=":", lw=1, label="chance")
    ax.set_xlim(0, 1.05), ax.set_xlabel("fraction of decisions equal to brute force")
    ax.set_title(f"Decisions at n = {n} ({trials} instances)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.invert_yaxis()
    ax = axes[1]
    problems = list(needs)
    xs = list(range(len(problems)))
    ax.bar([x - 0.2 for x in xs], [max(v["log10_rank_needed"] for v in needs[p]) for p in problems], width=0.4,
           label="certified rank needed")
    ax.bar([x + 0.2 for x in xs], [2 * math.log10(n)] * len(problems), width=0.4, label="n² (exact attention)")
    for x, p in zip(xs, problems):
        ax.text(x - 0.2, max(v["log10_rank_needed"] for v in needs[p]), f"g={max(v['needed_degree'] for v in needs[p])}",
                ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, problems)
    ax.set_ylabel("log₁₀ (count)"), ax.set_title("What a certified approximation costs", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[2]
    cert = [max((r["certificate"] for r in tiny if r["degree"] == g), default=math.inf) for g in DEGREES]
    ax.semilogy(DEGREES, [c if math.isfinite(c) else float("nan") for c in cert], "o-",
                label="certificate, worst instance (none where η ≥ 1)")
    ax.axhline(tiny[0]["margin"], color="r", ls="--", label="decision margin 0.15")
    ax.set_xlim(0, DEGREES[-1] + 1)
    ax.set_xlabel("Chebyshev degree g"), ax.set_ylabel("certified ‖out − exact‖∞")
    ax.set_title("Tiny OV (n = 4, m = 3): first certified g = "
                 f"{min((r['degree'] for r in tiny if r['certified']), default='—')}", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def steps(scale: str) -> int:
    return SIZES[scale][0] + 1
