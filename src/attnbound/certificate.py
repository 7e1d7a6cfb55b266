"""The a-priori error certificate of polynomial-feature attention (SPEC §3).

Let P approximate exp on [−R, R] with δ = max_{x∈[−R,R]} |P(x) − eˣ|, and let R bound
|x_ij| = |s⟨q_i, k_j⟩| for every pair that is computed. Because eˣ ≥ e^{−R} there, every
attention weight has relative error at most

    η = δ · e^{R}.

For a weighted average whose weights carry relative errors η_j with |η_j| ≤ η < 1,

    õ_i − o_i = Σ_j w_j η_j (v_j − o_i) / Σ_j w_j (1 + η_j),

so per output column c, |õ_ic − o_ic| ≤ η/(1−η) · (max_j v_jc − min_j v_jc). attnbound reports
this column-range form; it is never larger than the 2η/(1−η)·max|v| of the cruder argument.

Floating point: the feature engine runs in float64. Evaluating P(u) over rank r features and
summing n_k keys perturbs numerator and denominator by at most η_fp = (r + n_k + 2)·u₆₄·Σ_j|a_j|·e^{R}
relative to the denominator (the features of unit vectors obey Σ_{|α|=j} (j!/α!)|q^α k^α| ≤ 1),
which moves the output by at most 2η_fp/(1−η−η_fp)·max|v|; the division and the final cast to the
output dtype add (4u₆₄ + u_out)·max|v|. This ``rounding_bound`` is tiny next to any sensible eps in
float64 and float32, and it makes the bound hold for the tensor actually returned.

When η ≥ 1 nothing can be certified (the weights could vanish or change sign): callers raise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

U64 = 2.0**-53


def unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2.0


@dataclass(frozen=True)
class Certificate:
    """What attnbound guarantees about one attention call.

    ``output_error_bound`` bounds max_{i,c} |out_ic − exact_ic| for the returned tensor.
    """

    method: str
    kind: str = "softmax"
    degree: int | None = None
    rank: int | None = None
    radius: float | None = None
    radius_source: str | None = None  # "data" (s·max‖q‖·max‖k‖) or "bound" (s·d·B²)
    delta: float = 0.0
    eta: float = 0.0
    value_range: float = 0.0
    max_abs_value: float = 0.0
    approximation_bound: float = 0.0
    rounding_bound: float = 0.0
    output_error_bound: float = 0.0
    eps: float | None = None

    @property
    def certified(self) -> bool:
        return self.eps is None or self.output_error_bound <= self.eps

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        if self.method == "exact":
            return f"Certificate(exact, {self.kind}, rounding only: ‖out−exact‖∞ ≤ {self.output_error_bound:.3g})"
        return (
            f"Certificate({self.method} degree {self.degree}, rank {self.rank}, R={self.radius:.4g} "
            f"[{self.radius_source}], δ={self.delta:.3g}, η={self.eta:.3g}, "
            f"‖out−exact‖∞ ≤ {self.output_error_bound:.3g})"
        )


def relative_weight_error(delta: float, radius: float) -> float:
    """η = δ·e^R (inf when it overflows)."""
    try:
        return delta * math.exp(radius)
    except OverflowError:
        return math.inf


def output_bound(eta: float, value_range: float) -> float:
    """η/(1−η)·range, or inf when η ≥ 1 (uncertifiable)."""
    if not eta < 1.0:
        return math.inf
    return eta / (1.0 - eta) * value_range


def feature_certificate(
    *,
    method: str,
    kind: str,
    degree: int,
    rank: int,
    radius: float,
    radius_source: str,
    delta: float,
    coeff_abs_sum: float,
    n_k: int,
    value_range: float,
    max_abs_value: float,
    out_dtype: torch.dtype,
    eps: float | None = None,
) -> Certificate:
    """Assemble the certificate of a polynomial-feature run (see the module docstring)."""
    eta = relative_weight_error(delta, radius)
    approx = output_bound(eta, value_range)
    eta_fp = (rank + n_k + 2) * U64 * coeff_abs_sum * math.exp(min(radius, 700.0))
    if eta + eta_fp < 1.0:
        rounding = (2.0 * eta_fp / (1.0 - eta - eta_fp) + 4.0 * U64 + unit_roundoff(out_dtype)) * max_abs_value
    else:
        rounding = math.inf
    return Certificate(
        method=method,
        kind=kind,
        degree=degree,
        rank=rank,
        radius=radius,
        radius_source=radius_source,
        delta=delta,
        eta=eta,
        value_range=value_range,
        max_abs_value=max_abs_value,
        approximation_bound=approx,
        rounding_bound=rounding,
        output_error_bound=approx + rounding,
        eps=eps,
    )


def _gamma(m: int, u: float) -> float:
    """γ_m = m·u/(1 − m·u): the classic bound on m accumulated roundings (inf when m·u ≥ 1)."""
    return m * u / (1.0 - m * u) if m * u < 1.0 else math.inf


def exact_certificate(
    *,
    kind: str,
    logit_bound: float,
    d: int,
    n_k: int,
    blocks: int,
    block: int | None = None,
    value_range: float,
    max_abs_value: float,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
    eps: float | None = None,
) -> Certificate:
    """The rounding-error bound of exact attention computed in ``compute_dtype``.

    With u the unit roundoff and L bounding |logit| (s·‖q‖‖k‖, or s·(‖q‖+‖k‖)² for ℓ2, plus
    the largest finite additive mask entry): the logit and the subtracted row maximum each carry
    at most γ_{d+2}·L, exp adds 2u and each of the ``blocks`` online-softmax rescales 3u, so every
    weight has relative error η ≤ exp(2γ_{d+2}·L + 2u + 3u·blocks) − 1 and, as for the
    approximations, the output moves by at most η/(1−η)·range. Summing m terms in numerator
    and denominator and dividing add (2γ_m/(1−γ_m) + 2u)·max|v|, with m = n_k for one dense
    sum and m = block + blocks when ``block``-long partial sums are accumulated blockwise; the
    cast to the output dtype adds u_out·max|v|. A worst case: measured errors sit orders of
    magnitude below it.
    """
    u = unit_roundoff(compute_dtype)
    lam = 2.0 * _gamma(d + 2, u) * logit_bound + 2.0 * u + 3.0 * u * blocks
    eta = math.expm1(lam) if lam < 700.0 else math.inf
    approx = output_bound(eta, value_range)
    g = _gamma(min(block, n_k) + blocks if block else n_k, u)
    sums = (2.0 * g / (1.0 - g) + 2.0 * u) if g < 1.0 else math.inf
    rounding = (sums + (unit_roundoff(out_dtype) if out_dtype != compute_dtype else 0.0)) * max_abs_value
    return Certificate(method="exact", kind=kind, eta=eta, value_range=value_range, max_abs_value=max_abs_value,
                       approximation_bound=0.0, rounding_bound=approx + rounding,
                       output_error_bound=approx + rounding, eps=eps)
