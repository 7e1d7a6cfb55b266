"""The public, SDPA-shaped entry point: :func:`attention` and its two named approximations."""

from __future__ import annotations

import math

import torch

from . import validation as val
from .certificate import Certificate, exact_certificate, feature_certificate
from .exact import DEFAULT_BLOCK, blockwise_attention, dense_attention, use_dense
from .planner import MAX_TAYLOR_ORDER, CostModel, default_memory_budget, family_error, plan
from .features import chunk_rows, feature_attention, feature_memory_bytes, feature_rank
from .chebyshev import MAX_DEGREE, chebyshev_coefficients
from .taylor import check_order, taylor_coefficients


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    kind: str = "softmax",
    method: str = "exact",
    block_size: int | None = None,
    attn_mask: torch.Tensor | None = None,
    eps: float | None = None,
    bound: float | None = None,
    degree: int | None = None,
    order: int | None = None,
    memory_budget: int | None = None,
    cost_model: CostModel | None = None,
    strict: bool = True,
    return_certificate: bool = False,
):
    r"""Self-attention ``D⁻¹ exp(s·QKᵀ) V``, exactly or with a certified polynomial approximation.

    Args:
        q: queries ``(..., n_q, d)``; k: keys ``(..., n_k, d)``; v: values ``(..., n_k, d_v)``.
            Leading dims broadcast as in :func:`torch.nn.functional.scaled_dot_product_attention`.
            float16/bfloat16 are computed in float32 and returned in the input dtype.
        scale: s; ``None`` means 1/√d (torch's default). Alman–Song's setting is ``1/d``.
        is_causal: row i sees keys j ≤ i (needs n_q == n_k).
        kind: ``"softmax"`` (weights exp(s⟨q,k⟩)) or ``"l2"`` (weights exp(−s‖q−k‖²)).
        method: ``"exact"`` (dense for small n, else blockwise), ``"dense"``, ``"blockwise"``,
            ``"taylor"`` (Keles et al.; ``order`` or ``eps``), ``"polynomial"`` (Alman–Song
            Chebyshev; ``degree`` or ``eps``) or ``"auto"`` (the fastest certified for ``eps``;
            see :func:`attnbound.plan`; when that is exact and the input dtype's worst-case
            rounding bound would exceed ``eps``, exact runs in float64).
        block_size: key block (and query chunk) length of the blockwise method.
        attn_mask: bool (True = take part) or additive float mask broadcastable to
            ``(..., n_q, n_k)``. Approximate methods accept only boolean key-padding masks
            (broadcastable to ``(..., 1, n_k)``; masked keys do not count towards the radius);
            ``"auto"`` runs exact for any other mask. Rows with every key masked return zeros.
        eps: the largest acceptable ‖out − exact‖∞; approximate methods pick the smallest
            degree whose certificate meets it.
        bound: a declared entry bound B on |q|, |k|; the certified radius becomes s·d·B²
            instead of the data radius s·max‖q‖·max‖k‖. Entries above B raise.
        degree, order: fixed Chebyshev degree / even Taylor order (instead of ``eps``).
        memory_budget: bytes the feature engine may allocate (default: half the available RAM).
        cost_model: the planner's constants (default: measured on the reference machine).
        strict: with a fixed ``degree``/``order``, refuse (default) or, when False, run anyway a
            degree that cannot be certified (η ≥ 1); its certificate then says ``inf``. For
            demonstrations such as the hardness reductions.
        return_certificate: also return the :class:`~attnbound.Certificate`.

    Returns:
        ``out`` of shape ``(..., n_q, d_v)``, or ``(out, certificate)``.

    Raises:
        TypeError/ValueError naming the argument, before any large allocation: non-tensors,
        non-floating or mixed dtypes/devices, mismatched shapes, n_k = 0, NaN/Inf, bad scale,
        unknown kind/method, causal with n_q ≠ n_k, entries above ``bound``, an uncertifiable
        request (η ≥ 1, no degree meets ``eps``), or a feature memory need above the budget.
    """
    batch = val.check_qkv(q, k, v, is_causal=is_causal)
    val.check_choice("kind", kind, val.KINDS)
    val.check_choice("method", method, val.METHODS)
    val.check_positive_int("block_size", block_size)
    val.check_mask(attn_mask, q, k)
    s = val.resolve_scale(scale, q.shape[-1])
    eps = val.check_eps(eps, required=(method == "auto"))
    if bound is not None:
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound <= 0:
            raise ValueError(f"bound must be a positive finite float, got {bound!r}")
        for name, x in (("q", q), ("k", k)):
            top = float(x.detach().abs().max())
            if top > bound:
                raise ValueError(f"{name} has an entry of magnitude {top:.6g} above the declared bound={bound:g}")
    out_dtype = q.dtype
    batch_numel = math.prod(batch)

    auto = method == "auto"
    if auto and attn_mask is not None and not _is_key_padding(attn_mask):
        method = "exact"  # only exact methods take general masks
    if method == "auto":
        key_mask = _key_padding(attn_mask, q, k)
        radius, source = _radius(q, k, s, kind, bound, None if bound is not None else _max_norms(q, k, key_mask))
        vr, vmax = _value_stats(v)
        p = plan(q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1], radius, eps, is_causal,
                 batch=batch_numel, kind=kind, value_range=vr, max_abs_value=vmax,
                 memory_budget=memory_budget, requires_grad=_needs_grad(q, k, v),
                 cost_model=cost_model, out_dtype=out_dtype)
        method = p.choice.method
        degree = order = p.choice.degree
    if method in val.EXACT_METHODS:
        cd = val.compute_dtype(out_dtype)
        dense = method == "dense" or (method == "exact" and use_dense(batch_numel, q.shape[-2], k.shape[-2]))
        block = None if dense else (block_size or DEFAULT_BLOCK)
        check_precision = auto and eps is not None and cd != torch.float64
        certify = _exact_certifier(q, k, v, s, kind, attn_mask, block, out_dtype, eps) \
            if check_precision or return_certificate else None
        if check_precision and certify(cd).output_error_bound > eps:
            cd = torch.float64  # the working precision's own rounding bound would exceed eps
        qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
        mask = attn_mask.to(cd) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
        if dense:
            out = dense_attention(qc, kc, vc, scale=s, kind=kind, is_causal=is_causal, attn_mask=mask)
        else:
            out = blockwise_attention(qc, kc, vc, scale=s, kind=kind, is_causal=is_causal, attn_mask=mask,
                                      block_size=block_size)
        out = out.to(out_dtype)
        return (out, certify(cd)) if return_certificate else out
    out, cert = _feature_method(q, k, v, method=method, s=s, kind=kind, is_causal=is_causal, attn_mask=attn_mask,
                                eps=eps, bound=bound, degree=degree if method == "polynomial" else order,
                                memory_budget=memory_budget, batch_numel=batch_numel, strict=strict)
    return (out, cert) if return_certificate else out


