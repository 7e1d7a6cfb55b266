"""Relative-error polynomials for exp: the family whose error is measured the way the certificate uses it.

The certificate needs only the relative error of every weight,

    η = max_{|x|≤R} |P(x)/eˣ − 1|,

and η < 1 makes every weight positive. A Chebyshev truncation minimises the *absolute* error δ and
equioscillates, so its relative error is ≈ δ·e^R at x = −R. This module stores, for a grid of radii R'
and degrees g, near-minimax polynomials of the weighted problem

    min_{P ∈ Π_g} max_{|u|≤1} |P(u)·e^{−R'u} − 1|          (u = x/R')

found by the Remez exchange (weight e^{−R'u}, Chebyshev basis, linear system on g+2 alternation points),
converted exactly to monomial coefficients a'_j in u and rounded to float64; and for each a *proved*
bound η(R', g) for exactly those float64 coefficients.

Theorem (the stored η). Split [−1, 1] into pieces I = [c − h, c + h] with dyadic end points. On I write
u = c + h s, |s| ≤ 1, and z = R'h. Then, for the exact rational coefficients a'_j,

    P(u)·e^{−R'u} − 1 = e^{−R'c}·Σ_{n≥0} σ_n s^n − 1,   σ_n = Σ_k b_k (−z)^{n−k}/(n−k)!,

where P(c + h s) = Σ_k b_k s^k (an exact Taylor shift in integer arithmetic). Truncating the series of
e^{−zs} after the power M leaves, for |s| ≤ 1, at most Σ_k |b_k| · Σ_{m>M} z^m/m! ≤
Σ_k |b_k| · z^{M+1}/(M+1)! / (1 − z/(M+2)), hence

    max_I |P e^{−R'u} − 1| ≤ |e^{−R'c} b_0 − 1| + e^{−R'c} (Σ_{n≥1} |σ̃_n| + Σ_k |b_k|·t_{M+1}),

with σ̃ the truncated sums. Every quantity is computed with Python integers: b_k exactly; z^m/m!,
e^{−R'c} and the products in fixed point with 2^−256 units, each rounded in a known direction or with its
rounding added to the bound (e^y is enclosed by its Taylor series at x = |y|/2^s ≤ 2^−8, summed
with floor/ceil until a term drops below one unit — the rest is then below one unit — squared s times
with floor/ceil rounding, and inverted outward for y < 0). The maximum over
the pieces is therefore an upper bound on the real-number maximum — a proof, not a sample. Pieces
are bisected where the bound exceeds 1.03 times the largest centre value |r(c)| (a lower bound of the
true maximum), so the stored η is within a few per cent of the true relative error.

Rescaling. For a radius R ≤ R' (R' the smallest grid radius ≥ R), P(x) = Σ a'_j (x/R')^j also
approximates eˣ on [−R, R] ⊂ [−R', R'] with relative error ≤ η(R', g); in u = x/R its coefficients
are a'_j (R/R')^j. The float64 values a_j actually returned differ from those by Δa_j, computed
exactly in integer arithmetic (each |Δa_j| rounded up to a multiple of 2^−400), and |P̃(x) − P(x)|/eˣ ≤ Σ_j |Δa_j|·e^R on the interval, so

    relative_eta(R, g) = η(R', g) + Σ_j |Δa_j| · e^R        (rounded up).

The grid is R' = 2^{k/16}, k = −70..64 (0.048 ≤ R' ≤ 16): rounding R up costs a factor ≤ 2^{1/16}
in radius. Above 16 the float64 monomial form cannot carry a useful relative error anyway (its
coefficients sum to ≈ e^R while P(−R) ≈ e^{−R}, so rounding alone moves P by ≈ 2^−53·e^{2R} relative).

Cost: the table is built once (``python -m attnbound.families.relative_table --build``, minutes) and shipped as
package data; at run time a lookup plus an O(g) integer computation per (R, g), cached.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np

MAX_DEGREE = 40
GRID_STEPS_PER_OCTAVE = 16
GRID_K_MIN, GRID_K_MAX = -70, 64
TABLE_PATH = Path(__file__).resolve().parent.parent / "data" / "relative_table.npz"

_F = 256  # fixed-point fraction bits of the verifier


def grid_radii() -> np.ndarray:
    """The table's radii R'_k = 2^{k/16}, k = −70..64 (powers of two are exact grid points)."""
    return np.array([2.0 ** (k / GRID_STEPS_PER_OCTAVE) for k in range(GRID_K_MIN, GRID_K_MAX + 1)])


# --------------------------------------------------------------------------------------------------
# exact helpers


def _dyadic(x: float) -> tuple[int, int]:
    """x = n / 2^e exactly, e ≥ 0."""
    n, d = float(x).as_integer_ratio()
    return n, d.bit_length() - 1


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def _exp_interval(y_num: int, y_exp: int, bits: int = _F) -> tuple[int, int]:
    """Integers (lo, hi) with lo ≤ e^y · 2^bits ≤ hi for y = y_num / 2^y_exp (exact dyadic).

    Proof: for x = |y|/2^s ∈ [0, 2^−8], e^x = Σ_{m≤K} x^m/m! + ρ; the partial sum is taken term by
    term with floor (lo) and ceil (hi) in units 2^−G, stopping at the first K whose term is below one
    unit, so 0 ≤ ρ < x^K/K!·(x/(K+1))/(1 − x/(K+1)) < 1 unit (2 are added to hi); squaring s times with
    floor/ceil keeps lo ≤ e^{|y|}·2^G ≤ hi; e^{−|y|} = 1/e^{|y|} swaps the ends and rounds outward.
    """
    guard = bits + 64
    a = abs(y_num)
    s = max(0, a.bit_length() - y_exp + 8)
    e = y_exp + s  # x = a / 2^e ≤ 2^-8
    lo = hi = 1 << guard  # m = 0 term
    num, den, m = 1, 1, 0
    while True:
        m += 1
        num *= a
        den *= m
        den_full = den << (m * e)
        t_lo = (num << guard) // den_full
        lo += t_lo
        hi += _ceil_div(num << guard, den_full)
        if t_lo == 0 and m > 2:
            # remainder Σ_{j>m} x^j/j! ≤ 2 x^{m+1}/(m+1)! < 2 x^m/m! < 2^{1-guard}
            hi += 2
            break
    for _ in range(s):
        lo = (lo * lo) >> guard
        hi = _ceil_div(hi * hi, 1 << guard)
    if y_num < 0:
        lo, hi = (1 << (2 * guard)) // hi, _ceil_div(1 << (2 * guard), lo)
    shift = guard - bits
    return lo >> shift, _ceil_div(hi, 1 << shift)


def _fraction_up(q: Fraction) -> float:
    """The smallest float64 ≥ q (q ≥ 0)."""
    f = float(q)
    if Fraction(f) < q:
        f = math.nextafter(f, math.inf)
    return f


@lru_cache(maxsize=None)
def _exp_upper(x: float) -> float:
    """A float64 upper bound of e^x (x a float64), proved via :func:`_exp_interval`."""
    n, e = _dyadic(x)
    if x > 709.0:
        return math.inf
    _, hi = _exp_interval(n, e, 64)
    return _fraction_up(Fraction(hi, 1 << 64))


# --------------------------------------------------------------------------------------------------
# run-time lookups


@lru_cache(maxsize=1)
def _table() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(radii, coefficients[i, g, j], eta[i, g], best[i, g]) with best[i, g] = argmin_{g' ≤ g} eta[i, g']."""
    with np.load(TABLE_PATH) as z:
        radii, coeffs, eta = z["radii"], z["coefficients"], z["eta"]
    best = np.zeros(eta.shape, dtype=np.int64)
    for i in range(radii.size):
        b = 0
        for g in range(eta.shape[1]):
            if eta[i, g] < eta[i, b]:
                b = g
            best[i, g] = b
    for arr in (radii, coeffs, eta, best):
        arr.setflags(write=False)
    return radii, coeffs, eta, best


