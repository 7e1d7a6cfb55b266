"""Gradients with a certificate (Alman–Song, NeurIPS 2024: the backward pass of attention has the forward's
threshold; docs/theory.md §7).

**Backward of exact attention.** O = P V, P = softmax(X), X_ij the logit (s⟨q_i, k_j⟩, or −s‖q_i − k_j‖² for
ℓ2, plus an additive mask), upstream G = ∂ℓ/∂O; with g_ij = G_i·(v_j − O_i):

    dV_j = Σ_i P_ij G_i          dX_ij = P_ij g_ij          dQ_i = Σ_j dX_ij ∂X_ij/∂q_i     dK_j = Σ_i dX_ij ∂X_ij/∂k_j

**What a call's backward computes.** Every method's backward is the derivative of what its forward computed:
weights w̃_ij (exp with rounding, or a polynomial f(y_ij) ≈ e^{y_ij} on centred inputs times an exact per-key
weight) normalised over the keys a row sees. So the computed dX̃_ij = P^b_ij·g̃_ij with g̃_ij = G_i·(v_j − õ_i)
and P^b_ij = f'(y_ij)·e^{b_j}/D̃_i for polynomial pairs (P̃_ij itself for pairs computed with exp), and
dṼ_j = Σ_i P̃_ij G_i. With η the forward's relative weight error (|P̃_ij/P_ij − 1| ≤ η_v = 2η/(1−η)) and
η₁ ≥ max_{|x|≤R} |f'(x)e^{−x} − 1| (:func:`derivative_eta`), |P^b_ij/P_ij − 1| ≤ η_b = (η₁ + η)/(1 − η).

**The bound** (E the forward certificate, range_c the value range, V_c = max|v_c| + E, γ_m = mu/(1 − mu) in
the backward's unit roundoff u; all proved in docs/theory.md §7):

    b_i = Σ_c |G_ic|·(range_c + E + 2γ_{d_v+2}·V_c)                 ≥ |g̃_ij| and |g_ij|
    a_i = η'·b_i + ‖G_i‖₁·E + 2γ_{d_v+2}·Σ_c |G_ic|·V_c            (η' = max(η_b, η_v))   ⇒ |dX̃_ij − dX_ij| ≤ P_ij·a_i
    |dQ̂_ic − dQ_ic| ≤ κ^Q_ic·(a_i + γ_{n_k+3}·(1 + η')·b_i)
    |dK̂_jc − dK_jc| ≤ κ^K_jc·Σ_i P_ij·(a_i + γ_{n_q+3}·(1 + η')·b_i)
    |dV̂_jc − dV_jc| ≤ (η_v + γ_{n_q+3}·(1 + η_v))·Σ_i P_ij·|G_ic|

plus the cast of the gradient to the input dtype (relative, and one subnormal step per entry), a tiny per weight
that underflows, and one subnormal step per summed term. κ bounds the coordinate factor the backward multiplies
by, from the exact relation Σ_j dX_ij = 0 (which lets the exact gradient use k_j − c for any centre c):
κ^Q_ijc = s_e·(|k_jc| + |c_kc| + [ℓ2]·|q_ic|), κ^K_ijc = s_e·(|q_ic| + 2|c_qc| + [ℓ2]·|k_jc|), s_e = s (2s for ℓ2),
c the centres of a centred call (else 0); the bounds sum P_ij·κ over the keys (rows) with the exact weights.
For d_v ≤ 16 the η'-terms are also bounded by Cauchy–Schwarz through g'_ij = G_i·v_j − G_i·õ_i (docs/theory.md
§7), and the smaller bound is kept per entry; there the forward's error enters dQ_i through the signed key mean
|Σ_j P_ij k_j| (one factor δ_i = G_i·(õ_i − o_i) per row), and for softmax without heavy tokens each pair is charged
η₁ of its own argument range |u_ij| ≤ s‖q_i − c_q‖‖k_j − c_k‖/R (keys and queries in norm buckets,
:func:`derivative_eta_profile`). Nothing is certified where a gradient could overflow its dtype.

The row and column sums Σ_j P_ij·(…), Σ_i P_ij·(…) use the exact weights: a float64 pass in key chunks from the
logits (O(n_q·n_k·(d + d_v²)) work, a bound on its own rounding included), or, for the feature methods when
cheaper, the call's own approximation in O(n·r·(d + d_v²)). They are computed when the certificate is first
read (or in the backward, when ``grad_eps`` asks for a check there).
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import asdict, dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np
import torch
from scipy import special

from .certificate import U64, _gamma, underflow_unit, unit_roundoff
from .centring import centred_norms
from .stats import row_norms, shift_mask
from .validation import compute_dtype

DENSE_KEY_CHUNK = 1024
CS_MAX_DV = 16  # the Cauchy–Schwarz refinement sums d_v² more columns: only for narrow heads


# ---------------------------------------------------------------------------------------------------------------
# η₁: the relative error of the derivative of a polynomial approximation of exp


def _monomial_to_chebyshev(a) -> list[Fraction]:
    """Exact Chebyshev coefficients of Σ_j a_j u^j (a_j float64, converted exactly):
    u^j = 2^{1−j} Σ_{i<j/2} C(j, i) T_{j−2i} + [j even]·2^{−j} C(j, j/2) T_0."""
    g = len(a) - 1
    b = [Fraction(0)] * (g + 1)
    for j, aj in enumerate(a):
        fa = aj if isinstance(aj, Fraction) else Fraction(float(aj))
        if fa == 0:
            continue
        if j == 0:
            b[0] += fa
            continue
        for i in range(0, j // 2 + 1):
            t = j - 2 * i
            c = Fraction(math.comb(j, i), 2 ** (j - 1))
            b[t] += fa * (c / 2 if t == 0 else c)
    return b


@lru_cache(maxsize=4096)
def polynomial_derivative_eta(coeffs: tuple[float, ...], radius: float) -> float:
    """A rigorous η₁ ≥ max_{|x|≤R} |f'(x)·e^{−x} − 1| for f(x) = Σ_j a_j (x/R)^j (``coeffs`` = a).

    With u = x/R, f'(x) = P'(u)/R and e^x = e^{Ru} = Σ_k c_k T_k(u) (c_0 = I_0(R), c_k = 2I_k(R)). For K ≥ g,
    P(u) − Σ_{k≤K} c_k T_k(u) = Σ_{k≤K} (b_k − c_k) T_k(u) (b: P's exact Chebyshev coefficients, 0 above g),
    and |T_k'(u)| ≤ k² on [−1, 1], so

        |P'(u) − R e^{Ru}| ≤ Σ_{k≤K} k²·|b_k − c_k| + Σ_{k>K} k²·c_k,

    the tail closed geometrically ((k+1)²I_{k+1}(R) ≤ ρ·k²I_k(R) with ρ = R(k+1)/(2k²)… taken at K = g + 64 + ⌈R⌉).
    Dividing by R·e^x ≥ R·e^{−R} gives η₁. scipy's Bessel values carry a 1e-14 relative allowance.
    """
    if not (math.isfinite(radius) and radius > 0.0):
        return math.inf
    if radius > 700.0:
        return math.inf
    g = len(coeffs) - 1
    k_stop = g + 64 + int(math.ceil(radius))
    ks = np.arange(k_stop + 1)
    c = special.iv(ks, radius)
    c[1:] *= 2.0
    if not np.all(np.isfinite(c)):
        return math.inf
    b = [float(x) for x in _monomial_to_chebyshev(coeffs)]  # exact, then rounded: 2^-53 relative each
    head = 0.0
    for k in range(1, k_stop + 1):
        bk = b[k] if k <= g else 0.0
        ck = float(c[k])
        # |b_k − c_k| from the rounded values, their rounding (b: 2^-53, the subtraction: 2^-53) and the Bessel allowance
        head += k * k * (abs(bk - ck) + 2.0 ** -51 * (abs(bk) + abs(ck)) + 1e-14 * abs(ck))
    k = k_stop
    rho = radius * (k + 1) ** 2 / (2.0 * (k + 1) * k * k)
    tail = float(c[-1]) * k * k * rho / (1.0 - rho) if rho < 1.0 else math.inf
    total = (head + tail) * (1.0 + 1e-12)
    log_eta = math.log(total) + radius - math.log(radius) if total > 0 else -math.inf
    return math.exp(log_eta) if log_eta < 700.0 else math.inf


PIECES = 16


def _chebyshev_exp(rho: float, k_stop: int) -> np.ndarray:
    c = special.iv(np.arange(k_stop + 1), rho)
    c[1:] *= 2.0
    return c


def piecewise_derivative_eta(coeffs: tuple[float, ...], radius: float, pieces: int = PIECES) -> float:
    """The largest of :func:`piecewise_derivative_etas`: η₁ on all of u ∈ [−1, 1]."""
    return max(piecewise_derivative_etas(coeffs, radius, pieces))


@lru_cache(maxsize=4096)
def piecewise_derivative_etas(coeffs: tuple[float, ...], radius: float, pieces: int = PIECES) -> tuple[float, ...]:
    """η₁ on ``pieces`` subintervals of u ∈ [−1, 1], each measured against its own smallest e^x (the relative form
    the minimax fits are made for): on [u_m − h, u_m + h] with u = u_m + h·t, P(u_m + h t) has exact Chebyshev
    coefficients b_k in t and e^{Ru} = e^{Ru_m}·Σ_k c_k(Rh) T_k(t), so

        |P'(u) − R e^{Ru}| ≤ e^{Ru_m}/h·(Σ_{k≤K} k²·|b_k e^{−Ru_m} − c_k(Rh)| + Σ_{k>K} k² c_k(Rh)),

    and dividing by R·e^{Ru} ≥ R·e^{R(u_m − h)} gives that piece's η₁ (piece m: u ∈ [−1 + 2mh, −1 + 2(m + 1)h]);
    the rounding of b_k·e^{−Ru_m} (2^-50 relative) and scipy's Bessel values (1e-14) are added."""
    if not (math.isfinite(radius) and 0.0 < radius <= 700.0):
        return (math.inf,) * pieces
    g = len(coeffs) - 1
    a = [Fraction(float(x)) for x in coeffs]
    h = Fraction(1, pieces)
    K = g + 30
    rho = radius / pieces
    c = _chebyshev_exp(rho, K + 1)
    if not np.all(np.isfinite(c)):
        return (math.inf,) * pieces
    k = K + 1
    ratio = rho * (k + 1) / (2.0 * k * k)
    tail = float(c[K + 1]) * k * k / (1.0 - ratio) if ratio < 1.0 else math.inf
    etas = []
    for m in range(pieces):
        um = Fraction(-1) + (2 * m + 1) * h
        local = [Fraction(0)] * (g + 1)  # P(u_m + h t) = Σ_l t^l Σ_{j≥l} a_j C(j, l) u_m^{j−l} h^l
        for j, aj in enumerate(a):
            if aj == 0:
                continue
            for l in range(j + 1):
                local[l] += aj * math.comb(j, l) * um ** (j - l) * h ** l
        b = [float(x) for x in _monomial_to_chebyshev(local)]
        scale = math.exp(-radius * float(um))
        total = 0.0
        for kk in range(1, K + 1):
            bk = b[kk] * scale if kk <= g else 0.0
            ck = float(c[kk])
            total += kk * kk * (abs(bk - ck) + 2.0 ** -50 * (abs(bk) + abs(ck)) + 1e-14 * abs(ck))
        total = (total + tail) * (1.0 + 1e-12)
        etas.append(total * math.exp(radius / pieces) * pieces / radius)
    return tuple(etas)


def derivative_eta(method: str, radius: float, degree: int) -> float:
    """η₁ of a family's degree-``degree`` polynomial at radius R (inf where nothing can be certified)."""
    from .families import family

    fam = family(method)
    if not (math.isfinite(radius) and 0.0 < radius <= 700.0):
        return math.inf
    coeffs = fam.coefficients(radius, degree)
    if not np.all(np.isfinite(coeffs)):
        return math.inf
    key = tuple(float(a) for a in coeffs)
    return min(polynomial_derivative_eta(key, float(radius)), piecewise_derivative_eta(key, float(radius)))


def derivative_eta_profile(method: str, radius: float, degree: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """η₁ of the pairs whose argument lies in |u| ≤ ρ, as a step function of ρ: (d, e) with d ascending, the
    distances from 0 of the :func:`piecewise_derivative_etas` pieces, and e[m] = min(η₁, the largest piece value
    among the pieces at distance ≤ d[m]): for ρ ≥ d[m], the pieces meeting [−ρ, ρ] are those with d ≤ ρ."""
    from .families import family

    eta1 = derivative_eta(method, radius, degree)
    if not math.isfinite(eta1):  # nothing certified (derivative_eta's guards): one step, the whole range
        return (0.0,), (eta1,)
    coeffs = family(method).coefficients(radius, degree)
    etas = piecewise_derivative_etas(tuple(float(a) for a in coeffs), float(radius))
    h = 2.0 / PIECES
    dist = [0.0 if lo <= 0.0 <= lo + h else min(abs(lo), abs(lo + h)) for lo in (-1.0 + m * h for m in range(PIECES))]
    order = sorted(range(PIECES), key=lambda m: dist[m])
    out, top = [], 0.0
    for m in order:
        top = max(top, etas[m])
        out.append(min(eta1, top))
    return tuple(dist[m] for m in order), tuple(out)


def _eta1_within(profile, rho: torch.Tensor) -> torch.Tensor:
    """η₁ of pairs with |u| ≤ rho (elementwise), from :func:`derivative_eta_profile`; the whole range's beyond 1."""
    dist, etas = (torch.tensor(x, dtype=torch.float64) for x in profile)
    idx = torch.searchsorted(dist, rho.contiguous(), right=True) - 1  # pieces at distance ≤ ρ (at least the centre)
    return torch.where(rho >= 1.0, etas[-1], etas[idx.clamp(0, len(etas) - 1)])


# ---------------------------------------------------------------------------------------------------------------
# the certificate


@dataclass(frozen=True)
class GradientCertificate:
    """What attnbound guarantees about the gradients one backward pass returned for one attention call.

    ``dq_bound`` bounds max |dQ − dQ_exact| over the entries of q's gradient (likewise dk, dv), where
    dQ_exact is the gradient of exact attention of the inputs as given, for the same upstream gradient.
    """

    method: str
    eta_forward: float  # the forward's relative weight error η
    eta_derivative: float  # η₁ of the polynomial's derivative (0 for exact methods)
    eta_backward: float  # η' = max(η_b, η_v): the relative error of the backward's weights
    forward_bound: float  # E
    dq_bound: float
    dk_bound: float
    dv_bound: float
    compute_dtype: str
    grad_eps: float | None = None

    @property
    def bound(self) -> float:
        """The largest of the three bounds."""
        return max(self.dq_bound, self.dk_bound, self.dv_bound)

    @property
    def certified(self) -> bool:
        b = self.bound
        return math.isfinite(b) and (self.grad_eps is None or b <= self.grad_eps)

    def as_dict(self) -> dict:
        return asdict(self) | {"bound": self.bound}

    def __str__(self) -> str:
        return (f"GradientCertificate({self.method}, η'={self.eta_backward:.3g}: ‖dQ−exact‖∞ ≤ {self.dq_bound:.3g}, "
                f"‖dK−exact‖∞ ≤ {self.dk_bound:.3g}, ‖dV−exact‖∞ ≤ {self.dv_bound:.3g})")


@dataclass(frozen=True)
class GradientSpec:
    """Everything the bound needs of one call besides the tensors (fixed at the forward)."""

    method: str
    kind: str
    scale: float
    is_causal: bool
    eta: float  # forward relative weight error
    eta1: float | None  # the derivative's η₁ (0 when the backward differentiates exp itself; None: from ``poly``)
    eta_fp: float  # relative rounding of the backward's weights beyond η (polynomial evaluation)
    forward_bound: float
    compute_dtype: torch.dtype
    grad_eps: float | None = None
    poly: tuple | None = None  # (method, radius, degree) whose η₁ is computed when the bound is first read
    # every pair's polynomial argument is y_ij = s⟨q_i − c_q, k_j − c_k⟩ (c = 0 uncentred) with |y| ≤ R = poly[1]
    # (softmax without heavy tokens), so |u_ij| = |y_ij|/R ≤ s‖q_i − c_q‖‖k_j − c_k‖/R: each pair can be charged η₁
    # of that range alone
    per_pair: bool = False
    eta1_profile: tuple | None = None  # :func:`derivative_eta_profile`, filled by resolved() when ``per_pair``

    def resolved(self) -> GradientSpec:
        """This spec with η₁ (and, per_pair, its profile) computed (scalar work: the exact Chebyshev comparisons of
        :func:`derivative_eta`)."""
        if self.eta1 is not None and (not self.per_pair or self.eta1_profile is not None):
            return self
        eta1 = derivative_eta(*self.poly) if self.eta1 is None else self.eta1
        profile = derivative_eta_profile(*self.poly) if self.per_pair and self.poly is not None else None
        return dataclasses.replace(self, eta1=eta1, eta1_profile=profile)


def backward_etas(spec: GradientSpec) -> tuple[float, float]:
    """(η_v, η') from the forward's η and the derivative's η₁ (inf when η ≥ 1)."""
    eta = spec.eta + spec.eta_fp
    if not (0.0 <= eta < 1.0) or not math.isfinite(spec.eta1):
        return math.inf, math.inf
    eta_v = 2.0 * eta / (1.0 - eta)
    eta_b = (spec.eta1 + eta) / (1.0 - eta)
    return eta_v, max(eta_v, eta_b)


def _dense_weights(q64, k64, mask, *, scale: float, kind: str, is_causal: bool, j0: int, j1: int, lse):
    """P[:, j0:j1] in float64 from the logits (lse: each row's log-sum-exp over the keys it sees)."""
    x = scale * (q64 @ k64[..., j0:j1, :].transpose(-1, -2))
    if kind == "l2":
        x = 2.0 * x - scale * (q64 * q64).sum(-1, keepdim=True) - scale * (k64[..., j0:j1, :] ** 2).sum(-1).unsqueeze(-2)
    if mask is not None:
        part = mask[..., j0:j1]
        x = x.masked_fill(~part, -math.inf) if part.dtype == torch.bool else x + part
    if is_causal:
        n_q = q64.shape[-2]
        i = torch.arange(n_q, device=x.device).unsqueeze(-1)
        j = torch.arange(j0, j1, device=x.device).unsqueeze(0)
        x = x.masked_fill(j > i, -math.inf)
    if lse is None:
        return x
    return torch.exp(x - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))


def weighted_sums(q, k, a, b, *, mask, scale: float, kind: str, is_causal: bool):
    """(Pᵀa of shape (..., n_k, m), P·b of shape (..., n_q, m'), their relative rounding bound) for a, b ≥ 0, with P
    the exact weights computed in float64, key chunk by key chunk: each row's log-sum-exp, then exp(X − lse).

    The logits are off by at most γ_{2d+6}·(|s|·d·max|q|·max|k| (ℓ2: + the squared norms)) = λ/2 and the
    log-sum-exp by λ/2 + 2γ_{n_k+4}, so each weight has relative error ≤ e^{λ + 2γ} − 1, and the sums of nonnegative
    terms add γ_{n+2}: the returned factor covers all of it.
    """
    q64, k64 = q.detach().double(), k.detach().double()
    n_q, n_k, d = q64.shape[-2], k64.shape[-2], q64.shape[-1]
    rows = max(1, math.prod(q64.shape[:-1]))
    chunk = int(max(16, min(DENSE_KEY_CHUNK, (16 << 20) // rows)))
    if mask is not None:
        if mask.dtype != torch.bool:  # shifted by its row maximum in float64, as the engines do: x + finfo.min
            mask = shift_mask(mask, torch.float64)  # would otherwise lose x
        mask = mask.expand(*mask.shape[:-2], n_q, n_k) if mask.dim() >= 2 else mask.expand(n_q, n_k)
    lse = None
    for j0 in range(0, n_k, chunk):
        x = _dense_weights(q64, k64, mask, scale=scale, kind=kind, is_causal=is_causal, j0=j0,
                           j1=min(n_k, j0 + chunk), lse=None)
        part = torch.logsumexp(x, -1, keepdim=True)
        lse = part if lse is None else torch.logaddexp(lse, part)
    cols, row = [], None
    for j0 in range(0, n_k, chunk):
        j1 = min(n_k, j0 + chunk)
        p = _dense_weights(q64, k64, mask, scale=scale, kind=kind, is_causal=is_causal, j0=j0, j1=j1, lse=lse)
        cols.append(p.transpose(-1, -2) @ a)
        part = p @ b[..., j0:j1, :]
        row = part if row is None else row + part
    sums = torch.cat(cols, -2) if len(cols) > 1 else cols[0]
    qn = float(q64.abs().amax()) if q64.numel() else 0.0
    kn = float(k64.abs().amax()) if k64.numel() else 0.0
    size = abs(scale) * d * qn * kn * (3.0 if kind == "l2" else 1.0) + (abs(scale) * d * (qn + kn) ** 2 if kind == "l2" else 0.0)
    lam = 2.0 * _gamma(2 * d + 6, U64) * size + 2.0 * _gamma(n_k + 4, U64) + 8.0 * U64
    rel = math.expm1(lam) + _gamma(max(n_q, n_k) + 2, U64) if lam < 1.0 else math.inf
    return sums, row, rel


NORM_QUANTILES = (0.5, 0.8, 0.95)  # the norm buckets of the per-pair refinement: these quantiles, then the largest


def _norm_edges(norms: torch.Tensor) -> torch.Tensor:
    """Ascending bucket edges for row norms: the :data:`NORM_QUANTILES` and the largest (only the largest, one
    bucket, below 64 rows; the quantiles of a sample of 2^20 rows above that many)."""
    flat = norms.reshape(-1).double()
    if flat.numel() == 0:
        return torch.zeros(1, dtype=torch.float64)
    top = flat.max().reshape(1)
    if flat.numel() < 64:
        return top
    if flat.numel() > 1 << 20:  # torch.quantile takes at most 2^24 elements; a sample sets the edges as well
        flat = flat[torch.randint(flat.numel(), (1 << 20,), generator=torch.Generator().manual_seed(0))]
    qs = torch.quantile(flat, torch.tensor(NORM_QUANTILES, dtype=torch.float64))
    return torch.cat([torch.minimum(qs, top), top])


def _bucket_indicators(norms: torch.Tensor, edges: torch.Tensor) -> list[torch.Tensor]:
    """One (…, n, 1) float64 0/1 indicator per bucket: edge[m − 1] < ‖x‖ ≤ edge[m] (the first from 0, the last
    every norm above the one before it, so each row is in exactly one bucket whose edge bounds its norm; a NaN norm
    is in none, and its call's forward bound is already inf)."""
    out, lo = [], None
    for m in range(edges.numel()):
        last = m == edges.numel() - 1
        inside = torch.ones_like(norms, dtype=torch.bool) if last else norms <= edges[m]
        if lo is not None:
            inside = inside & (norms > lo)
        out.append(inside.unsqueeze(-1).double())
        lo = edges[m]
    return out


def gradient_bounds(q, k, v, grad_out, *, spec: GradientSpec, mask=None, c_q=None, c_k=None,
                    sums=None, out=None) -> GradientCertificate:
    """The certificate of one backward (see the module docstring): q, k, v, the upstream ``grad_out``,
    ``mask`` an additive float mask broadcastable to (..., n_q, n_k) or None, c_q / c_k the centres or None.
    ``sums(q, k, a, b) -> (Σ̃ Pᵀa, Σ̃ P·b, up, ρ)`` replaces the dense float64 pass (the feature methods pass
    :func:`_feature_sums`, O(n·r)): computed sums such that a true sum of nonnegative terms is ≤ up·(computed),
    and a computed signed sum is within ρ·(the sum of its terms' absolute values) of the real one. ``out``, the
    forward's output, enables the Cauchy–Schwarz refinement of dQ and dK (for d_v ≤ ``CS_MAX_DV``)."""
    spec = spec.resolved()
    with torch.no_grad():
        G = grad_out.detach().double()
        q64, k64, v64 = q.detach().double(), k.detach().double(), v.detach().double()
        batch = torch.broadcast_shapes(q64.shape[:-2], k64.shape[:-2], v64.shape[:-2], G.shape[:-2],
                                       mask.shape[:-2] if mask is not None and mask.dim() >= 2 else ())
        qe = q64.expand(*batch, *q64.shape[-2:])
        ke = k64.expand(*batch, *k64.shape[-2:])
        ve = v64.expand(*batch, *v64.shape[-2:])
        Ge = G.expand(*batch, *G.shape[-2:])
        n_q, n_k, d_v = qe.shape[-2], ke.shape[-2], ve.shape[-1]
        u = unit_roundoff(spec.compute_dtype)
        u_out = unit_roundoff(q.dtype) if q.dtype != spec.compute_dtype else 0.0
        eta_v, eta_p = backward_etas(spec)
        E = spec.forward_bound
        if not (math.isfinite(eta_p) and math.isfinite(E)) or G.numel() == 0 or not bool(torch.isfinite(G).all()):
            inf = math.inf if G.numel() else 0.0
            return GradientCertificate(spec.method, spec.eta, spec.eta1, eta_p, E, inf, inf, inf,
                                       str(spec.compute_dtype).replace("torch.", ""), spec.grad_eps)
        rng = (ve.amax(-2, keepdim=True) - ve.amin(-2, keepdim=True))  # (..., 1, d_v)
        # E bounds the returned output õ; the backward computes with its own õ' before the cast into the input dtype,
        # |õ' − õ| ≤ u_out·|õ'| ≤ u_out/(1 − u_out)·(max|v| + E) = o_err, so g̃ is within E + o_err of the exact
        o_err = (u_out / (1.0 - u_out) * (float(ve.abs().amax()) + E) + underflow_unit(q.dtype)  # and subnormals
                 if u_out and ve.numel() else 0.0)
        E_b = E + o_err
        vmax = ve.abs().amax(-2, keepdim=True) + E_b
        g_dv = _gamma(d_v + 2, u)
        Ga = Ge.abs()
        # the feature backward never forms g̃: it sums f·(G·v_j) and f·(G·õ_i) apart, whose float64 rounding is
        # relative (η_fp, the polynomial's) to their magnitudes: 2η_fp·Σ_c|G_ic|V_c more per pair
        r_dot = 2.0 * g_dv + 2.0 * spec.eta_fp
        b = (Ga * (rng + E_b + r_dot * vmax)).sum(-1, keepdim=True)  # (..., n_q, 1) ≥ |g̃_ij|, |g_ij|
        a = eta_p * b + Ga.sum(-1, keepdim=True) * E_b + r_dot * (Ga * vmax).sum(-1, keepdim=True)
        g_k, g_q = _gamma(n_k + 3, u), _gamma(n_q + 3, u)
        a_q = a + g_k * (1.0 + eta_p) * b  # what multiplies P_ij|∂X/∂q| in dQ's error
        a_k = a + g_q * (1.0 + eta_p) * b
        s_e = abs(spec.scale) * (2.0 if spec.kind == "l2" else 1.0)
        cq = (c_q.double().expand_as(qe[..., :1, :]) if c_q is not None else torch.zeros_like(qe[..., :1, :])).abs()
        ck = (c_k.double().expand_as(ke[..., :1, :]) if c_k is not None else torch.zeros_like(ke[..., :1, :])).abs()
        qa, ka = qe.abs(), ke.abs()
        d = qe.shape[-1]
        # Cauchy–Schwarz refinement (small d_v): Σ_j P_ij|g_ij|κ_ij ≤ √(Σ_j P_ij g_ij²)·√(Σ_j P_ij κ_ij²), and
        # Σ_j P_ij g_ij² ≤ Σ_j P_ij (G_i·v_j − c_i)² for any c_i (g's weighted mean square is the smallest)
        cs = d_v <= CS_MAX_DV and out is not None
        gl1 = Ga.sum(-1, keepdim=True)
        # with g'_ij = G_i·v_j − c_i, c_i = G_i·õ_i (the returned õ): |g̃_ij − g'_ij| ≤ r_i + ‖G_i‖₁·o_err and
        # |g_ij − g'_ij| ≤ ‖G_i‖₁E, so |dX̃_ij − dX_ij| ≤ P_ij(η'|g'_ij| + (1 + η')e_i), e_i = a_i − η'b_i ≥ both
        # (r_i the two dot products' rounding)
        a_rest = (1.0 + eta_p) * (a - eta_p * b)
        parts_c = [a_k * qa, a_k, (1.0 + eta_p) * b * qa, (1.0 + eta_p) * b, Ga]
        parts_r = [ka]
        if cs:
            c = (Ge * out.detach().double().expand(*batch, n_q, d_v)).sum(-1, keepdim=True)  # c_i = G_i·õ_i
            gg = (Ge.unsqueeze(-1) * Ge.unsqueeze(-2)).flatten(-2)
            m2 = ((Ga * ve.abs().amax(-2, keepdim=True)).sum(-1, keepdim=True) + c.abs()) ** 2
            ar_k = a_rest + g_q * (1.0 + eta_p) * b
            parts_c += [ar_k * qa, ar_k, gg, c * Ge, c * c, qe * qe, qa, torch.ones_like(c), m2]
            parts_r += [(ve.unsqueeze(-1) * ve.unsqueeze(-2)).flatten(-2), ve, ke * ke, ke]
        # softmax without heavy tokens: each pair's argument has |u_ij| ≤ s‖q_i − c_q‖‖k_j − c_k‖/R, so keys (queries)
        # in norm buckets are charged η₁ of the range their bucket's largest norm allows (derivative_eta_profile)
        prof = spec.eta1_profile if cs and spec.per_pair and spec.kind == "softmax" else None
        if prof is not None and not all(math.isfinite(x) for x in prof[1]):  # nothing certified there: no refinement
            prof = None
        if prof is not None:
            # upper bounds on the norms of the rows the engine computes with (the ones its radius R is made of)
            q_in, k_in = (x.detach().expand(*batch, *x.shape[-2:]) for x in (q, k))
            nq = centred_norms(q_in, c_q.double()) if c_q is not None else row_norms(q_in)
            nk = centred_norms(k_in, c_k.double()) if c_k is not None else row_norms(k_in)
            edges_q, edges_k = _norm_edges(nq), _norm_edges(nk)
            centred = c_q is not None or c_k is not None  # uncentred, κ's extra terms are 0: the squares alone
            for x, xa, norms, edges, parts in ((ke, ka, nk, edges_k, parts_r), (qe, qa, nq, edges_q, parts_c)):
                for ind in _bucket_indicators(norms, edges):
                    parts += [x * x * ind, xa * ind, ind] if centred else [x * x * ind]
        cols, rows = torch.cat(parts_c, -1), torch.cat(parts_r, -1)
        m = mask
        if sums is None:
            csum, rsum, rel = weighted_sums(qe, ke, cols, rows, mask=m, scale=spec.scale, kind=spec.kind,
                                            is_causal=spec.is_causal)
            up, rho = 1.0 + rel, rel
        else:
            csum, rsum, up, rho = sums(qe, ke, cols, rows)
        pos_c, pos_r = csum.clamp_min(0.0) * up, rsum.clamp_min(0.0) * up  # upper bounds of sums of terms ≥ 0
        s_ak_q, s_ak = pos_c[..., :d], pos_c[..., d:d + 1]
        s_b_q, s_b = pos_c[..., d + 1:2 * d + 1], pos_c[..., 2 * d + 1:2 * d + 2]
        colG = pos_c[..., 2 * d + 2:2 * d + 2 + d_v]
        # κ: |∂X_ij/∂q_ic| ≤ s_e(|k_jc| + e^Q_ic), e^Q = |c_kc| [+ |q_ic| ℓ2]; |∂X_ij/∂k_jc| ≤ s_e(|q_ic| + e^K_jc),
        # e^K = 2|c_qc| [+ |k_jc| ℓ2]
        eq_ = ck + (qa if spec.kind == "l2" else 0.0)
        kk_extra = 2.0 * cq + (ka if spec.kind == "l2" else 0.0)
        kq = pos_r[..., :d] + eq_  # Σ_j P_ij κ^Q_ijc / s_e (rows that see no key: 0 ≤ it)
        tiny = underflow_unit(spec.compute_dtype) * (n_k + n_q + 8)
        dq = s_e * a_q * kq
        dk = s_e * (s_ak_q + kk_extra * s_ak)
        if cs:
            o = 2 * d + 2 + d_v
            s_ar_q, s_ar = pos_c[..., o:o + d], pos_c[..., o + d:o + d + 1]
            o += d + 1
            A, B = csum[..., o:o + d_v * d_v], csum[..., o + d_v * d_v:o + d_v * d_v + d_v]
            o += d_v * d_v + d_v
            Cc, q2, qa_s, one_s, m2_s = (csum[..., o:o + 1], pos_c[..., o + 1:o + 1 + d],
                                         pos_c[..., o + 1 + d:o + 1 + 2 * d], pos_c[..., o + 1 + 2 * d:o + 2 + 2 * d],
                                         pos_c[..., o + 2 + 2 * d:o + 3 + 2 * d])
            def bucket_weights(pos, o2, norms, edges, extra):
                """Σ_m η'(ρ_m)²·(the bucket's Σ P x² + 2·extra·Σ P|x| + extra²·Σ P), the sums read from ``pos``
                at ``o2`` on (as appended above), ρ_m = s·‖row‖·(bucket m's largest norm)/R."""
                eta = spec.eta + spec.eta_fp
                reach = (abs(spec.scale) / float(spec.poly[1]) * (1.0 + 1e-9)) * norms.unsqueeze(-1) * edges
                etas = torch.clamp_min((_eta1_within(prof, reach) + eta) / (1.0 - eta), eta_v)  # (..., n, M)
                w2 = 0.0
                for m in range(edges.numel()):
                    part = pos[..., o2:o2 + d]
                    if centred:
                        part = (part + 2.0 * extra * pos[..., o2 + d:o2 + 2 * d]
                                + extra * extra * pos[..., o2 + 2 * d:o2 + 2 * d + 1])
                    w2 = w2 + etas[..., m:m + 1] ** 2 * part
                    o2 += 2 * d + 1 if centred else d
                return w2

            W, ov, k2 = (rsum[..., d:d + d_v * d_v], rsum[..., d + d_v * d_v:d + d_v * d_v + d_v],
                         pos_r[..., d + d_v * d_v + d_v:2 * d + d_v * d_v + d_v])
            k_mean = rsum[..., 2 * d + d_v * d_v + d_v:3 * d + d_v * d_v + d_v]  # Σ_j P̃_ij k_jc, signed
            # rows: Σ_j P̃_ij (G_i·v_j − c_i)² = G_iᵀW_iG_i − 2c_i G_i·o_i + c_i²·Σ_j P̃_ij (≤ c_i²), each term's
            # rounding below ρ·2M_i²; the true weights' sum is ≤ up times it (terms ≥ 0)
            GWG = (W.unflatten(-1, (d_v, d_v)) * (Ge.unsqueeze(-1) * Ge.unsqueeze(-2))).sum((-1, -2)).unsqueeze(-1)
            s2r = (GWG - 2.0 * c * (Ge * ov).sum(-1, keepdim=True) + c * c + 2.0 * rho * m2).clamp_min(0.0) * up
            kap2 = k2 + 2.0 * eq_ * pos_r[..., :d] + eq_ * eq_  # Σ_j P_ij (κ^Q_ijc / s_e)²
            sq_cs = eta_p * torch.sqrt(s2r * kap2)
            if prof is not None:  # Σ_j P_ij η'_ij² κ_ij² over the key buckets, η'_ij ≤ η' of the bucket's range
                w2 = bucket_weights(pos_r, 3 * d + d_v * d_v + d_v, nq, edges_k, eq_)
                sq_cs = torch.minimum(sq_cs, torch.sqrt(s2r * w2))
            # the forward's error enters dQ_i as −G_i·(õ_i − o_i)·Σ_j P_ij κ_ij (one factor for the row), and
            # |Σ_j P_ij κ_ij|/s_e ≤ |Σ_j P_ij k_jc| + e^Q_ic: a signed mean of the keys, not Σ_j P_ij|κ_ij|. The
            # computed mean is within ρ·Σ_j P̃_ij|k_jc| of Σ_j P̃_ij k_jc, and |P_ij − P̃_ij| ≤ (up − 1)·P̃_ij
            r_i = r_dot * (Ga * vmax).sum(-1, keepdim=True) + gl1 * o_err  # g̃ − g': rounding and the cast of õ
            mean_k = k_mean.abs() + (rho + up - 1.0) * (1.0 + rho) * pos_r[..., :d] + eq_
            dq_cs = s_e * (sq_cs + ((1.0 + eta_p) * r_i + g_k * (1.0 + eta_p) * b) * kq + gl1 * E * mean_k)
            dq = torch.minimum(dq, dq_cs)
            # columns: Σ_i P̃_ij (G_i·v_j − c_i)² = v_jᵀA_jv_j − 2v_j·B_j + C_j
            vAv = (A.unflatten(-1, (d_v, d_v)) * (ve.unsqueeze(-1) * ve.unsqueeze(-2))).sum((-1, -2)).unsqueeze(-1)
            s2c = (vAv - 2.0 * (ve * B).sum(-1, keepdim=True) + Cc + 2.0 * rho * m2_s).clamp_min(0.0) * up
            kap2k = q2 + 2.0 * kk_extra * qa_s + kk_extra * kk_extra * one_s  # Σ_i P_ij (κ^K_ijc / s_e)²
            sk_cs = eta_p * torch.sqrt(s2c * kap2k)
            if prof is not None:  # Σ_i P_ij η'_ij² κ_ij² over the query buckets
                sk_cs = torch.minimum(sk_cs, torch.sqrt(s2c * bucket_weights(pos_c, o + 3 + 2 * d, nk, edges_q,
                                                                             kk_extra)))
            dk_cs = s_e * (sk_cs + s_ar_q + kk_extra * s_ar)
            dk = torch.minimum(dk, dk_cs)
        dq = dq + tiny * (1.0 + s_e * kq) + u_out * s_e * (1.0 + eta_p) * b * kq * (1.0 + g_k)
        dk = dk + tiny * (1.0 + s_e * (ka + kk_extra)) + u_out * s_e * (s_b_q + kk_extra * s_b) * (1.0 + g_q)
        dv = (eta_v + g_q * (1.0 + eta_v)) * colG + tiny + u_out * (1.0 + eta_v) * colG
        # weights that underflow (to a subnormal or, flushed, to 0) carry an absolute error ≤ tiny each, not a
        # relative one: Σ_j tiny·|g̃_ij|·κ_ijc over the keys, Σ_i tiny·|G_ic| for dV
        t_w = float(torch.finfo(spec.compute_dtype).tiny)
        kmax = ke.abs().amax(-2, keepdim=True)
        qmax = qa.amax(-2, keepdim=True)
        dq = dq + s_e * t_w * n_k * b * (kmax + eq_)
        dk = dk + s_e * t_w * (qmax + kk_extra) * b.sum(-2, keepdim=True)
        dv = dv + t_w * Ga.sum(-2, keepdim=True)
        # broadcast inputs receive the sum of their expanded gradients; the cast into each input's dtype may land
        # in its subnormal range: one subnormal step per entry
        dq = dq.expand(*batch, n_q, dq.shape[-1]).sum_to_size(q.shape) + underflow_unit(q.dtype)
        dk = dk.expand(*batch, n_k, dk.shape[-1]).sum_to_size(k.shape) + underflow_unit(k.dtype)
        dv = dv.expand(*batch, n_k, dv.shape[-1]).sum_to_size(v.shape) + underflow_unit(v.dtype)
        # nothing is certified where a gradient, or a product G_i·v_j on the way, could overflow its dtype
        big = float((Ga * ve.abs().amax(-2, keepdim=True)).sum(-1).amax()) * (1.0 + eta_p) * max(n_k, n_q, 1)
        mags = (s_e * (1.0 + eta_p) * float(b.amax()) * float((kmax + eq_).amax()) * 2.0,
                s_e * (1.0 + eta_p) * float(b.sum(-2).amax()) * float((qmax + kk_extra).amax()) * 2.0,
                (1.0 + eta_v) * float(Ga.sum(-2).amax()) * 2.0)
        over = not big < float(torch.finfo(spec.compute_dtype).max) / 8.0

        def top(x, mag, dtype):
            if over or not mag < float(torch.finfo(dtype).max) / 2.0:
                return math.inf
            return float(x.amax()) if x.numel() else 0.0
        return GradientCertificate(spec.method, spec.eta, spec.eta1, eta_p, E, top(dq, mags[0], q.dtype),
                                   top(dk, mags[1], k.dtype), top(dv, mags[2], v.dtype),
                                   str(spec.compute_dtype).replace("torch.", ""), spec.grad_eps)


# ---------------------------------------------------------------------------------------------------------------
# attaching the certificate to a call's backward


class GradientSlot:
    """Filled by each backward through one call: ``certificate`` computes the bound when first read.

    Several backward passes through the same call (``retain_graph=True``) accumulate their gradients in ``.grad``:
    the certificate then bounds that sum, as the sum of each upstream gradient's bound. The inputs are kept as the
    call's own tensors (detached views: no graph; the output as a copy, which the caller may edit): a read after
    q, k, v or the mask was modified in place raises instead of bounding other numbers."""

    def __init__(self, spec: GradientSpec, tensors):
        self.spec = spec
        self._tensors = tensors  # (q, k, v, mask, c_q, c_k, sums, out)
        self._versions = self._current_versions()
        self._grads: list[torch.Tensor] = []
        self._cert: GradientCertificate | None = None

    def _current_versions(self) -> list[int]:
        q, k, v, mask = self._tensors[:4]
        return [t._version for t in (q, k, v, mask) if t is not None]

    def _bound(self, grads: list[torch.Tensor]) -> GradientCertificate:
        if self._current_versions() != self._versions:
            raise RuntimeError("gradient certificate: q, k, v or the mask of this call was modified in place after "
                               "its forward (an optimizer step on a leaf?); read the certificate first")
        q, k, v, mask, c_q, c_k, sums, out = self._tensors
        certs = [gradient_bounds(q, k, v, g, spec=self.spec, mask=mask, c_q=c_q, c_k=c_k, sums=sums, out=out)
                 for g in grads]
        return dataclasses.replace(certs[0], dq_bound=sum(c.dq_bound for c in certs),
                                   dk_bound=sum(c.dk_bound for c in certs), dv_bound=sum(c.dv_bound for c in certs))

    def hook(self, grad: torch.Tensor) -> None:
        """The output's gradient hook: with ``grad_eps``, the bound is checked before anything is kept, so a
        refused backward leaves the slot (and q, k, v's gradients) as they were."""
        if grad is None:  # an undefined gradient (autograd's "zero" without a tensor): nothing flows through the call
            return
        grads = self._grads + [grad.detach().clone()]  # a copy: the caller may reuse its tensor
        cert = None
        eps = self.spec.grad_eps
        if eps is not None:
            cert = self._bound(grads)
            if not cert.bound <= eps:
                raise ValueError(
                    f"grad_eps: the gradient bound of this {self.spec.method} call is {cert.bound:.3g} > "
                    f"grad_eps={eps:g} (dq {cert.dq_bound:.3g}, dk {cert.dk_bound:.3g}, dv {cert.dv_bound:.3g}); "
                    f"it scales with the forward's η = {cert.eta_forward:.3g} and the derivative's "
                    f"η₁ = {cert.eta_derivative:.3g}: ask a forward eps about {_scaled_eps(cert, eps)} or "
                    f"method='exact'")
        self._grads, self._cert = grads, cert
        global _LAST
        _LAST = self

    @property
    def _grad(self) -> torch.Tensor | None:
        """The upstream gradient (the sum of them after several backward passes)."""
        if not self._grads:
            return None
        return self._grads[0] if len(self._grads) == 1 else torch.stack(self._grads).sum(0)

    @property
    def certificate(self) -> GradientCertificate | None:
        if self._cert is None and self._grads:
            self._cert = self._bound(self._grads)
        return self._cert


_LAST: GradientSlot | None = None  # the slot of the most recent backward (a module global: CUDA backward threads)


def last_gradient_certificate() -> GradientCertificate | None:
    """The gradient certificate of the most recent attnbound call whose backward ran."""
    return _LAST.certificate if _LAST is not None else None


def _scaled_eps(cert: GradientCertificate, eps: float) -> str:
    if cert.forward_bound > 0 and math.isfinite(cert.bound) and cert.bound > 0:
        return f"{cert.forward_bound * eps / cert.bound:.2g}"
    return "smaller than now"


def watch(out: torch.Tensor, slot: GradientSlot) -> torch.Tensor:
    """``out`` itself, its gradient hook handing each upstream gradient to ``slot`` (in-place edits of ``out``
    stay allowed: the hook sees the gradient of the value the call returned)."""
    out.register_hook(slot.hook)
    return out


def _feature_rounding(method: str, radius: float, degree: int, *, rank: int, n_q: int, n_k: int, d: int) -> float:
    """Relative rounding of the float64 backward's polynomial weights: evaluating f'(y)·R = P'(u) and f(y) = P(u)
    on features of vectors in the unit ball sums terms of total size ≤ Σ_j (1 + j)|a_j| (the forward's argument
    for Σ_{|α|=j} (j!/α!)|q^α k^α| ≤ 1, with the derivative's factor j), against a weight ≥ min(1, R)·e^{−R}."""
    from .families import family

    a = family(method).coefficients(radius, degree)
    size = float(sum((1 + j) * abs(float(x)) for j, x in enumerate(a)))
    if radius > 700.0:
        return math.inf
    return _gamma(rank + n_k + n_q + d + 2 * degree + 8, U64) * size * math.exp(radius) / min(1.0, max(radius, 1e-300))


def _lse_rounding(call, dtype: torch.dtype) -> float:
    """The exact backward recomputes each weight as exp(x̃_ij − l̃se_i): beyond the forward's η (which covers x̃ and
    the exp), the stored log-sum-exp carries at most 4u·|lse_i|. The exact engines add the mask shifted by its row
    maximum (:func:`attnbound.stats.shift_mask`, b' ≤ 0 with one entry 0), so lse_i lies within ln n_k above the row's
    largest logit plus b': |lse_i| ≤ L + ln(n_k + 1) whatever the mask (rows with no finite entry have no weights)."""
    k, st = call.k, call.stats
    qn, kn = st.q_norm, max(st.k_norm, st.hidden_k_norm)  # the call's own row norms (all keys, hidden ones too)
    s_e = abs(call.scale) * (2.0 if call.kind == "l2" else 1.0)
    big = s_e * qn * kn + (abs(call.scale) * kn * kn if call.kind == "l2" else 0.0) + math.log(k.shape[-2] + 1) + 4.0
    lam = 4.0 * unit_roundoff(dtype) * big
    return math.expm1(lam) if lam < 700.0 else math.inf


def attach(out: torch.Tensor, cert, call, *, grad_eps: float | None = None) -> torch.Tensor:
    """Watch ``out``'s backward when autograd records through it: the call's :class:`GradientSlot` is kept on
    ``cert`` (``cert.gradient_certificate`` reads it) and filled by the backward. Returns ``out`` (watched)."""
    if call is None or not (torch.is_grad_enabled() and out.requires_grad):
        return out
    from .centring import centres

    q, k, v = call.q, call.k, call.v
    n_q, n_k, d = q.shape[-2], k.shape[-2], q.shape[-1]
    dtype = getattr(torch, cert.compute_dtype) if cert.compute_dtype else q.dtype
    exact_rows = cert.method == "exact" or "(heavy rows)" in (cert.engine or "")
    if exact_rows and cert.method != "exact":  # heavy query rows ran on an exact engine in the input's compute
        dtype = max((dtype, compute_dtype(q.dtype)), key=unit_roundoff)  # dtype: the coarser rounding rules
    c_q = c_k = None
    eta1, eta_fp = 0.0, 0.0
    if cert.method != "exact":
        eta1 = None  # computed when the bound is first read
        eta_fp = _feature_rounding(cert.method, cert.radius, cert.degree, rank=cert.rank, n_q=n_q, n_k=n_k, d=d)
        if cert.radius_source and ("centred" in cert.radius_source or "heavy" in cert.radius_source):
            c_q, c_k = centres(q, k, call.key_mask)
    if exact_rows:
        eta_fp += _lse_rounding(call, dtype)
    mask = call.attn_mask.detach() if call.attn_mask is not None else None  # bool or additive, as given
    per_pair = (cert.method != "exact" and call.kind == "softmax" and not exact_rows
                and "heavy" not in (cert.radius_source or ""))
    spec = GradientSpec(method=cert.method, kind=call.kind, scale=call.scale, is_causal=call.is_causal,
                        eta=cert.eta, eta1=eta1, eta_fp=eta_fp, forward_bound=cert.output_error_bound,
                        compute_dtype=dtype, grad_eps=grad_eps,
                        poly=None if eta1 is not None else (cert.method, cert.radius, cert.degree),
                        per_pair=per_pair)
    sums = None
    # the feature methods' sums in O(n·r·C) through the approximation, or the dense float64 pass in O(n_q·n_k·C)
    # where that is cheaper (short sequences against a large rank)
    if cert.method != "exact" and n_q * n_k > 3 * (n_q + n_k) * cert.rank:
        sums = _feature_sums(cert, call, eta_fp)
    # detached views share storage and version counter with the inputs: the slot holds no graph, and sees edits
    slot = GradientSlot(spec, (q.detach(), k.detach(), v.detach(), mask, c_q, c_k, sums, out.detach().clone()))
    object.__setattr__(cert, "_gradient_slot", slot)
    return watch(out, slot)


def _feature_sums(cert, call, eta_fp: float):
    """Pᵀa and P·b bounded through the call's own approximation, O(n·r) instead of O(n²): the same method, degree,
    centring and heavy tokens on (q, k) give weights P̃ = P(1 + ε)/(1 + ε̄), so P ≤ P̃·(1 + η)/(1 − η); P̃ᵀa is the
    value-gradient of the approximation for the upstream a, and P̃·b its output for values b. Their float64
    rounding is at most ρ = γ_N·Σ(1 + j)|a_j|·e^R/min(1, R) relative to the sums of P̃ (the true terms are
    ≥ (1 − η)e^{−R} of each row's mean, the computed ones off by γ_N·Σ|a_j| each)."""
    import re

    from .pipeline import Options, execute, statistics, tries, validate

    heavy = re.search(r"(\d+) heavy", cert.radius_source or "")
    opts = Options(scale=call.scale, is_causal=call.is_causal, kind=call.kind, method=cert.method,
                   degree=cert.degree if cert.method != "taylor" else None,
                   order=cert.degree if cert.method == "taylor" else None, strict=False,
                   centre="centred" in (cert.radius_source or ""), heavy=int(heavy.group(1)) if heavy else None,
                   bound=call.bound)
    key_mask = call.attn_mask
    eta = cert.eta
    up = (1.0 + eta) / (1.0 - eta) * (1.0 + eta_fp) / (1.0 - eta_fp) if eta < 1.0 and eta_fp < 1.0 else math.inf
    rho = 4.0 * eta_fp + 1e-15  # a signed sum's float64 rounding, relative to the sum of its terms' magnitudes

    def run(q64, k64, vals):
        call_ = statistics(q64, k64, vals, validate(q64, k64, vals, key_mask, opts), opts)
        return execute(call_, tries(call_, opts))[0]

    def sums(qe, ke, a, b):
        q64, k64 = qe.contiguous(), ke.contiguous()
        with torch.enable_grad():
            vd = torch.zeros((*a.shape[:-2], ke.shape[-2], a.shape[-1]), dtype=torch.float64, requires_grad=True)
            (col,) = torch.autograd.grad(run(q64, k64, vd), vd, a)
        with torch.no_grad():
            row = run(q64, k64, b.contiguous())
        return col, row, up, rho

    return sums
