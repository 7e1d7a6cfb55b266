"""The relative-error family: the shipped table and the verifier that proved it, checked independently.

The independent check (``independent_max``) finds the true max_{|u|≤1} |P(u)e^{−Ru} − 1| a different
way from :func:`attnbound.families.relative_table.relative_error_bound`: the interior extrema of r(u) = P(u)e^{−Ru} − 1
are the real roots of the polynomial Q = P' − R·P (r' = e^{−Ru}·Q), which sympy isolates exactly in
rational arithmetic (intervals of width ≤ 1e−30); r is evaluated at the interval ends and at ±1 with
mpmath at 300 bits, plus the Lipschitz margin width·e^R·Σ|q_j| — so it is the maximum to ~1e−30.
"""

import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import sympy

from attnbound.families import relative as rel
from attnbound.families import relative_table as build
from attnbound.families.chebyshev import chebyshev_error, chebyshev_to_monomial
from attnbound.families.taylor import taylor_coefficients


def _eval(coeffs, x):
    val = mpmath.mpf(0)
    for c in reversed(list(coeffs)):
        val = val * x + mpmath.mpf(float(c))
    return val


def independent_max(coeffs, radius) -> tuple[float, float]:
    """(lower, upper) enclosing max_{|u|≤1} |Σ a_j u^j · e^{−radius·u} − 1|, via exact root isolation.

    lower is |r| at points (mpmath, 300 bits, shaded down by 1e−15 for the float64 conversion); upper adds
    the Lipschitz margin over the isolating intervals and shades up."""
    u = sympy.Symbol("u")
    a = [sympy.Rational(*float(c).as_integer_ratio()) for c in coeffs]
    P = sympy.Poly(list(reversed(a)), u, domain="QQ")
    Q = P.diff(u) - sympy.Rational(*float(radius).as_integer_ratio()) * P
    pts, width = [Fraction(-1), Fraction(1)], Fraction(0)
    if Q.degree() > 0:
        for (lo, hi), _ in Q.intervals(inf=-1, sup=1, eps=sympy.Rational(1, 10**30)):
            lo, hi = Fraction(int(lo.p), int(lo.q)), Fraction(int(hi.p), int(hi.q))
            pts += [lo, hi]
            width = max(width, hi - lo)
    with mpmath.workprec(300):
        R = mpmath.mpf(float(radius))
        best = max(abs(_eval(coeffs, mpmath.mpf(p.numerator) / p.denominator)
                       * mpmath.exp(-R * mpmath.mpf(p.numerator) / p.denominator) - 1) for p in pts)
    lipschitz = math.exp(radius) * float(sum(abs(c) for c in Q.all_coeffs())) * 1.01
    return float(best) * (1 - 1e-15), float(best) * (1 + 1e-15) + float(width) * lipschitz + 1e-60


def min_on_interval(coeffs) -> float:
    """min_{|u|≤1} P(u), from P's critical points (exact isolation) and the ends."""
    u = sympy.Symbol("u")
    P = sympy.Poly(list(reversed([sympy.Rational(*float(c).as_integer_ratio()) for c in coeffs])), u, domain="QQ")
    pts = [sympy.Integer(-1), sympy.Integer(1)]
    dP = P.diff(u)
    if dP.degree() > 0:
        pts += [(lo + hi) / 2 for (lo, hi), _ in dP.intervals(inf=-1, sup=1, eps=sympy.Rational(1, 10**30))]
    return min(float(P.eval(p)) for p in pts)


# ------------------------------------------------------------------------------------------------
# the verifier


@pytest.mark.parametrize("y", [0.0, 1e-9, 0.3, -0.3, -5.25, 16.0, -16.0, 37.75])
def test_exp_interval_encloses_exp(y):
    n, e = rel._dyadic(y)
    lo, hi = rel._exp_interval(n, e)
    with mpmath.workprec(700):
        exact = mpmath.exp(mpmath.mpf(y)) * mpmath.mpf(2) ** 256
        assert lo <= exact <= hi
    assert hi - lo <= 4 + (hi >> 200)  # tight: a few units of 2^-256, relative ≤ 2^-200


