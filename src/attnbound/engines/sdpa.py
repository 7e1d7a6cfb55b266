"""Exact attention through torch's fused kernel, and a rounding certificate valid for any kernel order.

:func:`sdpa_attention` computes the exact-attention function of :mod:`attnbound.engines.reference`,

    out_i = Σ_j exp(x_ij) v_j / Σ_j exp(x_ij),   x_ij = s·⟨q_i, k_j⟩ + b'_ij,

by one call of :func:`torch.nn.functional.scaled_dot_product_attention` (SDPA):

* softmax attention: SDPA with ``scale=s``;
* ℓ2 attention, exp(−s‖q_i − k_j‖²): the factor exp(−s‖q_i‖²) cancels in the ratio, so it is
  SDPA with scale 2s and the per-key bias −s‖k_j‖² (the key-shift identity, exact in real
  arithmetic), carried as one more feature column, 2s·⟨[q_i, 1], [k_j, −‖k_j‖²/2]⟩, so no mask
  is built and ``is_causal`` stays native (its rounding is charged below);
* bool masks (True = take part, as SDPA's) as given; additive masks after the caller's row shift
  b' = b − max_j b_ij (:func:`attnbound.stats.shift_mask`); ``is_causal`` natively, or merged into
  the mask when both are given (SDPA refuses the pair);
* q, k and v are zero-padded to one head dim (exact: zero columns add nothing to a dot product,
  padded value columns are dropped), and leading dims broadcast and are folded into SDPA's
  four-dimensional (batch, head) layout, which selects its fused CPU kernel (three-dimensional
  inputs, or unequal head dims, go to a slower unfused path);
* rows whose keys are all masked out return zeros (our contract; recent torch already does).

Inputs arrive in the compute dtype (float32 or float64; callers widen float16/bfloat16 to float32),
so SDPA never rounds a logit or weight to half precision. The dispatch is CPU-only: on other
devices SDPA may select kernels with reduced-precision matrix products (TF32) or approximate
exponentials outside the model below, so its engine record (:mod:`attnbound.engines.registry`) declines
them and the project's own blockwise kernel runs.

**The certificate** (:func:`sdpa_certificate`) assumes nothing about the order of SDPA's sums or
its blocking. Model: every kernel that computes this function — a flash-style kernel that walks
key blocks with a running maximum m_t, rescaling its running sum and output by exp(m_{t−1} − m_t)
at each new block, or an unfused one (softmax of the full row, then a matrix product) — computes

* each logit x̂_ij from the dot product (any order), the scale (possibly as √s on each side), the
  bias and the mask;
* each weight once, p̂_ij = exp^(fl(x̂_ij − m_t)), and each rescale factor once per (row, block),
  and uses the same value in the numerator and the denominator;
* numerator and denominator as sums in any order (any tree of ≤ n_k leaves: ≤ n_k − 1 additions
  on any term's path), through at most ``key_blocks − 1`` rescale multiplications;
* the output by one division (or a reciprocal and a product).

Assumed of the exponential: exp^(y) = eʸ(1 + ε) + α for y ≤ 0 with |ε| ≤ 2·``exp_ulps``·u (an
error of ``exp_ulps`` units in the last place) and |α| ≤ 2·tiny (results in or below the subnormal
range, flushed to zero). torch's CPU kernel uses its vectorised ``exp_u20``, documented in its
source as accurate to 20 ulp; :data:`SDPA_EXP_ULPS` = 20, and ``tests/test_sdpa.py`` measures the
kernel's exponential on this machine against that assumption.

With u the unit roundoff of the compute dtype, γ_m = mu/(1 − mu), L bounding |s⟨q,k⟩| (ℓ2:
s(‖q‖ + ‖k‖)², which bounds 2s|⟨q,k⟩| + s‖k‖²) and T the mask span (capped at T* as in
:func:`attnbound.certificate.exact_certificate`, far keys charged 4e^{−40}·max|v|):

    logit error       |x̂ − x| ≤ γ_{d'+10}·(L + T) + 4·s'·(d + 2)·tiny·u,   d' = d (ℓ2: 2d)
    argument error    the subtraction of m_t, and the rescale arguments m_{t−1} − m_t, whose
                      sizes telescope to m_T − m_t ≤ 2L + T:  ≤ 3u·(2L + T)
    λ = γ_{d'+10}·(L + T) + 4·s'·(d + 2)·tiny·u + 3u·(2L + T)
    η = e^λ·(1 + 2·exp_ulps·u)^{key_blocks} − 1    (one exp per weight, one per rescale)

For ℓ2 the bias column's own sum of squares ‖k‖² adds d roundings to the dot product, hence
d' = 2d. The tiny·u term is for products q_c·k_c (and k_c² of the ℓ2 column) in the subnormal range, whose
rounding is absolute, not relative; s' is the scale SDPA applies (ℓ2: 2s). The fused CPU kernel
applies it to the computed dot product; an unfused path that multiplies q and k by √s' first is
covered as long as no such pre-scaled entry is subnormal.

Weights common to numerator and denominator with relative error ≤ η move the weighted average by
≤ η/(1 − η)·range (the lemma of :mod:`attnbound.certificate`). The sums, the rescale products, the
value products and the division perturb numerator and denominator terms separately, by at most
γ_m with m = n_k + key_blocks + 4, which moves the output by ≤ (2γ_m/(1 − γ_m) + 3u)·max|v|. Results
in the subnormal range add ≤ 12·n_k·(key_blocks + 2)·tiny·max|v| (the row's largest weight is
≥ 1 − η ≥ 1/2). The cast to the output dtype adds u_out·max|v| + u_out·tiny_out.

``key_blocks`` defaults to n_k: any blocking, block length 1 included. That is what makes the
bound hold for every kernel, and what makes it weak in float32 at long rows: at n_k = 2^16 the
exponentials alone give η ≈ n_k·40u ≈ 0.16. In float64 the same term is ≈ 3·10^{−10}, so callers
run SDPA in float64 when eps asks for more than float32's bound gives (:func:`sdpa_candidate`).
A theorem of floating-point arithmetic under the model above; the exponential's accuracy is an
assumption about torch's kernel (stated in its source and measured by the tests), not proved here.
A worst case: measured errors sit orders of magnitude below the bound.

Cost: one SDPA call, Θ(b·n_q·n_k·(d + d_v)) time; memory O(b·n_q·d_v) beyond the inputs plus,
when a mask is given, a float copy of it (SDPA converts bool masks) and, with ``is_causal`` and a
mask together, the merged n_q×n_k mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..certificate import FAR_MARGIN, Certificate, _gamma, output_bound, underflow_unit, unit_roundoff

SDPA_EXP_ULPS = 20  # torch's exp_u20: "a faster version of exp with ULP=20"
SDPA_DTYPES = (torch.float32, torch.float64)


def sdpa_certificate(
    *,
    kind: str,
    logit_bound: float,
    d: int,
    n_k: int,
    value_range: float,
    max_abs_value: float,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
    mask_span: float = 0.0,
    key_blocks: int | None = None,
    exp_ulps: float = SDPA_EXP_ULPS,
    scale: float = 0.0,
    eps: float | None = None,
    sum_terms: int | None = None,
    log_extra: float = 0.0,
) -> Certificate:
    """The rounding bound of exact attention by SDPA in ``compute_dtype``, for any summation order and
    any key blocking of at most ``key_blocks`` blocks (default n_k: any); ``scale`` is the softmax scale s
    (it charges subnormal products). See the module docstring.

    For a kernel of known order (:mod:`attnbound.engines.flash`): ``key_blocks`` is the number of
    exponentials on any weight's path, ``sum_terms`` the longest path of separate roundings of a numerator or
    denominator term (default n_k + key_blocks + 4: any order), and ``log_extra`` a further shared relative
    perturbation of the weights, as a logarithm (added to λ)."""
    if not isinstance(n_k, int) or n_k < 1:
        raise ValueError(f"n_k must be a positive int, got {n_k!r}")
    blocks = n_k if key_blocks is None else key_blocks
    if not isinstance(blocks, int) or not 1 <= blocks <= n_k:
        raise ValueError(f"key_blocks must be an int in [1, n_k={n_k}], got {key_blocks!r}")
    m = n_k + blocks + 4 if sum_terms is None else sum_terms
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"sum_terms must be a positive int, got {sum_terms!r}")
    if not (log_extra >= 0.0 and math.isfinite(log_extra)):
        raise ValueError(f"log_extra must be finite and >= 0, got {log_extra!r}")
    if not (exp_ulps >= 0 and math.isfinite(exp_ulps)):
        raise ValueError(f"exp_ulps must be finite and >= 0, got {exp_ulps!r}")
    u = unit_roundoff(compute_dtype)
    tiny = float(torch.finfo(compute_dtype).tiny)
    L = float(logit_bound)
    g_logit = _gamma((2 * d if kind == "l2" else d) + 10, u)
    span, far = float(mask_span), 0.0
    cut = 2.0 * (2.0 * L + 1.0 + math.log(n_k) + FAR_MARGIN)
    if span > cut:
        if g_logit > 0.1:
            span, far = math.inf, math.inf
        else:
            span, far = cut, 4.0 * math.exp(-FAR_MARGIN) * max_abs_value
    s_eff = 2.0 * abs(scale) if kind == "l2" else abs(scale)
    lam = g_logit * (L + span) + 4.0 * s_eff * (d + 2) * tiny * u + 3.0 * u * (2.0 * L + span) + log_extra
    e_exp = 2.0 * exp_ulps * u
    log_growth = lam + blocks * math.log1p(e_exp)
    eta = math.expm1(log_growth) if log_growth < 700.0 else math.inf
    approx = output_bound(eta, value_range)
    g = _gamma(m, u)
    sums = (2.0 * g / (1.0 - g) + 3.0 * u) if g < 0.5 else math.inf
    subnormal = 12.0 * n_k * (blocks + 2) * tiny * max_abs_value if eta <= 0.5 else math.inf
    cast = unit_roundoff(out_dtype) if out_dtype != compute_dtype else 0.0
    # products p_j·v_j, rescales of the running output and the division in the subnormal range: absolute errors
    rounding = approx + far + (sums + cast) * max_abs_value + subnormal + underflow_unit(out_dtype) \
        + (n_k + blocks + 2) * underflow_unit(compute_dtype)
    if not math.isfinite(rounding):
        rounding = math.inf
    return Certificate(method="exact", kind=kind, eta=eta, value_range=value_range, max_abs_value=max_abs_value,
                       approximation_bound=0.0, rounding_bound=rounding, output_error_bound=rounding, eps=eps,
                       compute_dtype=str(compute_dtype).replace("torch.", ""), engine="sdpa")


def sdpa_candidate(*, kind: str, logit_bound: float, mask_span: float, d: int, n_k: int, value_range: float,
                   max_abs_value: float, out_dtype: torch.dtype, eps: float | None,
                   norms_product: float = 0.0, scale: float = 0.0) -> Certificate:
    """The SDPA certificate in float32 (for float16/bfloat16/float32 inputs), or in float64 when float32's
    logits could overflow or (with ``eps``) its bound would exceed eps. Float64 inputs stay float64."""
    common = dict(kind=kind, logit_bound=logit_bound, mask_span=mask_span, d=d, n_k=n_k, value_range=value_range,
                  max_abs_value=max_abs_value, out_dtype=out_dtype, eps=eps, scale=scale)
    if out_dtype != torch.float64:
        c = sdpa_certificate(compute_dtype=torch.float32, **common)
        overflow = max(logit_bound, norms_product) * 8.0 > float(torch.finfo(torch.float32).max)
        if not overflow and (eps is None or c.output_error_bound <= eps):
            return c
    return sdpa_certificate(compute_dtype=torch.float64, **common)


def sdpa_memory_bytes(batch_numel: int, n_q: int, n_k: int, d_v: int, itemsize: int, *, mask_numel: int = 0,
                      merged_mask_numel: int = 0, threads: int | None = None) -> int:
    """Peak bytes beyond the inputs: output and row statistics, the fused kernel's per-thread tiles
    (≤ 256 queries × 512 keys, three of them), SDPA's float copy of a mask and a merged causal mask."""
    threads = threads or torch.get_num_threads()
    tiles = threads * 3 * 256 * 512
    return (batch_numel * n_q * (d_v + 2) + tiles) * itemsize + (mask_numel + 2 * merged_mask_numel) * itemsize


