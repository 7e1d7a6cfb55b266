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
  (Bessel tail, :mod:`attnbound.families.chebyshev`) gives η = δ·e^R since eˣ ≥ e^{−R} on the interval.
* ``relative``: near-minimax polynomials in relative error (:mod:`attnbound.families.relative`), tabulated
  for radii up to 16 with a proved η; at the same degree η is 3× (R = 1) to 10⁴× (R = 8) smaller
  than Chebyshev's δ·e^R, so the certified degree and rank drop.

Each also reports Σ|a_j|, which the float64 rounding term of the certificate needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

import torch

from ..certificate import Certificate, feature_certificate
from ..engines.monomials import feature_rank
from .chebyshev import MAX_DEGREE as CHEBYSHEV_MAX_DEGREE
from .chebyshev import chebyshev_coefficients, chebyshev_error
from .relative import MAX_DEGREE as RELATIVE_MAX_DEGREE
from .relative import relative_coefficients, relative_delta, relative_eta
from .taylor import coefficient_rounding, taylor_coefficients, taylor_remainder, taylor_tail

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
    return taylor_tail(radius, degree) + coefficient_rounding(radius, degree) * _exp_or_inf(radius)


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
    "relative": Family("relative", RELATIVE_MAX_DEGREE, 1, relative_coefficients,
                       lambda radius, degree: relative_eta(radius, degree) if _usable(radius) else math.inf,
                       lambda radius, degree: relative_delta(radius, degree) if _usable(radius) else math.inf),
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


def polynomial_setup(method: str, radius: float, degree: int, *, d: int, bound: float | None,
                     norms: tuple[float, float] | None):
    """(monomial coefficients of P in u = x/R, query scale, key scale) such that ⟨a_q·q, a_k·k⟩ = x/R ∈ [−1, 1].

    With a declared ``bound`` the scales are 1/(√d·B); otherwise 1/max‖q‖ and 1/max‖k‖ from ``norms``.
    """
    coeffs = family(method).coefficients(radius, degree)
    if radius == 0.0:
        coeffs = coeffs[:1]
    if bound is not None:
        aq = ak = 1.0 / (math.sqrt(d) * float(bound))
    else:
        mq, mk = norms
        aq, ak = (1.0 / mq if mq > 0 else 1.0), (1.0 / mk if mk > 0 else 1.0)
    return coeffs, aq, ak


def certified_degree(method: str, radius: float, eps: float, *, d: int, n_k: int, value_range: float,
                     max_abs_value: float, kind: str = "softmax", radius_source: str = "data",
                     out_dtype: torch.dtype = torch.float32, rounding: bool = True,
                     key_log_weight: float | None = None, exact_eta: float = 0.0) -> Certificate | None:
    """The certificate of the smallest degree (even order for Taylor) meeting ``eps``, or None if none ≤ the cap.

    Costs nothing but scalar arithmetic; use it to ask what an input would need before running.
    ``rounding=False`` asks the approximation term alone to meet ``eps`` (what the mathematics
    needs before the float64 rounding term, which grows with the rank, is counted).
    ``rounding="posterior"`` asks the approximation term to meet eps/2, leaving the other half to
    the a-posteriori rounding bound the run itself will measure (see :func:`feature_certificate`).
    """
    if rounding == "posterior":
        return certified_degree(method, radius, eps / 2.0, d=d, n_k=n_k, value_range=value_range,
                                max_abs_value=max_abs_value, kind=kind, radius_source=radius_source,
                                out_dtype=out_dtype, rounding=False, key_log_weight=key_log_weight,
                                exact_eta=exact_eta)
    for g in family(method).degrees():
        c = degree_certificate(method, radius, g, d=d, n_k=n_k, value_range=value_range,
                               max_abs_value=max_abs_value, kind=kind, radius_source=radius_source,
                               out_dtype=out_dtype, eps=eps, key_log_weight=key_log_weight, exact_eta=exact_eta)
        if not math.isfinite(c.eta):
            continue
        if c.eta < 1.0 and (c.output_error_bound if rounding else c.approximation_bound) <= eps:
            return c
    return None


def choose_certificate(method: str, radius: float, radius_source: str = "data", *, eps: float | None,
                       degree: int | None, d: int, n_k: int, value_range: float, max_abs_value: float,
                       kind: str = "softmax", out_dtype: torch.dtype = torch.float32, strict: bool = True,
                       key_log_weight: float | None = None, exact_eta: float = 0.0) -> Certificate:
    """The certificate a family's run will carry: the smallest degree meeting ``eps``, or the
    fixed ``degree`` (even order for Taylor). Raises when neither is given, when no degree up to the
    cap meets ``eps``, when the fixed degree's bound exceeds ``eps``, or (``strict``) when the fixed
    degree cannot be certified (η ≥ 1)."""
    fam = family(method)
    common = dict(d=d, n_k=n_k, value_range=value_range, max_abs_value=max_abs_value, kind=kind,
                  radius_source=radius_source, out_dtype=out_dtype, key_log_weight=key_log_weight,
                  exact_eta=exact_eta)
    if radius > MAX_FEATURE_RADIUS or radius + math.log(n_k + 1.0) + 4.0 >= 709.0:
        raise ValueError(f"radius R = {radius:.4g} is beyond what float64 features can represent "
                         f"(e^R·n_k overflows); use method='exact'")
    if degree is None:
        if eps is None:
            raise ValueError(f"method={method!r} needs eps (target error) or {fam.degree_name} (fixed)")
        cert = certified_degree(method, radius, eps, **common) or \
            certified_degree(method, radius, eps, rounding="posterior", **common)
        if cert is None:
            last = degree_certificate(method, radius, fam.max_degree, eps=eps, **common)
            raise ValueError(
                f"eps={eps:g} cannot be certified by method={method!r} up to {fam.degree_name} {fam.max_degree} "
                f"at radius R={radius:.4g} (best bound {last.output_error_bound:.3g}); use method='exact' or "
                f"shrink the inputs' norms"
            )
        return cert
    fam.check_degree(degree)
    cert = degree_certificate(method, radius, degree, eps=eps, **common)
    if strict and not cert.eta < 1.0:
        raise ValueError(
            f"cannot certify {method} {fam.degree_name} {degree} at radius R={radius:.4g}: the relative weight "
            f"error η = {cert.eta:.3g} ≥ 1, so weights could vanish or change sign; raise the "
            f"{fam.degree_name} or use method='exact'"
        )
    if eps is not None and not cert.approximation_bound <= eps:
        raise ValueError(
            f"eps: {method} {fam.degree_name} {degree} at radius R={radius:.4g} carries the bound "
            f"{cert.output_error_bound:.3g} > eps={eps:g}; drop the fixed {fam.degree_name} (eps alone picks "
            f"the smallest that meets it) or pass a larger eps"
        )
    return cert
