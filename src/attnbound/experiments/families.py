"""Claim: the certificate needs the *relative* error of every weight, η = max_{|x|≤R} |P(x)/eˣ − 1|, so a polynomial
that minimises relative error (``relative``) needs a lower degree, hence a smaller feature rank C(d+g, g), than the
papers' Chebyshev truncation (``polynomial``, Alman–Song; η = δ·e^R), which in turn beats Taylor (Keles et al.;
even orders, η ≤ e^R R^{p+1}/(p+1)!). At d = 8, eps = 1e-3 (values in [−4, 4]) the relative family certifies
degree ≤ 5 at R = 1, ≤ 7 at R = 2, ≤ 11 at R = 4 and ≤ 17 at R = 8.

Arithmetic, no timing: for R ∈ {0.25, …, 16}, eps ∈ {1e-3, 1/n} (n = 2^16 keys), d = 8, value range 8 and
max|v| = 4, the smallest degree :func:`attnbound.families.certified_degree` certifies — a priori (approximation +
worst-case float64 rounding ≤ eps), or else with ``rounding="posterior"`` (approximation ≤ eps/2; the other half
is left to the a-posteriori rounding bound the run measures on its own data, and ``auto`` falls back to exact when
that misses). The table says which. Degrees above a family's cap (Taylor 20, Chebyshev 40, relative 40 with its
table up to R = 16) are "none".

Verdict (each part can fail): (1) at every (eps, R) the degrees are ordered relative ≤ Chebyshev ≤ Taylor, a
missing degree counting as infinite; (2) the targets above hold for the relative family; (3) on adversarial inputs
(logits at ±R, values at ±4, n small) ``attention(method="relative", eps=1e-3)`` runs at the tabulated degree, its
certificate is ≤ eps and the error measured against float64 exact attention is below the certificate.
"""

from __future__ import annotations

import math

import torch

from ..families import certified_degree
from ..families import family as _family
from .common import Result, combine, new_figure

RADII = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 16.0)
FAMILIES = ("taylor", "polynomial", "relative")
LABELS = {"taylor": "Taylor (Keles et al.)", "polynomial": "Chebyshev (Alman–Song)", "relative": "relative minimax"}
D, N, VALUE_RANGE, MAX_ABS_VALUE = 8, 2**16, 8.0, 4.0
EPS = (1e-3, 1.0 / N)
TARGETS = {1.0: 5, 2.0: 7, 4.0: 11, 8.0: 17}  # at d = 8, eps = 1e-3: the relative family's degree at most
MEASURED_RADII = {"test": (1.0, 2.0), "small": (0.5, 1.0, 2.0, 4.0), "medium": (0.5, 1.0, 2.0, 4.0),
                  "large": (0.5, 1.0, 2.0, 4.0)}
MEASURED_N = 256


def table(radii=RADII, eps_list=EPS, *, d: int = D, n: int = N, value_range: float = VALUE_RANGE,
          max_abs_value: float = MAX_ABS_VALUE) -> list[dict]:
    """One row per (eps, R, family): the certified degree (None above the cap), its rank, η, the approximation
    term, the a-priori bound (approximation + worst-case rounding) and how it was certified."""
    rows = []
    stats = dict(d=d, n_k=n, value_range=value_range, max_abs_value=max_abs_value)
    for eps in eps_list:
        for radius in radii:
            for name in FAMILIES:
                cert = certified_degree(name, radius, eps, **stats)
                how = "a priori"
                if cert is None:
                    cert = certified_degree(name, radius, eps, rounding="posterior", **stats)
                    how = "a posteriori (approximation ≤ eps/2)"
                row = {"eps": eps, "R": radius, "family": name, "d": d, "n": n}
                if cert is None:
                    row.update(degree=None, rank=None, log10_rank=None,
                               how=f"none ≤ {_family(name).degree_name} {_family(name).max_degree}")
                else:
                    row.update(degree=cert.degree, rank=cert.rank, log10_rank=math.log10(cert.rank), how=how,
                               eta=cert.eta, approximation_bound=cert.approximation_bound,
                               a_priori_bound=cert.output_error_bound)
                rows.append(row)
    return rows


def _degrees(rows, eps) -> dict:
    """{R: {family: degree or None}} at ``eps``."""
    out: dict = {}
    for r in rows:
        if r["eps"] == eps:
            out.setdefault(r["R"], {})[r["family"]] = r["degree"]
    return out