def _fold(x: torch.Tensor, batch: torch.Size) -> torch.Tensor:
    """(*batch', n, c) broadcast to batch and folded to SDPA's (B1, B2, n, c) (a view when the dims allow)."""
    x = x.expand(*batch, *x.shape[-2:])
    if len(batch) == 0:
        return x.reshape(1, 1, *x.shape[-2:])
    if len(batch) == 1:
        return x.unsqueeze(0)
    return x.reshape(-1, batch[-1], *x.shape[-2:])


def _fold_mask(m: torch.Tensor, batch: torch.Size) -> torch.Tensor:
    """A mask broadcastable to (*batch, n_q, n_k), folded like :func:`_fold` but keeping its size-1 dims."""
    nb = len(batch)
    m = m.reshape((1,) * (nb + 2 - m.dim()) + tuple(m.shape))
    if nb == 0:
        return m.reshape(1, 1, *m.shape[-2:])
    if nb == 1:
        return m.unsqueeze(0)
    lead = m.shape[: nb - 1]
    if all(s == 1 for s in lead):
        return m.reshape(1, *m.shape[nb - 1:])
    m = m.expand(*batch[: nb - 1], *m.shape[nb - 1:])
    return m.reshape(-1, *m.shape[nb - 1:])


def merged_mask_numel(attn_mask: torch.Tensor | None, is_causal: bool, n_q: int, n_k: int) -> int:
    """Entries of the mask :func:`sdpa_attention` builds itself: ``is_causal`` merged into a given mask."""
    if attn_mask is None or not is_causal:
        return 0
    return (math.prod(attn_mask.shape[:-2]) if attn_mask.dim() > 2 else 1) * n_q * n_k


