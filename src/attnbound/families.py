"""Approximation families of exp: the one interface the planner, the degree search and the engines use.

A family maps (radius R, degree g) to a polynomial P(x) = Σ_j a_j (x/R)^j and a rigorous bound on
its **relative** error on [−R, R],

    η(R, g) ≥ max_{|x|≤R} |P(x)/eˣ − 1|,

which is all the certificate needs (docs/theory.md §3: each weight is off by a factor in [1 − η, 1 + η], so
the output moves by at most η/(1−η) times the value range; η < 1 keeps every weight positive).
It also states the largest degree it offers and which degrees are allowed (Taylor: even orders,
whose polynomial is positive on all of ℝ).

Members:

* ``taylor`` (Keles et al.): T_p(x) = Σ_{j≤p} x^j/j!. Lagrange: eˣ − T_p(x) = e^ξ x^{p+1}/(p+1)! with
  ξ between 0 and x, so |T_p(x)/eˣ − 1| ≤ e^{max(0, −x)}·R^{p+1}/(p+1)! ≤ e^R R^{p+1}/(p+1)!.
* ``polynomial`` (Alman–Song): the degree-g Chebyshev truncation of e^{Ru}; its absolute error δ
  (Bessel tail, :mod:`attnbound.chebyshev`) gives η = δ·e^R since eˣ ≥ e^{−R} on the interval.
* ``relative``: near-minimax polynomials in relative error (:mod:`attnbound.relative`), tabulated
  for radii up to 16 with a proved η; at the same degree η is 3× (R = 1) to 10⁴× (R = 8) smaller
  than Chebyshev's δ·e^R, so the certified degree and rank drop.

Both also report Σ|a_j|, which the float64 rounding term of the certificate needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

import torch

from .certificate import Certificate, feature_certificate
from .chebyshev import MAX_DEGREE as CHEBYSHEV_MAX_DEGREE
from .chebyshev import chebyshev_coefficients, chebyshev_error
from .relative import MAX_DEGREE as RELATIVE_MAX_DEGREE
from .features import feature_rank
from .relative import relative_coefficients, relative_delta, relative_eta
from .taylor import taylor_coefficients, taylor_remainder

MAX_TAYLOR_ORDER = 20
MAX_FEATURE_RADIUS = 700.0  # e^R must stay representable in float64 for the engine and its certificate


def _exp_or_inf(x: float) -> float:
    return math.exp(x) if x < 709.0 else math.inf


@dataclass(frozen=True)
class Family:
    name: str  # the ``method`` of :func:`attnbound.attention`
    max_degree: int
    step: int  # allowed degrees: 0, step, 2·step, …
    coefficients: Callable[[float, int], np.ndarray]  # a_0..a_g in u = x/R
    eta: Callable[[float, int], float]  # rigorous max |P/exp − 1| on [−R, R]; inf where unusable
    absolute_error: Callable[[float, int], float]  # rigorous max |P − exp| on [−R, R] (reported as δ)

    @property
    def degree_name(self) -> str:
        return "order" if self.step == 2 else "degree"

    def degrees(self) -> range:
        return range(0, self.max_degree + 1, self.step)

    def check_degree(self, degree) -> int:
        if isinstance(degree, bool) or not isinstance(degree, int) or not 0 <= degree <= self.max_degree:
            raise ValueError(f"{self.degree_name} must be an int in 0..{self.max_degree}, got {degree!r}")
        if degree % self.step:
            raise ValueError(
                f"{self.degree_name} must be even, got {degree}: an odd Taylor polynomial of exp is negative for "
                f"some x < 0 (e.g. 1 + x at x = −2), so the softmax denominator could vanish or flip sign; "
                f"use {self.degree_name}={degree + 1} or {self.degree_name}={degree - 1}")
        return degree

    def coeff_abs_sum(self, radius: float, degree: int) -> float:
        return float(np.abs(self.coefficients(radius, degree)).sum())


def _usable(radius: float) -> bool:
    return math.isfinite(radius) and 0.0 <= radius <= MAX_FEATURE_RADIUS


def _taylor_eta(radius: float, degree: int) -> float:
    if not _usable(radius):
        return math.inf
    if radius == 0.0:
        return 0.0
    log_tail = radius + (degree + 1) * math.log(radius) - math.lgamma(degree + 2)
    coeff_rounding = 2.0**-52 * float(np.abs(taylor_coefficients(radius, degree)).sum())
    return _exp_or_inf(log_tail) + coeff_rounding * _exp_or_inf(radius)


def _taylor_delta(radius: float, degree: int) -> float:
    return taylor_remainder(radius, degree) if _usable(radius) else math.inf


def _chebyshev_delta(radius: float, degree: int) -> float:
    return chebyshev_error(radius, degree) if _usable(radius) else math.inf


def _chebyshev_eta(radius: float, degree: int) -> float:
    delta = _chebyshev_delta(radius, degree)
    return delta * _exp_or_inf(radius) if delta > 0 else 0.0


def _taylor_coefficients(radius: float, degree: int) -> np.ndarray:
    return taylor_coefficients(radius, degree) if radius > 0 else np.eye(1, degree + 1)[0]


def _chebyshev_coefficients(radius: float, degree: int) -> np.ndarray:
    return chebyshev_coefficients(radius, degree) if radius > 0 else np.eye(1, degree + 1)[0]


FAMILIES: dict[str, Family] = {
    "taylor": Family("taylor", MAX_TAYLOR_ORDER, 2, _taylor_coefficients, _taylor_eta, _taylor_delta),
    "polynomial": Family("polynomial", CHEBYSHEV_MAX_DEGREE, 1, _chebyshev_coefficients, _chebyshev_eta,
                         _chebyshev_delta),
    "relative": Family("relative", RELATIVE_MAX_DEGREE, 1, relative_coefficients, relative_eta, relative_delta),
}


def fixed_degree(method: str, degree: int | None, order: int | None) -> int | None:
    """The fixed degree a call asked of ``method``'s family: ``order`` for Taylor, ``degree`` otherwise."""
    return order if family(method).step == 2 else degree


def family(method: str) -> Family:
    try:
        return FAMILIES[method]
    except KeyError:
        raise ValueError(f"unknown approximation family {method!r}; choose one of "
                         f"{', '.join(map(repr, FAMILIES))}") from None


def degree_certificate(method: str, radius: float, degree: int, *, d: int, n_k: int, value_range: float,
                       max_abs_value: float, kind: str = "softmax", radius_source: str = "data",
                       out_dtype: torch.dtype = torch.float32, eps: float | None = None,
                       key_log_weight: float | None = None, min_denominator: float | None = None,
                       exact_eta: float = 0.0) -> Certificate:
    """The certificate a ``method`` (an approximation family: "taylor", "polynomial", "relative") run of
    ``degree`` would carry at radius R."""
    fam = family(method)
    eta = fam.eta(radius, degree)
    finite = math.isfinite(eta)
    return feature_certificate(method=method, kind=kind, degree=degree, rank=feature_rank(d, degree), radius=radius,
                               radius_source=radius_source, eta=eta,
                               delta=fam.absolute_error(radius, degree) if finite else math.inf,
                               coeff_abs_sum=fam.coeff_abs_sum(radius, degree) if finite else math.inf, n_k=n_k,
                               d=d, value_range=value_range, max_abs_value=max_abs_value, out_dtype=out_dtype,
                               key_log_weight=key_log_weight, min_denominator=min_denominator,
                               exact_eta=exact_eta, eps=eps)
