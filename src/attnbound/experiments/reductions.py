"""Claim (Keles et al.; Alman–Song; SPEC §5.6): attention decides Orthogonal Vectors and the
gap-Hamming close pair problem through the extra-key reductions — exact attention always
correctly — and an approximation decides correctly whenever its certified error is below the
decision margin; below that precision it may fail. At the reductions' entry sizes the needed
degree (and rank) is what makes fast approximations impossible.

Falsified if exact attention ever disagrees with brute force, or a certified approximate
decision is wrong.
"""

from __future__ import annotations

import math

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

SIZES = {"test": (6, 32), "small": (24, 128), "medium": (40, 256), "large": (60, 512)}
DEGREES = list(range(2, 31, 2))


def run(scale: str, seed: int, advance) -> Result:
    trials, n = SIZES[scale]
    rows = []
    for i in range(trials):
        planted = i % 2 == 0
        ov = ov_instance(n, max(8, round(1.5 * math.log2(n))), planted=planted, seed=seed + i)
        gh = gap_hamming_instance(n, 8 * math.ceil(math.log2(n)), t=math.ceil(math.log2(n)), gamma=0.5,
                                  planted=planted, seed=seed + i)
        for problem, red, truth in (("ov", ov_to_attention(ov), solve_ov(ov)[0]),
                                    ("ov_l2", ov_to_attention(ov, kind="l2"), solve_ov(ov)[0]),
                                    ("gap_hamming", gap_hamming_to_attention(gh), solve_gap_hamming(gh)[0])):
            dec = solve_via_attention(red)
            rows.append({"problem": problem, "n": n, "method": "exact", "degree": None, "truth": truth,
                         "answer": dec.answer, "correct": dec.answer == truth, "certified": dec.certified,
                         "certificate": 0.0, "margin": red.margin, "B": red.entry_bound,
                         "B_over_sqrt_ln_n": red.meta["B_over_sqrt_ln_n"]})
        advance()
    # approximate oracles on tiny OV instances, where some degree can be certified
    for i in range(trials):
        inst = ov_instance(4, 3, planted=i % 2 == 0, seed=seed + 1000 + i)
        red, truth = ov_to_attention(inst), solve_ov(inst)[0]
        for g in DEGREES:
            dec = solve_via_attention(red, method="polynomial", degree=g)
            rows.append({"problem": "ov_tiny", "n": 4, "method": "polynomial", "degree": g, "truth": truth,
                         "answer": dec.answer, "correct": dec.answer == truth, "certified": dec.certified,
                         "certificate": dec.certificate.output_error_bound, "margin": red.margin,
                         "out_margin": dec.out_margin, "R": dec.certificate.radius})
    advance()
    exact = [r for r in rows if r["method"] == "exact"]
    approx = [r for r in rows if r["method"] == "polynomial"]
    exact_acc = sum(r["correct"] for r in exact) / len(exact)
    cert_ok = all(r["correct"] for r in approx if r["certified"])
    uncert = [r for r in approx if not r["certified"]]
    wrong_uncert = sum(not r["correct"] for r in uncert)
    min_cert = min((r["degree"] for r in approx if r["certified"]), default=None)
    verdict = "PASS" if exact_acc == 1.0 and cert_ok else "FAIL"
    reason = (f"exact oracle: {exact_acc:.0%} of {len(exact)} decisions correct; certified approximate decisions all "
              f"correct: {cert_ok}; uncertified ones wrong {wrong_uncert}/{len(uncert)}; lowest certifying degree "
              f"on the tiny OV instances: {min_cert}")
    fig, axes = new_figure(2)
    ax = axes[0]
    acc = [sum(r["correct"] for r in approx if r["degree"] == g) / trials for g in DEGREES]
    frac_cert = [sum(r["certified"] for r in approx if r["degree"] == g) / trials for g in DEGREES]
    ax.plot(DEGREES, acc, "o-", label="accuracy (polynomial oracle)")
    ax.plot(DEGREES, frac_cert, "s--", label="fraction certified")
    ax.set_ylim(-0.05, 1.05), ax.set_xlabel("degree g"), ax.set_title("OV (n=4, m=3): decisions vs degree")
    ax.legend(fontsize=7)
    ax = axes[1]
    cert = [max((r["certificate"] for r in approx if r["degree"] == g), default=math.inf) for g in DEGREES]
    ax.semilogy(DEGREES, [c if math.isfinite(c) else float("nan") for c in cert], "o-", label="certificate (max over instances)")
    ax.axhline(approx[0]["margin"], color="r", ls="--", label="decision margin")
    ax.set_xlabel("degree g"), ax.set_ylabel("certified ‖out − exact‖∞"), ax.set_title("Certificate vs margin")
    ax.legend(fontsize=7)
    return Result("reductions", __doc__.split("\n\n")[0], verdict, reason, rows,
                  {"exact_accuracy": exact_acc, "min_certifying_degree": min_cert}, {"reductions": fig})


def steps(scale: str) -> int:
    return SIZES[scale][0] + 1
