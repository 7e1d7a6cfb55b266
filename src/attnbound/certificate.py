"""The a-priori error certificate of an attention call (docs/theory.md §3).

**The contract.** For every call that returns, ``out`` is finite, has the documented shape and
dtype, and max_{i,c} |out_ic − exact_ic| ≤ ``output_error_bound``, where exact is the attention
of the inputs as given (real arithmetic). With ``eps`` the bound is ≤ eps or the call raises.

**Approximations.** Let P approximate exp on [−R, R] with relative error
η = max_{|x|≤R} |P(x)/eˣ − 1| (from :mod:`attnbound.families`), and let R bound |x_ij| for every
computed pair. For a weighted average whose weights carry relative errors η_j with |η_j| ≤ η < 1,

    õ_i − o_i = Σ_j w_j η_j (v_j − o_i) / Σ_j w_j (1 + η_j),

so per output column c, |õ_ic − o_ic| ≤ η/(1−η) · (max_j v_jc − min_j v_jc). Per-key weights
(ℓ2 attention's exp(−s‖k_j‖²), normalised over the keys a row can see) are computed in float64 with
relative error η_w ≤ exp(2γ_{d+2}·s·max‖k‖² + 6u₆₄) − 1; the two combine as (1+η)(1+η_w) − 1.

Floating point: the feature engine runs in float64. Evaluating P(u) over rank r features and
summing n_k keys in any order perturbs numerator and denominator by at most
η_fp = γ_{r + n_k + d + 2g + 4}·Σ_j|a_j|·e^{R}
relative to the denominator (the features of unit vectors obey Σ_{|α|=j} (j!/α!)|q^α k^α| ≤ 1),
which moves the output by at most 2η_fp/(1−η−η_fp)·max|v|; the division and the final cast to the
output dtype add (4u₆₄ + u_out)·max|v|, plus u_out·tiny_out for an output in the subnormal range.
Key weights that underflow float64 (ℓ2, centring) add at most n_k·2^{−1020}·e^{2R}/(1−η)·max|v|.

**Exact attention** carries the rounding bound of :func:`exact_certificate`.

When η ≥ 1, or any term is infinite or NaN, nothing is certified: the bound is inf and
``Certificate.certified`` is False.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

U64 = 2.0**-53


class CertificateMiss(ValueError):
    """A run chosen on its a-priori terms whose a-posteriori certificate (measured on the input) misses eps.

    ``method="auto"`` moves on to its next candidate; a fixed method raises it (a ValueError saying why)."""


def unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2.0


def underflow_unit(dtype: torch.dtype) -> float:
    """An upper bound on the absolute rounding error of one result in the subnormal range: the smallest
    subnormal, tiny·eps = 2·tiny·u (the error itself is at most half of it; tiny·u alone is 2^-1075 in float64,
    which a Python float rounds to 0)."""
    fi = torch.finfo(dtype)
    return float(fi.tiny) * float(fi.eps)


def _finite_or_inf(x: float) -> float:
    return x if math.isfinite(x) else math.inf


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
    compute_dtype: str | None = None
    engine: str | None = None  # which engine computed the output (attnbound.engines.registry)

    @property
    def certified(self) -> bool:
        """True when the bound is finite and (if eps was asked for) meets it."""
        b = self.output_error_bound
        return math.isfinite(b) and (self.eps is None or b <= self.eps)

    @property
    def gradient_certificate(self):
        """The :class:`~attnbound.gradient.GradientCertificate` of this call's last backward (None before one ran,
        or when autograd did not record through the call)."""
        slot = self.__dict__.get("_gradient_slot")
        return slot.certificate if slot is not None else None

    def as_dict(self) -> dict:
        return asdict(self)

    def __getstate__(self) -> dict:
        """Pickled without the gradient slot (it holds the call's tensors and a closure over the call)."""
        state = dict(self.__dict__)
        state.pop("_gradient_slot", None)
        return state

    def __str__(self) -> str:
        if self.method == "exact":
            return (f"Certificate(exact, {self.kind}, {self.compute_dtype}, rounding only: "
                    f"‖out−exact‖∞ ≤ {self.output_error_bound:.3g})")
        return (
            f"Certificate({self.method} degree {self.degree}, rank {self.rank}, R={self.radius:.4g} "
            f"[{self.radius_source}], δ={self.delta:.3g}, η={self.eta:.3g}, "
            f"‖out−exact‖∞ ≤ {self.output_error_bound:.3g})"
        )


def output_bound(eta: float, value_range: float) -> float:
    """η/(1−η)·range, or inf when η ≥ 1 or NaN (uncertifiable)."""
    if not 0.0 <= eta < 1.0:
        return math.inf
    return eta / (1.0 - eta) * value_range if value_range > 0 else 0.0


def key_weight_error(key_log_weight: float, d: int) -> float:
    """Relative error of float64 per-key weights exp(b_j − max b) with |b_j| ≤ ``key_log_weight``."""
    if key_log_weight <= 0.0:
        return 0.0
    lam = 2.0 * _gamma(d + 2, U64) * key_log_weight + 6.0 * U64
    return math.expm1(lam) if lam < 700.0 else math.inf


def feature_certificate(
    *,
    method: str,
    kind: str,
    degree: int,
    rank: int,
    radius: float,
    radius_source: str,
    eta: float,
    delta: float,
    coeff_abs_sum: float,
    n_k: int,
    d: int,
    value_range: float,
    max_abs_value: float,
    out_dtype: torch.dtype,
    key_log_weight: float | None = None,
    min_denominator: float | None = None,
    exact_eta: float = 0.0,
    eps: float | None = None,
) -> Certificate:
    """Assemble the certificate of a polynomial-feature run (see the module docstring).

    ``exact_eta`` is the relative rounding of weights computed exactly beside the polynomial (heavy
    tokens): every weight is then off by at most max(the polynomial's, exact_eta).

    ``eta`` is the family's relative error on [−R, R]; ``key_log_weight`` bounds |log| of the
    per-key weights (ℓ2: s·max‖k‖²), or None when there are none (masks give exact 0/1 weights).

    The float64 rounding of numerator and denominator is at most E = γ_N·Σ|a_j|·Σ_j w_j ≤ γ_N·Σ|a_j|·n_k
    (N = r + n_k + d + 2g + 4; key weights w_j ≤ 1, features of vectors in the unit ball). A priori the
    denominator is ≥ Σ_j w_j·(1−η)e^{−R}, so E is at most η_fp = γ_N·Σ|a_j|·e^R relative to it.
    ``min_denominator``, the smallest computed row sum D̃ of the run, gives the a-posteriori
    η_fp = E/(D̃ − E) (the true row sum is ≥ D̃ − E): on rows whose logits are not all near −R this
    saves up to a factor e^R. The certificate uses the smaller of the two.
    """
    eta_w = key_weight_error(key_log_weight, d) if key_log_weight is not None else 0.0
    eta_all = (1.0 + eta) * (1.0 + eta_w) - 1.0 if math.isfinite(eta) and math.isfinite(eta_w) else math.inf
    eta_all = max(eta_all, exact_eta)
    approx = output_bound(eta_all, value_range)
    # every partial sum of n_k weights of size ≤ 2e^R must stay representable in float64
    headroom = radius + math.log(n_k + 1.0) + 4.0 < 709.0
    g_n = _gamma(rank + n_k + d + 2 * degree + 4, U64)  # + 2g: Horner's rule in the fused causal triangle
    eta_fp = g_n * coeff_abs_sum * math.exp(radius) if headroom else math.inf
    if min_denominator is not None and headroom:
        err = g_n * coeff_abs_sum * n_k
        eta_fp = min(eta_fp, err / (min_denominator - err) if min_denominator > err else math.inf)
    if eta_all + eta_fp < 1.0:
        rounding = (2.0 * eta_fp / (1.0 - eta_all - eta_fp) + 4.0 * U64 + 2.0**-1000 + unit_roundoff(out_dtype)) \
            * max_abs_value
        rounding += underflow_unit(out_dtype)
        if key_log_weight is not None:  # per-key weights (ℓ2, centring) that underflow float64
            log_under = math.log(n_k) - 1020 * math.log(2.0) + 2.0 * radius - math.log1p(-eta_all)
            rounding += math.exp(log_under) * max_abs_value if log_under < 700.0 else math.inf
    else:
        rounding = math.inf
    bound = _finite_or_inf(approx + rounding)
    return Certificate(
        method=method,
        kind=kind,
        degree=degree,
        rank=rank,
        radius=radius,
        radius_source=radius_source,
        delta=delta,
        eta=eta_all,
        value_range=value_range,
        max_abs_value=max_abs_value,
        approximation_bound=approx,
        rounding_bound=rounding,
        output_error_bound=bound,
        eps=eps,
        compute_dtype="float64",
    )


def _gamma(m: int, u: float) -> float:
    """γ_m = m·u/(1 − m·u): the classic bound on m accumulated roundings (inf when m·u ≥ 1)."""
    return m * u / (1.0 - m * u) if m * u < 1.0 else math.inf


FAR_MARGIN = 40.0  # keys whose mask puts them e^{-40}/n_k below a row's best are charged as a mass, not per weight


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
    mask_span: float = 0.0,
    scale: float = 0.0,
    eps: float | None = None,
) -> Certificate:
    """The rounding-error bound of exact attention computed in ``compute_dtype``.

    With u the unit roundoff and L bounding |logit| (s·‖q‖‖k‖, or s·(‖q‖+‖k‖)² for ℓ2) over the keys
    that take part: an additive mask is first shifted by its row maximum (b' ≤ 0, one key of each row
    at 0). Keys with |b'| ≤ T take part "near" the row maximum: their logit and the subtracted maximum
    carry at most γ_{d+3}·(2L + T), exp adds 2u and each of the ``blocks`` online-softmax rescales 3u,
    so every such weight has relative error η ≤ exp(2γ_{d+3}·(2L + T) + 2u + 3u·blocks) − 1 and the
    output moves by at most η/(1−η)·range. T is the mask's span, capped at T* = 2(2L + 1 + ln n_k + 40):
    keys beyond T* have true and computed weight below e^{2L+1−T*/2} = e^{−40}/n_k of the row's best
    (whose weight is exactly 1), and move the output by at most 4e^{−40}·max|v| together. Summing m
    terms in numerator and denominator and dividing add (2γ_m/(1−γ_m) + 2u)·max|v|, with m = n_k for
    one dense sum and m = block + blocks when ``block``-long partial sums are accumulated blockwise;
    weights that fall into the subnormal range add n_k·tiny·2·max|v|; the cast to the output dtype adds
    u_out·max|v| + u_out·tiny_out. Products q_c·k_c (and k_c² for ℓ2) that fall into the subnormal range
    carry an absolute error up to tiny·u each, not a relative one: the logit then moves by up to
    s·(d + 2)·tiny·u more, charged to every weight (``scale`` = s). A worst case: measured errors sit
    orders of magnitude below it.
    """
    u = unit_roundoff(compute_dtype)
    g3 = _gamma(d + 3, u)
    cut = 2.0 * (2.0 * logit_bound + 1.0 + math.log(n_k) + FAR_MARGIN)
    far = 0.0
    span = mask_span
    if span > cut:
        if g3 > 0.1:
            span, far = math.inf, math.inf
        else:
            span, far = cut, 4.0 * math.exp(-FAR_MARGIN) * max_abs_value
    lam = 2.0 * g3 * (2.0 * logit_bound + span) + 2.0 * u + 3.0 * u * blocks \
        + 4.0 * scale * (d + 2) * underflow_unit(compute_dtype)
    eta = math.expm1(lam) if lam < 700.0 else math.inf
    approx = output_bound(eta, value_range)
    g = _gamma(min(block, n_k) + blocks if block else n_k, u)
    sums = (2.0 * g / (1.0 - g) + 2.0 * u) if g < 1.0 else math.inf
    cast = unit_roundoff(out_dtype) if out_dtype != compute_dtype else 0.0
    subnormal = 2.0 * n_k * float(torch.finfo(compute_dtype).tiny) * max_abs_value
    # each product p_j·v_j, each rescale of a running output and the division may land in the subnormal
    # range, where the error is absolute (≤ one subnormal step each), not relative
    rounding = approx + far + (sums + cast) * max_abs_value + subnormal + underflow_unit(out_dtype) \
        + (n_k + blocks + 2) * underflow_unit(compute_dtype)
    rounding = _finite_or_inf(rounding)
    return Certificate(method="exact", kind=kind, eta=eta, value_range=value_range, max_abs_value=max_abs_value,
                       approximation_bound=0.0, rounding_bound=rounding, output_error_bound=rounding, eps=eps,
                       compute_dtype=str(compute_dtype).replace("torch.", ""),
                       engine="dense" if block is None else "blockwise")