def sdpa_attention(q, k, v, *, scale: float, kind: str = "softmax", is_causal: bool = False, attn_mask=None):
    """Exact attention by one SDPA call (inputs validated, float32/float64, additive masks row-shifted).

    Returns (..., n_q, d_v) in q's dtype. Same function as :func:`attnbound.engines.reference.dense_attention`.
    """
    if q.dtype not in SDPA_DTYPES:
        raise TypeError(f"q: sdpa_attention computes in float32 or float64, got {q.dtype}")
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    n_q, n_k = q.shape[-2], k.shape[-2]
    s = float(scale)
    mask = attn_mask
    if kind == "l2":  # 2s·⟨[q, 1], [k, −‖k‖²/2]⟩ = 2s⟨q,k⟩ − s‖k‖²: the key bias as one more feature column
        s = 2.0 * float(scale)
        q = torch.cat([q, torch.ones((*q.shape[:-1], 1), dtype=q.dtype, device=q.device)], dim=-1)
        k = torch.cat([k, -0.5 * (k * k).sum(-1, keepdim=True)], dim=-1)
    d_v = v.shape[-1]
    width = max(q.shape[-1], d_v)  # the fused kernel wants one head dim: zero columns change no dot product
    if q.shape[-1] < width:
        q, k = (F.pad(x, (0, width - x.shape[-1])) for x in (q, k))
    elif d_v < width:
        v = F.pad(v, (0, width - d_v))
    dead = None
    if mask is not None and is_causal:
        keep = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril()
        mask = mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, -math.inf)
        is_causal = False
    if attn_mask is not None:  # rows that see no key: zeros, whatever the kernel returns there
        seen = mask.any(-1) if mask.dtype == torch.bool else ~torch.isneginf(mask).all(-1)
        if not bool(seen.all()):
            dead = ~seen
    out = F.scaled_dot_product_attention(
        _fold(q, batch), _fold(k, batch), _fold(v, batch),
        attn_mask=None if mask is None else _fold_mask(mask, batch), is_causal=is_causal, scale=s)
    out = out[..., :d_v].reshape(*batch, n_q, d_v)
    if dead is not None:
        out = out.masked_fill(dead.unsqueeze(-1), 0.0)
    return out