def max_radius() -> float:
    """The largest radius the table covers."""
    return float(_table()[0][-1])


def _check(radius, degree) -> tuple[float, int]:
    if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 0:
        raise ValueError(f"degree must be a non-negative int, got {degree!r}")
    try:
        radius = float(radius)
    except (TypeError, ValueError):
        raise TypeError(f"radius must be a real number, got {radius!r}") from None
    if math.isnan(radius) or radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    return radius, int(degree)


@lru_cache(maxsize=8192)
def _rescaled(radius: float, degree: int) -> tuple[np.ndarray, float]:
    radii, coeffs, eta, best = _table()
    if radius == 0.0:
        return np.eye(1, degree + 1)[0], 0.0
    if degree > MAX_DEGREE or not radius <= radii[-1]:
        return None, math.inf
    i = int(np.searchsorted(radii, radius, side="left"))
    b = int(best[i, degree])
    base = coeffs[i, b, : b + 1]
    table_eta = float(eta[i, b])
    grid_r = float(radii[i])
    out = np.zeros(degree + 1)
    if radius == grid_r:
        out[: b + 1] = base
        return out, table_eta
    rho = radius / grid_r
    power = 1.0
    for j in range(b + 1):  # a_j = a'_j·ρ^j by repeated products; the rounding is measured exactly below
        out[j] = base[j] * power
        power *= rho
    # Σ_j |a_j − a'_j (radius/R')^j| exactly, in integers: ratio = N/Q, each term rounded up to 2^-400
    rn, re_ = _dyadic(radius)
    gn, ge = _dyadic(grid_r)
    N, Q = rn << ge, gn << re_
    units = 0
    Nj, Qj = 1, 1
    for j in range(b + 1):
        m, e = _dyadic(out[j])
        n, f = _dyadic(base[j])
        x = abs((m << f) * Qj - (n << e) * Nj)  # |Δ_j| = x / (2^{e+f} Q^j)
        if x:
            units += _ceil_div(x << 400, Qj << (e + f))
        Nj *= N
        Qj *= Q
    total = Fraction(table_eta) + Fraction(units, 1 << 400) * Fraction(_exp_upper(radius))
    return out, _fraction_up(total)