def verdict_order(rows) -> tuple[str, str]:
    """PASS when relative ≤ Chebyshev ≤ Taylor at every (eps, R), a missing degree (None) counting as ∞."""
    inf = math.inf
    bad, compared = [], 0
    for eps in sorted({r["eps"] for r in rows}, reverse=True):
        for radius, g in _degrees(rows, eps).items():
            chain = [(f, inf if g.get(f) is None else g[f]) for f in ("relative", "polynomial", "taylor")]
            for (fa, a), (fb, b) in zip(chain, chain[1:]):
                if a == b == inf:
                    continue
                compared += 1
                if a > b:
                    bad.append(f"eps={eps:.3g}, R={radius:g}: {fa} {g.get(fa)} > {fb} {g.get(fb)}")
    if not compared:
        return "FAIL", "no degree certified at all"
    if bad:
        return "FAIL", f"order relative ≤ Chebyshev ≤ Taylor broken at {len(bad)} of {compared} comparisons ({bad[0]})"
    return "PASS", f"relative ≤ Chebyshev ≤ Taylor in all {compared} comparisons"


def verdict_targets(rows, targets=TARGETS, eps: float = 1e-3, name: str = "relative") -> tuple[str, str]:
    """PASS when the ``name`` family's certified degree at ``eps`` is ≤ targets[R] at every target radius."""
    degs = _degrees(rows, eps)
    bad, shown = [], []
    for radius, cap in targets.items():
        g = degs.get(radius, {}).get(name)
        shown.append(f"R={radius:g}: {g} (≤ {cap})")
        if g is None or g > cap:
            bad.append(f"R={radius:g}")
    why = f"{name} degrees at eps={eps:g}: " + ", ".join(shown)
    return ("FAIL" if bad else "PASS"), why + (f"; missed at {', '.join(bad)}" if bad else "")


# ---------------------------------------------------------------- measured check on adversarial inputs


def adversarial_inputs(radius: float, n: int, d: int, max_abs_value: float, seed: int):
    """q, k of norm √(R/s) (s = 1/√d) whose logits reach both +R and −R (a key parallel and one antiparallel to
    a query), random directions otherwise, and values ±max_abs_value; the data radius is R·(1 − 1e-9) so that
    float rounding never lifts it above R."""
    g = torch.Generator().manual_seed(seed)
    s = 1.0 / math.sqrt(d)
    norm = math.sqrt(radius * (1 - 1e-9) / s)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1) * norm
    k = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1) * norm
    k[0], k[1] = q[0], -q[0]
    v = (torch.randint(0, 2, (n, d), generator=g, dtype=torch.float64) * 2 - 1) * max_abs_value
    return q, k, v


def measured_check(radii, *, n: int = MEASURED_N, d: int = D, eps: float = 1e-3, seed: int = 0,
                   advance=None) -> list[dict]:
    """Run ``attention(method="relative", eps=eps)`` on :func:`adversarial_inputs` at each radius."""
    from ..api import attention

    rows = []
    for i, radius in enumerate(radii):
        q, k, v = adversarial_inputs(radius, n, d, MAX_ABS_VALUE, seed + i)
        out, cert = attention(q, k, v, method="relative", eps=eps, return_certificate=True)
        ref = torch.softmax((q @ k.T) / math.sqrt(d), dim=-1) @ v
        rows.append({"R": radius, "n": n, "eps": eps, "degree": cert.degree, "rank": cert.rank,
                     "certificate": cert.output_error_bound, "measured": float((out.double() - ref).abs().max())})
        if advance:
            advance()
    return rows


def verdict_measured(measured, rows_table, eps: float = 1e-3) -> tuple[str, str]:
    """PASS when every run used the degree its table row predicts for its data (computed at that run's n),
    carried a certificate ≤ eps and measured an error ≤ its certificate."""
    bad, shown = [], []
    for m in measured:
        want = m.get("expected_degree")
        shown.append(f"R={m['R']:g}: g={m['degree']}, error {m['measured']:.1e} ≤ bound {m['certificate']:.1e}")
        if want is not None and m["degree"] != want:
            bad.append(f"R={m['R']:g} ran degree {m['degree']}, table says {want}")
        if not m["certificate"] <= eps:
            bad.append(f"R={m['R']:g} certificate {m['certificate']:.2g} > eps")
        if not m["measured"] <= m["certificate"]:
            bad.append(f"R={m['R']:g} measured {m['measured']:.2g} > certificate {m['certificate']:.2g}")
    if not measured:
        return "INCONCLUSIVE", "no measured runs"
    why = f"adversarial runs (n={measured[0]['n']}, logits at ±R, values ±{MAX_ABS_VALUE:g}): " + "; ".join(shown)
    return ("FAIL" if bad else "PASS"), why + (f"; {'; '.join(bad)}" if bad else "")