def _exact_certifier(q, k, v, s, kind, mask, block, out_dtype, eps):
    """compute dtype -> the exact method's rounding certificate; the O(n·d) statistics are taken once."""
    mq, mk = _max_norms(q, k)
    logit = s * (mq + mk) ** 2 if kind == "l2" else s * mq * mk
    if mask is not None and mask.is_floating_point():
        finite = mask[torch.isfinite(mask)]
        logit += float(finite.abs().max()) if finite.numel() else 0.0
    vr, vmax = _value_stats(v)
    n_k = k.shape[-2]

    def certify(compute_dtype):
        return exact_certificate(kind=kind, logit_bound=logit, d=q.shape[-1], n_k=n_k,
                                 blocks=-(-n_k // block) if block else 1, block=block, value_range=vr,
                                 max_abs_value=vmax, compute_dtype=compute_dtype, out_dtype=out_dtype, eps=eps)

    return certify


def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _max_norms(q, k, key_mask=None) -> tuple[float, float]:
    """max‖q‖ and max‖k‖ over the keys that take part (masked-out keys get weight 0 and do not count)."""
    with torch.no_grad():
        kn = torch.linalg.vector_norm(k.detach().double(), dim=-1)
        if key_mask is not None:
            kn = torch.where(key_mask, kn, torch.zeros((), dtype=kn.dtype, device=kn.device))
        return float(torch.linalg.vector_norm(q.detach().double(), dim=-1).max()), float(kn.max())


def _radius(q, k, s, kind, bound, norms=None) -> tuple[float, str]:
    """R bounding |x| for x = s_eff⟨q, k⟩ (s_eff = 2s for ℓ2 attention), and where it came from."""
    s_eff = 2.0 * s if kind == "l2" else s
    if bound is not None:
        return s_eff * q.shape[-1] * float(bound) ** 2, "bound"
    mq, mk = norms or _max_norms(q, k)
    return s_eff * mq * mk, "data"


def _value_stats(v) -> tuple[float, float]:
    with torch.no_grad():
        vd = v.detach().double().reshape(-1, v.shape[-2], v.shape[-1])
        spread = float((vd.amax(-2) - vd.amin(-2)).max())
        return spread, float(vd.abs().max())


def _is_key_padding(attn_mask) -> bool:
    return attn_mask.dtype == torch.bool and (attn_mask.dim() < 2 or attn_mask.shape[-2] == 1)


def _key_padding(attn_mask, q, k) -> torch.Tensor | None:
    if attn_mask is None:
        return None
    if not _is_key_padding(attn_mask):
        raise ValueError(
            "attn_mask: the taylor/polynomial methods support only boolean key-padding masks "
            f"broadcastable to (..., 1, n_k) (and is_causal); got dtype {attn_mask.dtype}, shape "
            f"{tuple(attn_mask.shape)}. Use method='exact' for general masks."
        )
    return attn_mask if attn_mask.dim() == 1 else attn_mask.squeeze(-2)


def _feature_method(q, k, v, *, method, s, kind, is_causal, attn_mask, eps, bound, degree, memory_budget,
                    batch_numel, strict=True):
    key_mask = _key_padding(attn_mask, q, k)
    d, d_v, n_q, n_k = q.shape[-1], v.shape[-1], q.shape[-2], k.shape[-2]
    norms = _max_norms(q, k, key_mask) if bound is None else None
    radius, source = _radius(q, k, s, kind, bound, norms)
    if radius > 700.0:
        raise ValueError(f"radius R = s·max‖q‖·max‖k‖ = {radius:.4g} is beyond what float64 features can represent "
                         f"(e^R overflows past R ≈ 700); use method='exact'")
    vr, vmax = _value_stats(v)

    cert = choose_certificate(method, radius, eps=eps, degree=degree, d=d, n_k=n_k, value_range=vr,
                              max_abs_value=vmax, kind=kind, radius_source=source, out_dtype=q.dtype, strict=strict)
    g = cert.degree
    r = cert.rank
    chunk = chunk_rows(batch_numel, r)
    need = feature_memory_bytes(batch_numel, n_q, n_k, d_v, r, chunk, is_causal=is_causal,
                                requires_grad=_needs_grad(q, k, v))
    budget = memory_budget if memory_budget is not None else default_memory_budget(q.device)
    if need > budget:
        raise ValueError(
            f"memory_budget: {method} degree {g} needs feature rank r={r} and about {need / 2**20:.1f} MiB "
            f"(budget {budget / 2**20:.1f} MiB); ask for a larger eps, a smaller radius, no gradients, or "
            f"method='exact'"
        )
    coeffs, aq, ak = polynomial_setup(method, radius, g, d=d, bound=bound if source == "bound" else None,
                                      norms=norms)
    qd, kd, vd = q.double(), k.double(), v.double()
    key_weight = None
    if kind == "l2":
        sq = (kd * kd).sum(-1)
        key_weight = torch.exp(-s * (sq - sq.detach().amin(-1, keepdim=True)))
    if key_mask is not None:
        km = key_mask.to(torch.float64)
        key_weight = km if key_weight is None else key_weight * km
        kd = kd * km.unsqueeze(-1)  # masked keys may lie outside the radius: keep their features finite
    out = feature_attention(qd * aq, kd * ak, vd, coeffs=coeffs, key_weight=key_weight, is_causal=is_causal,
                            chunk=chunk)
    return out.to(q.dtype), cert


def polynomial_setup(method: str, radius: float, degree: int, *, d: int, bound: float | None,
                     norms: tuple[float, float] | None):
    """(monomial coefficients of P in u = x/R, query scale, key scale) such that ⟨a_q·q, a_k·k⟩ = x/R ∈ [−1, 1].

    With a declared ``bound`` the scales are 1/(√d·B); otherwise 1/max‖q‖ and 1/max‖k‖ from ``norms``.
    """
    coeffs = taylor_coefficients(radius, degree) if method == "taylor" else chebyshev_coefficients(radius, degree)
    if radius == 0.0:
        coeffs = coeffs[:1]
    if bound is not None:
        aq = ak = 1.0 / (math.sqrt(d) * float(bound))
    else:
        mq, mk = norms
        aq, ak = (1.0 / mq if mq > 0 else 1.0), (1.0 / mk if mk > 0 else 1.0)
    return coeffs, aq, ak


def degree_certificate(method: str, radius: float, degree: int, *, d: int, n_k: int, value_range: float,
                       max_abs_value: float, kind: str = "softmax", radius_source: str = "data",
                       out_dtype: torch.dtype = torch.float32, eps: float | None = None) -> Certificate:
    """The certificate a ``method`` ("taylor"/"polynomial") run of ``degree`` would carry at radius R."""
    delta, abs_sum = family_error(method, radius, degree)
    return feature_certificate(method=method, kind=kind, degree=degree, rank=feature_rank(d, degree), radius=radius,
                               radius_source=radius_source, delta=delta, coeff_abs_sum=abs_sum, n_k=n_k,
                               value_range=value_range, max_abs_value=max_abs_value, out_dtype=out_dtype, eps=eps)


def certified_degree(method: str, radius: float, eps: float, *, d: int, n_k: int, value_range: float,
                     max_abs_value: float, kind: str = "softmax", radius_source: str = "data",
                     out_dtype: torch.dtype = torch.float32, rounding: bool = True) -> Certificate | None:
    """The certificate of the smallest degree (even order for Taylor) meeting ``eps``, or None if none ≤ the cap.

    Costs nothing but scalar arithmetic; use it to ask what an input would need before running.
    ``rounding=False`` asks the approximation term alone to meet ``eps`` (what the mathematics
    needs before the float64 rounding term, which grows with the rank, is counted).
    """
    step, top = (2, MAX_TAYLOR_ORDER) if method == "taylor" else (1, MAX_DEGREE)
    for g in range(0, top + 1, step):
        c = degree_certificate(method, radius, g, d=d, n_k=n_k, value_range=value_range,
                               max_abs_value=max_abs_value, kind=kind, radius_source=radius_source,
                               out_dtype=out_dtype, eps=eps)
        if c.eta < 1.0 and (c.output_error_bound if rounding else c.approximation_bound) <= eps:
            return c
    return None


def choose_certificate(method: str, radius: float, *, eps: float | None, degree: int | None, d: int, n_k: int,
                       value_range: float, max_abs_value: float, kind: str = "softmax", radius_source: str = "data",
                       out_dtype: torch.dtype = torch.float32, strict: bool = True) -> Certificate:
    """The certificate a taylor/polynomial run will carry: the smallest degree meeting ``eps``, or the
    fixed ``degree`` (even order for Taylor). Raises when neither is given, when no degree up to the
    cap meets ``eps``, or (``strict``) when the fixed degree cannot be certified (η ≥ 1)."""
    common = dict(d=d, n_k=n_k, value_range=value_range, max_abs_value=max_abs_value, kind=kind,
                  radius_source=radius_source, out_dtype=out_dtype)
    if degree is None:
        if eps is None:
            raise ValueError(f"method={method!r} needs eps (target error) or "
                             f"{'order' if method == 'taylor' else 'degree'} (fixed)")
        cert = certified_degree(method, radius, eps, **common)
        if cert is None:
            top = MAX_TAYLOR_ORDER if method == "taylor" else MAX_DEGREE
            last = degree_certificate(method, radius, top, eps=eps, **common)
            raise ValueError(
                f"eps={eps:g} cannot be certified by method={method!r} up to degree {top} at radius R={radius:.4g} "
                f"(best bound {last.output_error_bound:.3g}); use method='exact' or shrink the inputs' norms"
            )
        return cert
    if method == "taylor":
        check_order(degree)
    elif isinstance(degree, bool) or not isinstance(degree, int) or not 0 <= degree <= MAX_DEGREE:
        raise ValueError(f"degree must be an int in 0..{MAX_DEGREE}, got {degree!r}")
    cert = degree_certificate(method, radius, degree, eps=eps, **common)
    if strict and not cert.eta < 1.0:
        raise ValueError(
            f"cannot certify {method} degree {degree} at radius R={radius:.4g}: the relative weight error "
            f"η = δ·e^R = {cert.eta:.3g} ≥ 1, so weights could vanish or change sign; raise the degree or use "
            f"method='exact'"
        )
    return cert


def taylor_attention(q, k, v, *, order: int | None = None, eps: float | None = None, return_certificate=False,
                     **kwargs):
    """Keles et al.'s order-p Taylor attention (even p), or the smallest even order certified for ``eps``.

    Same arguments as :func:`attention`; order 2 is the 1 + x + x²/2 feature map of the Based
    linear-attention family.
    """
    return attention(q, k, v, method="taylor", order=order, eps=eps, return_certificate=return_certificate, **kwargs)


def polynomial_attention(q, k, v, *, degree: int | None = None, eps: float | None = None,
                         return_certificate=False, **kwargs):
    """Alman–Song's polynomial-method attention (degree-g Chebyshev approximation of exp).

    With ``eps`` the smallest degree whose certificate meets it is used. Same arguments as
    :func:`attention`.
    """
    return attention(q, k, v, method="polynomial", degree=degree, eps=eps,
                     return_certificate=return_certificate, **kwargs)