def _stress_polynomials():
    """Polynomials with known trouble: low-degree Taylor (large error), a minimax one, and a perturbed one."""
    cases = [(taylor_coefficients(1.0, 2), 1.0), (np.array([1.0]), 1.0),  # e^{-u} − 1: max e − 1
             (taylor_coefficients(3.0, 6), 3.0)]
    cheb, _, _ = build.remez(2.0, 6)
    a = chebyshev_to_monomial(cheb)
    cases.append((a, 2.0))
    b = a.copy()
    b[3] *= 1 + 1e-3
    cases.append((b, 2.0))
    return cases


@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("config", [dict(pieces=1, order=2, refine=False), dict(pieces=2, order=4, refine=False),
                                    dict(pieces=3, refine=False), dict()])
def test_verifier_bounds_the_true_maximum(case, config):
    """upper ≥ true max ≥ lower on coarse pieces and short series (where a dropped tail term or a
    sampled maximum would fall below the true maximum), and tight (≤ 3.5 %) with the defaults."""
    coeffs, radius = _stress_polynomials()[case]
    true_lo, true_hi = independent_max(coeffs, radius)
    upper, lower = build.relative_error_bound(coeffs, radius, **config)
    assert lower <= true_hi
    assert upper >= true_lo
    if not config:
        assert upper <= 1.035 * true_hi


def test_verifier_flags_a_polynomial_that_goes_negative():
    """1 + x on [−2, 2] (u-coefficients [1, 2]) is negative at x = −2: the bound must be ≥ 1 there."""
    coeffs = np.array([1.0, 2.0])
    upper, _ = build.relative_error_bound(coeffs, 2.0)
    assert upper >= 1.0
    lo, hi = independent_max(coeffs, 2.0)
    assert upper >= lo and hi == pytest.approx(1.0 + math.exp(2.0), rel=1e-12)


def test_verifier_rejects_bad_input():
    with pytest.raises(ValueError, match="coefficients"):
        build.relative_error_bound([], 1.0)
    with pytest.raises(ValueError, match="coefficients"):
        build.relative_error_bound([1.0, float("nan")], 1.0)
    with pytest.raises(ValueError, match="radius"):
        build.relative_error_bound([1.0], -1.0)


# ------------------------------------------------------------------------------------------------
# the shipped table


def _sample_entries():
    radii, _, eta, _ = rel._table()
    rng = np.random.default_rng(15)
    picks = [(list(radii).index(R), rel.relative_degree(R, 1.2e-4)) for R in (1.0, 2.0, 4.0, 8.0)]
    usable = [(i, g) for i in range(radii.size) for g in range(eta.shape[1])
              if 1e-13 < eta[i, g] < 0.9 and g <= 16]
    picks += [usable[k] for k in rng.choice(len(usable), 4, replace=False)]
    return picks


@pytest.mark.parametrize("entry", range(8))
def test_table_entry_reverified_independently(entry):
    """The stored η is ≥ the true maximum (independent method) and within 5 % of it."""
    radii, coeffs, eta, _ = rel._table()
    i, g = _sample_entries()[entry]
    a = coeffs[i, g, : g + 1]
    true_lo, true_hi = independent_max(a, float(radii[i]))
    assert true_hi <= eta[i, g] <= 1.05 * true_lo + 1e-15


@pytest.mark.parametrize("entry", range(4, 8))
def test_eta_below_one_means_positive_polynomial(entry):
    radii, coeffs, eta, _ = rel._table()
    i, g = _sample_entries()[entry]
    assert eta[i, g] < 1
    R = float(radii[i])
    lowest = min_on_interval(coeffs[i, g, : g + 1])
    assert lowest >= (1 - eta[i, g]) * math.exp(-R) * (1 - 1e-9) > 0


