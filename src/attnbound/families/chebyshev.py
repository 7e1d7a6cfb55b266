"""Near-best polynomial approximation of exp (Alman & Song, *Fast Attention Requires Bounded Entries*,
NeurIPS 2023, via Aggarwal & Alman, *Optimal-degree polynomial approximations for exponentials and
Gaussian kernel density estimation*, CCC 2022): the "polynomial method" behind n^{1+o(1)}-time
attention for bounded entries.

On [−R, R], in the normalised variable u = x/R, exp(R·u) has the Chebyshev expansion

    exp(R u) = I_0(R) + 2 Σ_{k≥1} I_k(R) T_k(u)        (I_k: modified Bessel functions)

so the degree-g truncation P_g has the rigorous error

    δ_g = max_{|u|≤1} |exp(Ru) − P_g(u)| ≤ 2 Σ_{k>g} I_k(R),

which attnbound sums exactly up to k = g + 64 + ⌈R⌉ and closes with a geometric tail
(I_{k+1}(R) ≤ R/(2(k+1))·I_k(R), term by term from the power series). The truncated Chebyshev
series is within a small factor of the best degree-g approximation, and δ_g falls like
(R/2)^{g+1}/(g+1)! once g ≳ R, so degree g = O(max(log(1/δ)/log(log(1/δ)/R), R)) suffices —
the bound Alman–Song use. With d = O(log n) and R = o(log n) the rank C(d+g, g) is n^{o(1)}.

The series is converted to monomial coefficients a_j in u (well conditioned for g ≲ 20 because
|u| ≤ 1). The conversion is checked in exact rational arithmetic and its rounding, plus a
relative 1e-14 allowance for scipy's Bessel values, is added to δ_g.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

import numpy as np
from numpy.polynomial import chebyshev as npcheb
from scipy import special

MAX_DEGREE = 40


@lru_cache(maxsize=None)
def _cheb_monomial_table(g: int) -> tuple[tuple[int, ...], ...]:
    """Integer monomial coefficients of T_0..T_g (exact, Python ints)."""
    rows = [(1,), (0, 1)]
    for k in range(2, g + 1):
        a, b = rows[k - 1], rows[k - 2]
        new = [0] * (k + 1)
        for j, c in enumerate(a):
            new[j + 1] += 2 * c
        for j, c in enumerate(b):
            new[j] -= c
        rows.append(tuple(new))
    return tuple(rows[: g + 1])


def exact_monomial(cheb) -> list[Fraction]:
    """The monomial coefficients of Σ_k c_k T_k(u) for the float64 values c_k, exactly (rationals)."""
    g = len(cheb) - 1
    rows = _cheb_monomial_table(max(g, 1))
    exact = [Fraction(0)] * (g + 1)
    for k, ck in enumerate(cheb):
        fk = Fraction(float(ck))
        for j, t in enumerate(rows[k]):
            if t:
                exact[j] += fk * t
    return exact


def chebyshev_to_monomial(cheb) -> np.ndarray:
    """Monomial coefficients of Σ c_k T_k(u): computed exactly in rationals, rounded to nearest float64."""
    return np.array([float(e) for e in exact_monomial(cheb)])


def chebyshev_series(radius: float, degree: int) -> np.ndarray:
    """Chebyshev coefficients c_0..c_g of exp(R·u) on [−1, 1] (c_0 = I_0(R), c_k = 2 I_k(R))."""
    k = np.arange(degree + 1)
    c = special.iv(k, radius)
    c[1:] *= 2.0
    return c


@lru_cache(maxsize=4096)
def _coefficients_and_delta(radius: float, degree: int) -> tuple[np.ndarray, float]:
    if degree < 0 or degree > MAX_DEGREE:
        raise ValueError(f"degree must be in 0..{MAX_DEGREE}, got {degree}")
    if radius < 0 or not math.isfinite(radius):
        raise ValueError(f"radius must be finite and >= 0, got {radius}")
    if radius == 0.0:
        a = np.zeros(degree + 1)
        a[0] = 1.0
        return a, 0.0
    c = chebyshev_series(radius, degree)
    with np.errstate(over="ignore", invalid="ignore"):
        a = npcheb.cheb2poly(c)
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(a))):  # e^R or the conversion left float64
        return a, math.inf
    exact = exact_monomial(c)  # the float Chebyshev coefficients converted exactly, to bound the rounding of a
    conversion = float(sum(abs(Fraction(float(aj)) - e) for aj, e in zip(a, exact)))
    # truncation tail 2 Σ_{k>g} I_k(R), summed then closed geometrically
    k_stop = degree + 64 + int(math.ceil(radius))
    ks = np.arange(degree + 1, k_stop + 1)
    terms = special.iv(ks, radius)
    rho = radius / (2.0 * (k_stop + 1))
    tail = 2.0 * (float(terms.sum()) + float(terms[-1]) * rho / (1.0 - rho))
    bessel_err = 1e-14 * float(np.abs(c).sum())
    return a, tail * (1.0 + 1e-12) + conversion + bessel_err


def chebyshev_coefficients(radius: float, degree: int) -> np.ndarray:
    """Monomial coefficients a_0..a_g in u = x/R of the degree-g Chebyshev truncation of exp(R·u)."""
    return _coefficients_and_delta(float(radius), int(degree))[0].copy()


def chebyshev_error(radius: float, degree: int) -> float:
    """Rigorous δ_g ≥ max_{|x|≤R} |P_g(x/R) − eˣ| for the coefficients of :func:`chebyshev_coefficients`."""
    return _coefficients_and_delta(float(radius), int(degree))[1]


def chebyshev_degree(radius: float, delta: float, max_degree: int = MAX_DEGREE) -> int | None:
    """Smallest degree g with chebyshev_error(R, g) ≤ δ, or None if none up to max_degree."""
    for g in range(max_degree + 1):
        if chebyshev_error(radius, g) <= delta:
            return g
    return None
