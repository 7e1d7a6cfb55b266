"""Taylor-series coefficients for exp (Keles, Wijewardena, Hegde, ALT 2023, §5).

Keles et al. approximate every attention weight exp(x), x = s⟨q,k⟩, by the order-p Taylor
polynomial T_p(x) = Σ_{j≤p} x^j / j!, which factors through the symmetric monomial features of
q and k (see :mod:`attnbound.engines.features`): time O(n · C(d+p, p) · d_v), linear in n and
exponential in p (C(d+p, p) ≈ d^p/p!).

On [−R, R] the Lagrange remainder gives δ_p = max |eˣ − T_p(x)| ≤ e^R R^{p+1}/(p+1)!.
The order must be even: T_p(x) > 0 for every real x exactly when p is even, so the softmax
denominator stays positive; an odd T_p is negative for some x < 0 (T_1(−2) = −1).

Coefficients are returned in the normalised variable u = x/R ∈ [−1, 1]: a_j = R^j / j!.
"""

from __future__ import annotations

import math

import numpy as np


def taylor_coefficients(radius: float, order: int) -> np.ndarray:
    """a_j = R^j / j!, j = 0..order: T_p(R·u) = Σ a_j u^j."""
    return np.array([radius**j / math.factorial(j) for j in range(order + 1)], dtype=np.float64)


def taylor_tail(radius: float, order: int) -> float:
    """e^R R^{p+1} / (p+1)!: the Lagrange bound on |eˣ − T_p(x)| on [−R, R] (inf past float64)."""
    if radius == 0.0:
        return 0.0
    log_tail = radius + (order + 1) * math.log(radius) - math.lgamma(order + 2)
    return math.exp(log_tail) if log_tail < 709.0 else math.inf


def coefficient_rounding(radius: float, order: int) -> float:
    """2^-52·Σ|a_j|: the rounding of the float64 coefficients a_j = R^j/j!, in units of |P|'s scale."""
    return 2.0**-52 * float(np.abs(taylor_coefficients(radius, order)).sum())


def taylor_remainder(radius: float, order: int) -> float:
    """Rigorous δ_p = e^R R^{p+1} / (p+1)! on [−R, R] (Lagrange form), plus coefficient rounding."""
    if radius == 0.0:
        return 0.0
    return taylor_tail(radius, order) + coefficient_rounding(radius, order)