def relative_coefficients(radius: float, degree: int) -> np.ndarray:
    """Monomial coefficients a_0..a_g in u = x/radius of the stored relative-minimax polynomial.

    Taken from the smallest grid radius R' ≥ radius (the best stored degree ≤ g there, zero-padded)
    and rescaled a_j = a'_j (radius/R')^j. Raises ValueError above the table or the degree cap.
    """
    radius, degree = _check(radius, degree)
    if degree > MAX_DEGREE:
        raise ValueError(f"degree must be <= {MAX_DEGREE}, got {degree}")
    a, _ = _rescaled(radius, degree)
    if a is None:
        raise ValueError(f"radius {radius} is above the relative-error table (max {max_radius()})")
    return a.copy()


def relative_eta(radius: float, degree: int) -> float:
    """Proved η ≥ max_{|x|≤radius} |P(x)/eˣ − 1| for the float64 coefficients of :func:`relative_coefficients`.

    η(R', g) of the table plus the exact rescaling drift Σ|Δa_j|·e^radius; inf above the table or the
    degree cap, 0 at radius 0 (P = 1).
    """
    radius, degree = _check(radius, degree)
    return _rescaled(radius, degree)[1]


def relative_delta(radius: float, degree: int) -> float:
    """Absolute error bound max |P(x) − eˣ| ≤ η·e^radius on [−radius, radius]."""
    eta = relative_eta(radius, degree)
    return 0.0 if eta == 0.0 else (_fraction_up(Fraction(eta) * Fraction(_exp_upper(radius)))
                                   if math.isfinite(eta) and radius <= 700 else math.inf)


def relative_degree(radius: float, eta: float, max_degree: int = MAX_DEGREE) -> int | None:
    """Smallest degree g ≤ max_degree with relative_eta(radius, g) ≤ eta, or None."""
    for g in range(min(max_degree, MAX_DEGREE) + 1):
        if relative_eta(radius, g) <= eta:
            return g
    return None