def test_issue_degree_targets_and_better_than_chebyshev():
    """d = 8, eps = 1e-3, value range 8 ⇒ η ≤ 1.2e-4 needed; the relative family reaches it at lower degree."""
    targets = {1.0: 5, 2.0: 7, 4.0: 11, 8.0: 17}
    for R, cap in targets.items():
        g = rel.relative_degree(R, 1.2e-4)
        assert g is not None and g <= cap
        cheb = next(h for h in range(41) if chebyshev_error(R, h) * math.exp(R) <= 1.2e-4)
        assert g <= cheb
        # the minimax polynomial's η is never above the Chebyshev truncation's true relative error
        for h in range(g, g + 3):
            assert rel.relative_eta(R, h) <= chebyshev_error(R, h) * math.exp(R) * 1.05 + 1e-15


# ------------------------------------------------------------------------------------------------
# the run-time functions


@pytest.mark.parametrize("radius", [0.7 * 2.0 ** (-70 / 16), 0.013, 1.3, 2.0 ** (1 / 32), 5.123456789, 15.9])
def test_rescaled_radius_between_grid_points(radius):
    radii, coeffs, eta, best = rel._table()
    i = int(np.searchsorted(radii, radius))
    assert radii[i] >= radius and (i == 0 or radii[i - 1] < radius)
    g = rel.relative_degree(radius, 1e-3) or 12
    a = rel.relative_coefficients(radius, g)
    b = int(best[i, g])
    expected = coeffs[i, b, : b + 1] * (radius / radii[i]) ** np.arange(b + 1)
    np.testing.assert_allclose(a[: b + 1], expected, rtol=1e-13, atol=0)
    assert np.all(a[b + 1:] == 0)
    claimed = rel.relative_eta(radius, g)
    assert claimed >= eta[i, b]
    assert independent_max(a, radius)[1] <= claimed


def test_rescaling_drift_is_counted():
    """A radius off the grid pays Σ|Δa_j|·e^R: its η exceeds the grid entry's whenever Δa ≠ 0."""
    radii, _, eta, best = rel._table()
    R = float(np.nextafter(radii[100], 0))
    g = 10
    b = int(best[100, g])
    assert rel.relative_eta(R, g) > eta[100, b]
    assert rel.relative_eta(float(radii[100]), g) == eta[100, b]


def test_special_cases_and_errors():
    assert rel.relative_eta(0.0, 5) == 0.0
    np.testing.assert_array_equal(rel.relative_coefficients(0.0, 3), [1.0, 0.0, 0.0, 0.0])
    assert rel.relative_eta(rel.max_radius() * 1.01, 5) == math.inf
    assert rel.relative_eta(1.0, rel.MAX_DEGREE + 1) == math.inf
    assert rel.relative_eta(math.inf, 3) == math.inf
    with pytest.raises(ValueError, match="radius"):
        rel.relative_coefficients(rel.max_radius() * 1.01, 3)
    with pytest.raises(ValueError, match="degree"):
        rel.relative_coefficients(1.0, rel.MAX_DEGREE + 1)
    with pytest.raises(ValueError, match="degree"):
        rel.relative_eta(1.0, -1)
    with pytest.raises(ValueError, match="degree"):
        rel.relative_eta(1.0, 2.0)
    with pytest.raises(ValueError, match="radius"):
        rel.relative_eta(-1.0, 2)
    with pytest.raises(TypeError, match="radius"):
        rel.relative_eta("big", 2)


def test_degree_search_is_the_smallest_and_eta_is_monotone():
    for R in (0.3, 1.7, 6.1):
        etas = [rel.relative_eta(R, g) for g in range(rel.MAX_DEGREE + 1)]
        assert all(x >= y for x, y in zip(etas, etas[1:]))
        for target in (1e-2, 1e-5, 1e-9):
            g = rel.relative_degree(R, target)
            if g is None:
                assert etas[-1] > target
            else:
                assert etas[g] <= target and (g == 0 or etas[g - 1] > target)