# ---------------------------------------------------------------- report


def format_table(rows) -> str:
    """A plain-text degree (rank) table, one line per (eps, R), a '*' marking a-posteriori certification."""
    lines = []
    for eps in sorted({r["eps"] for r in rows}, reverse=True):
        lines.append(f"eps = {eps:.3g}: R | " + " | ".join(LABELS[f] for f in FAMILIES))
        for radius, _ in _degrees(rows, eps).items():
            cells = []
            for f in FAMILIES:
                r = next(x for x in rows if x["eps"] == eps and x["R"] == radius and x["family"] == f)
                cells.append("—" if r["degree"] is None else
                             f"{r['degree']} ({r['rank'] if r['rank'] < 10**6 else format(r['rank'], '.3g')}){'*' if r['how'].startswith('a posteriori') else ''}")
            lines.append(f"  {radius:g} | " + " | ".join(cells))
    return "\n".join(lines)


def figure(rows):
    fig, axes = new_figure(2, width=5.6, height=4.2)
    styles = {EPS[0]: "-", EPS[1]: "--"}
    for i, f in enumerate(FAMILIES):
        for eps in sorted({r["eps"] for r in rows}, reverse=True):
            pts = [r for r in rows if r["family"] == f and r["eps"] == eps and r["degree"] is not None]
            if not pts:
                continue
            xs = [r["R"] for r in pts]
            label = f"{LABELS[f]}, eps = {'1e-3' if eps == EPS[0] else '1/n'}"
            for ax, key in zip(axes, ("degree", "log10_rank")):
                ax.plot(xs, [r[key] for r in pts], styles.get(eps, ":"), color=f"C{i}", lw=1.3, label=label)
                post = [r for r in pts if r["how"].startswith("a posteriori")]
                prior = [r for r in pts if not r["how"].startswith("a posteriori")]
                ax.plot([r["R"] for r in prior], [r[key] for r in prior], "o", color=f"C{i}", ms=4)
                ax.plot([r["R"] for r in post], [r[key] for r in post], "o", mfc="none", color=f"C{i}", ms=6)
    axes[0].plot(list(TARGETS), list(TARGETS.values()), "kv", ms=6, label="target (relative, eps = 1e-3)")
    for ax, name in zip(axes, ("certified degree g", "log₁₀ rank C(d+g, g)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("radius R"), ax.set_ylabel(name)
    axes[0].set_title(f"Certified degree, d = {D}, value range {VALUE_RANGE:g} (hollow: a posteriori)", fontsize=9)
    axes[1].set_title(f"Feature rank (n = 2^{int(math.log2(N))}; rank = n at {math.log10(N):.1f})", fontsize=9)
    axes[1].axhline(math.log10(N), color="r", ls=":", lw=1)
    axes[0].legend(fontsize=6.5, loc="upper left")
    return fig


def run(scale: str, seed: int, advance) -> Result:
    rows = table()
    advance()
    v1, why1 = verdict_order(rows)
    v2, why2 = verdict_targets(rows)
    measured = measured_check(MEASURED_RADII[scale], seed=seed, advance=advance)
    stats = dict(d=D, value_range=VALUE_RANGE, max_abs_value=MAX_ABS_VALUE)
    for m in measured:  # the degree the table's rule gives at the run's own n (a priori, else a posteriori)
        c = certified_degree("relative", m["R"], m["eps"], n_k=m["n"], **stats) or \
            certified_degree("relative", m["R"], m["eps"], n_k=m["n"], rounding="posterior", **stats)
        m["expected_degree"] = c.degree if c else None
    v3, why3 = verdict_measured(measured, rows)
    beyond = [r["R"] for r in rows if r["family"] == "relative" and r["eps"] == EPS[0] and r["degree"] is None]
    reason = (f"{why1} → {v1}. {why2} → {v2}. {why3} → {v3}."
              + (f" Not certifiable by any family up to its cap at eps = 1e-3: R ∈ {{{', '.join(f'{x:g}' for x in beyond)}}}."
                 if beyond else "")
              + " Table (degree (rank), * = a posteriori):\n" + format_table(rows))
    numbers = {"measured": measured, "targets": {str(k): v for k, v in TARGETS.items()}, "d": D, "n": N,
               "value_range": VALUE_RANGE}
    return Result("families", __doc__.split("\n\n")[0], combine([v1, v2, v3]), reason, rows, numbers,
                  {"families": figure(rows)})


def steps(scale: str) -> int:
    return 1 + len(MEASURED_RADII[scale])
