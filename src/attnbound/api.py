"""The public, SDPA-shaped entry point: :func:`attention` and its two named approximations."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from . import validation as val
from .certificate import Certificate
from .exact import DEFAULT_BLOCK, blockwise_attention, dense_attention, use_dense
from .families import MAX_FEATURE_RADIUS, degree_certificate, family, fixed_degree  # noqa: F401  (api.degree_certificate)
from .features import (_min_denominator, chunk_rows, feature_attention, feature_memory_bytes, normalize_readout,
                       weighted_values)
from .planner import (CostModel, Variant, default_memory_budget, exact_candidate, exact_eps_reason,
                      exact_memory_bytes, plan)
from .centring import Split, heavy_rows, splits
from .certificate import _gamma
from .stats import InputStats, input_stats, key_participation, shift_mask


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
    enable_gqa: bool = False,
    centre: bool | None = None,
    heavy: int | None = None,
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
        method: ``"exact"`` (torch SDPA on the CPU with an any-order rounding certificate,
            :mod:`attnbound.sdpa`; otherwise dense for small n, else blockwise), ``"dense"``, ``"blockwise"``,
            ``"taylor"`` (Keles et al.; ``order`` or ``eps``), ``"polynomial"`` (Alman–Song
            Chebyshev; ``degree`` or ``eps``), ``"relative"`` (relative-error minimax polynomials;
            ``degree`` or ``eps``) or ``"auto"`` (the fastest certified for ``eps``; see
            :func:`attnbound.plan`; when that is exact and the input dtype's worst-case rounding
            bound would exceed ``eps``, exact runs in float64).
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
        enable_gqa: grouped-query attention as in SDPA: q ``(..., H_q, n_q, d)`` against k, v
            ``(..., H_kv, n_k, ·)`` with H_kv dividing H_q; query head h uses key/value head
            h // (H_q / H_kv). K and V are never copied per head.
        centre: approximate methods: centre queries and keys (their means; the cross terms become an
            exact per-key weight, :mod:`attnbound.centring`), which shrinks the radius of data with a
            common offset. ``None``: not for a fixed method (so it equals the distributed and decoding
            paths), weighed by the plan under ``auto``.
        heavy: approximate methods: compute the ``heavy`` keys and queries of largest (centred) norm
            exactly, so the polynomial covers the smaller radius of the rest. ``None``: 0 for a fixed
            method, chosen by the plan (0, 2 or 8) under ``auto``.
        return_certificate: also return the :class:`~attnbound.Certificate`.

    Returns:
        ``out`` of shape ``(..., n_q, d_v)``, or ``(out, certificate)``.

    The contract: ``out`` is finite, has that shape and q's dtype, and max|out − exact| ≤
    ``certificate.output_error_bound``, where exact is the attention of the inputs as given (real
    arithmetic). With ``eps`` (any method, fixed degree/order included) the bound is ≤ eps, or the call
    raises ValueError saying why and what would meet it. ``certificate.certified`` is False whenever the
    bound is infinite. Empty outputs (n_q = 0, d_v = 0 or an empty batch) return an empty tensor.

    Raises:
        TypeError/ValueError naming the argument, before any large allocation: non-tensors,
        non-floating or mixed dtypes/devices, mismatched shapes, n_k = 0, NaN/Inf, bad scale,
        unknown kind/method, causal with n_q ≠ n_k, entries above ``bound``, an uncertifiable
        request (η ≥ 1, no degree meets ``eps``), or a feature memory need above the budget.
    """
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if enable_gqa:
        return _grouped(q, k, v, attn_mask, is_causal, return_certificate,
                        dict(scale=scale, kind=kind, method=method, block_size=block_size, eps=eps, bound=bound,
                             degree=degree, order=order, memory_budget=memory_budget, cost_model=cost_model,
                             strict=strict, centre=centre, heavy=heavy))
    batch = val.check_qkv(q, k, v, is_causal=is_causal)
    val.check_choice("kind", kind, val.KINDS)
    val.check_choice("method", method, val.METHODS)
    val.check_positive_int("block_size", block_size)
    s = val.resolve_scale(scale, q.shape[-1])
    eps = val.check_eps(eps, required=(method == "auto"))
    bound = val.check_bound(bound)
    if method in val.FEATURE_METHODS and fixed_degree(method, degree, order) is not None:
        family(method).check_degree(fixed_degree(method, degree, order))
    val.check_positive_int("memory_budget", memory_budget)
    if centre is not None and not isinstance(centre, bool):
        raise TypeError(f"centre must be True, False or None, got {centre!r}")
    if heavy is not None and (isinstance(heavy, bool) or not isinstance(heavy, int) or heavy < 0):
        raise ValueError(f"heavy must be a non-negative int or None, got {heavy!r}")
    budget = memory_budget if memory_budget is not None else default_memory_budget(q.device)
    if attn_mask is not None and attn_mask.dim() < 2:  # (n_k,) or a scalar: one row for every query
        attn_mask = attn_mask.reshape((1,) * (2 - attn_mask.dim()) + tuple(attn_mask.shape))
    val.check_mask(attn_mask, q, k)
    out_dtype = q.dtype
    if val.check_empty(q, v, batch):
        out = torch.zeros((*batch, q.shape[-2], v.shape[-1]), dtype=out_dtype, device=q.device)
        return (out, Certificate(method=method, kind=kind, eps=eps)) if return_certificate else out
    batch_numel = math.prod(batch)
    if attn_mask is not None and attn_mask.is_floating_point():
        # the statistics shift the mask by its row maximum over the keys each row can see: a float64 copy
        full = math.prod(torch.broadcast_shapes(attn_mask.shape, (q.shape[-2], k.shape[-2])))
        if 3 * 8 * full > budget:
            raise ValueError(f"memory_budget: the additive attn_mask needs about {3 * 8 * full / 2**20:.1f} MiB of "
                             f"working copies (budget {budget / 2**20:.1f} MiB)")
        if is_causal:  # shift over the keys a causal row can see, never over keys after it
            n = q.shape[-2]
            attn_mask = attn_mask.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), -math.inf)
    key_mask = None
    if attn_mask is not None and (method in val.FEATURE_METHODS or _is_key_padding(attn_mask)):
        key_mask = _key_padding(attn_mask)  # raises for a general mask with an approximate method
    st = input_stats(q, k, v, attn_mask=attn_mask, key_mask=key_mask)
    if bound is not None:
        for name, top in (("q", st.q_abs), ("k", st.k_abs)):
            if top > bound:
                raise ValueError(f"{name} has an entry of magnitude {top:.6g} above the declared bound={bound:g}")
    k, v = _drop_hidden_keys(k, v, key_mask if key_mask is not None else key_participation(attn_mask))
    call = _Call(q=q, k=k, v=v, stats=st, scale=s, kind=kind, is_causal=is_causal, attn_mask=attn_mask,
                 key_mask=key_mask, bound=bound, eps=eps, batch=batch, budget=budget, block_size=block_size,
                 requires_grad=_needs_grad(q, k, v))

    auto = method == "auto"
    if auto:
        if attn_mask is not None and key_mask is None:
            method = "exact"  # only exact methods take general masks
        elif not math.isfinite(st.logit_bound(s, kind)):
            method = "exact"  # logits beyond float64: exact says so
        else:
            variants = _variants(call, centre, heavy, auto=True)
            p = plan(q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1], variants[0][0].radius, eps, is_causal,
                     batch=batch_numel, kind=kind, value_range=st.value_range, max_abs_value=st.max_abs_value,
                     memory_budget=budget, requires_grad=call.requires_grad, cost_model=cost_model,
                     out_dtype=out_dtype, logit_bound=st.logit_bound(s, kind), scale=s, mask_span=st.mask_span,
                     radius_source="bound" if bound is not None else "data", variants=[v_ for v_, _ in variants])
            # the plan's choice, then (should a provisional choice miss eps on this input) the cheapest candidate
            # certified a priori: a cheaper feature run is often still there before exact
            order_ = sorted((c for c in p.candidates if (c.certified or c.provisional) and c.fits_memory),
                            key=lambda c: (c.seconds, c.provisional))
            fallback = [c for c in order_ if c.certified]
            tries = [p.choice] + [c for c in fallback if c is not p.choice][:1]
            for cand in tries:
                if cand.method == "exact":
                    method = "exact"
                    break
                var, sp = next(vs for vs in variants if vs[0].label == cand.variant)
                try:
                    cert = dataclasses.replace(cand.certificate, radius_source=_radius_source(call, var))
                    out, cert = _run_features(call, cand.method, cert, var, sp)
                    return (out, cert) if return_certificate else out
                except _PosteriorMiss:
                    method = "exact"  # exact, unless the next candidate is a feature run certified a priori
    if method in val.FEATURE_METHODS:
        var, sp = _variants(call, centre, heavy, auto=False)[0]
        cert = choose_certificate(method, var.radius, _radius_source(call, var), eps=eps,
                                  degree=fixed_degree(method, degree, order), d=q.shape[-1],
                                  n_k=k.shape[-2], value_range=st.value_range, max_abs_value=st.max_abs_value,
                                  kind=kind, out_dtype=out_dtype, strict=strict,
                                  key_log_weight=var.key_log_weight, exact_eta=var.exact_eta)
        try:
            out, cert = _run_features(call, method, cert, var, sp)
        except _PosteriorMiss as miss:
            raise ValueError(str(miss)) from None
        return (out, cert) if return_certificate else out
    if method in val.EXACT_METHODS:
        out, cert = _run_exact(call, method)
    return (out, cert) if return_certificate else out


class _PosteriorMiss(Exception):
    """A run chosen on its approximation term whose measured rounding bound then missed eps."""



def _grouped(q, k, v, attn_mask, is_causal, return_certificate, options):
    """Grouped-query attention by broadcasting, never by copying K and V per query head.

    Query heads are grouped as (..., H_kv, G, n_q, d) against keys (..., H_kv, 1, n_k, d). Without
    causality or a per-row mask the G·n_q rows of a group are one block of queries (..., H_kv, G·n_q, d)
    against the group's keys: plain batched attention.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        val.check_tensor(name, x)
        if x.dim() < 3:
            raise ValueError(f"enable_gqa needs a head dim: {name} must be (..., heads, n, d), got {tuple(x.shape)}")
    h_q, h_kv = q.shape[-3], k.shape[-3]
    if v.shape[-3] != h_kv:
        raise ValueError(f"enable_gqa: k and v must have the same number of heads, got {h_kv} and {v.shape[-3]}")
    if h_kv == 0 or h_q % h_kv:
        raise ValueError(f"enable_gqa: the key/value heads ({h_kv}) must divide the query heads ({h_q})")
    g, n_q = h_q // h_kv, q.shape[-2]
    mask = attn_mask
    per_head = mask is not None and mask.dim() >= 3 and mask.shape[-3] == h_q and h_q > 1
    if not is_causal and not per_head and (mask is None or mask.dim() < 2 or mask.shape[-2] == 1):
        qg = q.reshape(*q.shape[:-3], h_kv, g * n_q, q.shape[-1])
        res = attention(qg, k, v, attn_mask=mask, is_causal=False, return_certificate=return_certificate, **options)
        out = res[0] if return_certificate else res
        out = out.reshape(*out.shape[:-3], h_q, n_q, out.shape[-1])
        return (out, res[1]) if return_certificate else out
    qg = q.unflatten(-3, (h_kv, g))
    if mask is not None and mask.dim() >= 3:
        mask = mask.unflatten(-3, (h_kv, g)) if per_head else mask.unsqueeze(-3)
    res = attention(qg, k.unsqueeze(-3), v.unsqueeze(-3), attn_mask=mask, is_causal=is_causal,
                    return_certificate=return_certificate, **options)
    out = res[0] if return_certificate else res
    out = out.flatten(-4, -3)
    return (out, res[1]) if return_certificate else out


@dataclass(frozen=True)
class _Call:
    """One validated call: its inputs, options and statistics (taken once)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    stats: InputStats
    scale: float
    kind: str
    is_causal: bool
    attn_mask: torch.Tensor | None
    key_mask: torch.Tensor | None
    bound: float | None
    eps: float | None
    batch: torch.Size
    budget: int
    block_size: int | None
    requires_grad: bool

    @property
    def batch_numel(self) -> int:
        return math.prod(self.batch)


def _drop_hidden_keys(k, v, keys):
    """Zero the keys and values no row can see: they get weight 0 whatever they hold, and a huge one must not
    overflow a logit (inf − inf) or a feature on its way to that 0."""
    if keys is None or bool(keys.all()):
        return k, v
    keep = keys.unsqueeze(-1)
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    return torch.where(keep, k, zero), torch.where(keep, v, zero)


def _variants(call: _Call, centre: bool | None, heavy: int | None, *, auto: bool) -> list[tuple[Variant, Split]]:
    """The ways to shrink this call's radius that are worth weighing: plain, centred, and (under ``auto``)
    2 or 8 heavy tokens exact, each with its radius and the rounding its extra terms bring
    (:mod:`attnbound.centring`). A declared ``bound`` fixes the radius: plain only."""
    st, s, d = call.stats, call.scale, call.q.shape[-1]
    s_eff = 2.0 * s if call.kind == "l2" else s
    if call.bound is not None:
        radius, _ = st.radius(s, call.kind, bound=call.bound, d=d)
        return [(Variant("plain", radius, key_log_weight=_key_log_weight_bound(st, s, call.kind)),
                 Split(None, None, None, None, st.q_norm, st.k_norm))]
    n_tokens = min(call.q.shape[-2], call.k.shape[-2])
    centres_ = [centre] if centre is not None else ([False, True] if auto else [False])
    heavies = [heavy] if heavy is not None else ([0, 2, 8] if auto else [0])
    base = s * st.k_norm * st.k_norm if call.kind == "l2" else 0.0
    out = []
    for c in centres_:
        hs = sorted({min(h, n_tokens - 1) for h in heavies})  # at least one light token is left
        for h, sp in splits(call.q, call.k, call.key_mask, centre=c, heavies=hs, rows=st.rows).items():
            cc = c
            # rounding charged to the per-key weights: the cross term s_eff⟨c_q, k_j⟩ and the subtractions
            # q − c_q, k − c_k move a logit by ≤ 2u·s_eff·(‖q‖+‖c_q‖)(‖k‖+‖c_k‖) ≤ 8u·s_eff·max‖q‖·max‖k‖
            # (means have norms ≤ the largest), charged as 2γ_{d+2}·klw by key_weight_error
            klw = base + (8.0 * s_eff * st.q_norm * st.k_norm if cc else 0.0)
            # heavy pairs are exact up to the rounding of their logit y + b − ref (|y| ≤ 4·s_eff·‖q‖‖k‖ centred)
            heavy_logit = 4.0 * s_eff * st.q_norm * st.k_norm + 2.0 * klw
            lam = 2.0 * _gamma(d + 4, 2.0**-53) * heavy_logit + 4.0 * 2.0**-53
            exact_eta = (math.expm1(lam) if lam < 700.0 else math.inf) if h else 0.0
            label = ("centred" if cc else "plain") + (f" + {h} heavy" if h else "")
            out.append((Variant(label, s_eff * sp.q_norm * sp.k_norm, centre=bool(cc), heavy=h,
                                key_log_weight=klw if (klw > 0 or call.kind == "l2") else None,
                                exact_eta=exact_eta), sp))
    # a variant that does more work (centres, or more heavy tokens) for no smaller radius is never the choice
    return [(v, sp) for v, sp in out if not any(
        w is not v and w.radius <= v.radius and w.heavy <= v.heavy and w.centre <= v.centre
        and (w.heavy, w.centre) != (v.heavy, v.centre) for w, _ in out)]


def _radius_source(call: _Call, var: Variant) -> str:
    if call.bound is not None:
        return "bound"
    return "data" + (", centred" if var.centre else "") + (f", {var.heavy} heavy tokens exact" if var.heavy else "")


def _key_log_weight_bound(st: InputStats, s: float, kind: str) -> float | None:
    """|log| of the engine's per-key weights: s·max‖k‖² for ℓ2 attention, None for softmax (masks are 0/1)."""
    return s * st.k_norm * st.k_norm if kind == "l2" else None  # (× not **: inf, not OverflowError)


def _run_exact(call: _Call, method: str):
    q, k, v, st = call.q, call.k, call.v, call.stats
    n_q, n_k, d, d_v = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    logit = st.logit_bound(call.scale, call.kind)
    # the unscaled products, and the scale itself, must not overflow the compute dtype either
    norms = max(st.q_norm * st.k_norm + (st.k_norm * st.k_norm if call.kind == "l2" else 0.0), call.scale)
    if max(logit, norms) * 8.0 > float(torch.finfo(torch.float64).max):
        raise ValueError(f"scale: logits up to s·max‖q‖·max‖k‖ = {logit:.3g} overflow even float64; "
                         "use a smaller scale or smaller q, k")
    from .sdpa import merged_mask_numel, sdpa_applies, sdpa_attention, sdpa_candidate, sdpa_memory_bytes

    if method == "exact" and sdpa_applies(q.device):  # torch's fused kernel, with its any-order certificate
        sc = sdpa_candidate(kind=call.kind, logit_bound=logit, mask_span=st.mask_span, d=d, n_k=n_k,
                            value_range=st.value_range, max_abs_value=st.max_abs_value, out_dtype=q.dtype,
                            eps=call.eps, norms_product=norms, scale=call.scale)
        scd, mask = getattr(torch, sc.compute_dtype), call.attn_mask
        need = sdpa_memory_bytes(call.batch_numel, n_q, n_k, d_v, scd.itemsize,
                                 mask_numel=0 if mask is None else mask.numel(),
                                 merged_mask_numel=merged_mask_numel(mask, call.is_causal, n_q, n_k))
        if need <= call.budget and (call.eps is None or sc.output_error_bound <= call.eps):
            if mask is not None and mask.is_floating_point():
                mask = shift_mask(mask, scd)
            vs, vexp = v.to(scd), 0
            if st.max_abs_value * n_k * 4.0 > float(torch.finfo(scd).max):  # Σ p·v could overflow: scale v by 2^-e
                vexp = math.frexp(st.max_abs_value)[1]
                vs = _times_pow2(vs, -vexp)
            out = sdpa_attention(q.to(scd), k.to(scd), vs, scale=call.scale, kind=call.kind,
                                 is_causal=call.is_causal, attn_mask=mask)
            return _finish(_times_pow2(out, vexp), st.max_abs_value, q.dtype, fresh=True), sc  # SDPA's own output
        # over the memory budget (a merged causal mask), or eps below even float64's any-order bound: our kernels
    item = 8 if val.compute_dtype(q.dtype) == torch.float64 else 4
    dense = method == "dense" or (method == "exact" and use_dense(call.batch_numel, n_q, n_k)
                                  and exact_memory_bytes(call.batch_numel, n_q, n_k, d_v, None, 8) <= call.budget)
    block = None if dense else (call.block_size or DEFAULT_BLOCK)
    cert = exact_candidate(kind=call.kind, logit_bound=logit, mask_span=st.mask_span, d=d, n_k=n_k, block=block,
                           value_range=st.value_range, max_abs_value=st.max_abs_value, out_dtype=q.dtype,
                           eps=call.eps, norms_product=norms, scale=call.scale)
    cd = getattr(torch, cert.compute_dtype)
    if call.eps is not None and not cert.output_error_bound <= call.eps:
        raise ValueError(exact_eps_reason(cert, call.eps, q.dtype))
    need = exact_memory_bytes(call.batch_numel, n_q, n_k, d_v, block, max(item, cd.itemsize))
    if need > call.budget:
        raise ValueError(f"memory_budget: {'dense' if dense else 'blockwise'} exact attention needs about "
                         f"{need / 2**20:.1f} MiB (budget {call.budget / 2**20:.1f} MiB); "
                         + ("use method='exact' or 'blockwise'" if dense else "pass a smaller block_size"))
    mask = call.attn_mask
    if mask is not None and mask.is_floating_point():
        mask = shift_mask(mask, cd)
    qc, kc, vc, vexp = q.to(cd), k.to(cd), v.to(cd), 0
    if st.max_abs_value * n_k * 4.0 > float(torch.finfo(cd).max):  # Σ p·v could overflow: scale v by 2^-e exactly
        vexp = math.frexp(st.max_abs_value)[1]
        vc = _times_pow2(vc, -vexp)
    if dense:
        out = dense_attention(qc, kc, vc, scale=call.scale, kind=call.kind, is_causal=call.is_causal, attn_mask=mask)
    else:
        out = blockwise_attention(qc, kc, vc, scale=call.scale, kind=call.kind, is_causal=call.is_causal,
                                  attn_mask=mask, block_size=block)
    return _finish(_times_pow2(out, vexp), st.max_abs_value, q.dtype), cert


def _scaled(x: torch.Tensor, a: float) -> torch.Tensor:
    """x·a in float64 (a = 1/max‖x‖ or 1/(√d·B)); a norm so small that its inverse leaves float64 is refused.
    One rounding per entry (the float64 copy is exact); the product is taken in place on that fresh copy."""
    if not math.isfinite(a):
        raise _PosteriorMiss("q/k: a norm below 1/max(float64) cannot be normalised for the feature engine; "
                             "use method='exact'")
    return x.to(torch.float64, copy=True).mul_(a)


def _times_pow2(x: torch.Tensor, e: int, *, fresh: bool = False) -> torch.Tensor:
    """x·2^e by two exact multiplications (2^e alone may not be a float; torch.ldexp has no gradient);
    in place when ``fresh`` says x is this call's own temporary (never an input)."""
    if e == 0:
        return x
    half = e // 2
    if fresh:
        return x.mul_(2.0**half).mul_(2.0 ** (e - half))
    return x * (2.0**half) * (2.0 ** (e - half))


def _finish(out: torch.Tensor, max_abs_value: float, dtype: torch.dtype, *, fresh: bool = False) -> torch.Tensor:
    """Cast to the output dtype, inside [−max|v|, max|v|] where every exact output lies; in place when
    ``fresh`` says ``out`` is this call's own result (never an input) and autograd does not record it."""
    if fresh and not out.requires_grad and out.is_contiguous():
        return out.clamp_(-max_abs_value, max_abs_value).to(dtype)
    return out.clamp(-max_abs_value, max_abs_value).to(dtype)


def _run_features(call: _Call, method: str, cert: Certificate, var: Variant, sp: Split):
    q, k, v, st = call.q, call.k, call.v, call.stats
    d, d_v, n_q, n_k = q.shape[-1], v.shape[-1], q.shape[-2], k.shape[-2]
    g, r = cert.degree, cert.rank
    chunk = chunk_rows(call.batch_numel, r)
    need = feature_memory_bytes(call.batch_numel, n_q, n_k, d, d_v, r, chunk, is_causal=call.is_causal,
                                requires_grad=call.requires_grad)
    if need > call.budget:
        fixes = (["a larger eps", "smaller input norms (radius)"] if call.eps is not None
                 else [f"a lower {family(method).degree_name}"])
        if call.requires_grad:
            fixes.append("no gradients (torch.no_grad())")
        raise ValueError(
            f"memory_budget: {method} {family(method).degree_name} {g} needs feature rank r={r} and about "
            f"{need / 2**20:.1f} MiB (budget {call.budget / 2**20:.1f} MiB); ask for {', '.join(fixes)}, a larger "
            f"memory_budget, or method='exact'")
    s_eff = 2.0 * call.scale if call.kind == "l2" else call.scale
    coeffs, aq, ak = polynomial_setup(method, cert.radius, g, d=d,
                                      bound=call.bound if cert.radius_source == "bound" else None,
                                      norms=(sp.q_norm, sp.k_norm))
    # float64 copies where they are computed with; otherwise _scaled converts q and k in its one copy
    # one float64 copy of k where it is computed with; otherwise _scaled converts q and k in its one copy
    k64 = k.double() if (var.centre or call.kind == "l2" or sp.heavy_k is not None) else None
    if var.centre:  # s⟨q,k⟩ = s⟨q−c_q, k−c_k⟩ + (row term, cancels) + s⟨c_q, k⟩ (a per-key log-weight)
        q1, k1 = q - sp.c_q, k64 - sp.c_k  # float64 (c is): the same values as q.double() − c_q
    elif sp.heavy_k is not None:
        q1, k1 = q.double(), k64
    else:
        q1, k1 = q, k
    vexp = math.frexp(st.max_abs_value)[1] if st.max_abs_value > 0 else 0
    vd = _times_pow2(v.to(torch.float64, copy=True), -vexp, fresh=True)  # |v| ≤ 1: exact but below 2^-1074·2^e
    log_w = None
    if call.kind == "l2":
        log_w = -call.scale * (k64 * k64).sum(-1)
    if var.centre:
        cw = s_eff * (k64 @ sp.c_q.transpose(-1, -2)).squeeze(-1)
        log_w = cw if log_w is None else log_w + cw
    minus_inf = torch.tensor(-math.inf, dtype=torch.float64, device=q.device)
    if call.key_mask is not None:
        log_w = torch.where(call.key_mask, log_w if log_w is not None else torch.zeros_like(minus_inf), minus_inf)
    light_w, qd, kd = log_w, q1, k1
    if sp.heavy_k is not None:  # heavy keys leave the polynomial (weight 0 there) and are added exactly below
        base = log_w if log_w is not None else torch.zeros(k.shape[:-1], dtype=torch.float64, device=q.device)
        hk = sp.heavy_k.expand(*torch.broadcast_shapes(base.shape[:-1], sp.heavy_k.shape[:-1]), sp.heavy_k.shape[-1])
        light_w = base.expand(*hk.shape[:-1], base.shape[-1]).scatter(-1, hk, -math.inf)
    keep = torch.isfinite(light_w).unsqueeze(-1) if light_w is not None else None
    if keep is not None:  # keys outside the radius (masked or heavy) must not reach the features
        kd = torch.where(keep, kd, torch.zeros((), dtype=torch.float64, device=q.device))
    if sp.heavy_q is not None:  # heavy query rows are computed exactly below; keep their features finite
        qd = qd.scatter(-2, sp.heavy_q.unsqueeze(-1).expand(*sp.heavy_q.shape, d), 0.0)
    num, ref = feature_attention(_scaled(qd, aq), _scaled(kd, ak), vd, coeffs=coeffs, key_log_weight=light_w,
                                 is_causal=call.is_causal, chunk=chunk, return_parts=True)
    if sp.heavy_k is not None:
        num = heavy_rows(num, ref, q1, k1, weighted_values(vd), log_w, sp.heavy_k, s_eff, call.is_causal)
    den = num[..., d_v]
    if sp.heavy_q is not None:
        den = den.scatter(-1, sp.heavy_q.expand(*den.shape[:-1], sp.heavy_q.shape[-1]), math.inf)
    cert = degree_certificate(method, cert.radius, g, d=d, n_k=n_k, value_range=cert.value_range,
                              max_abs_value=cert.max_abs_value, kind=call.kind, radius_source=cert.radius_source,
                              out_dtype=q.dtype, eps=call.eps, key_log_weight=var.key_log_weight,
                              exact_eta=var.exact_eta,
                              min_denominator=_min_denominator(den, log_w, call.is_causal))
    out = _times_pow2(normalize_readout(num, d_v), vexp, fresh=True)
    if sp.heavy_q is not None:
        out, cert = _exact_query_rows(call, out, sp.heavy_q, cert)
    if call.eps is not None and not cert.output_error_bound <= call.eps:
        raise _PosteriorMiss(
            f"eps: {method} {family(method).degree_name} {g} meets eps={call.eps:g} in its approximation term "
            f"({cert.approximation_bound:.3g}) but its float64 rounding bound on this input is {cert.rounding_bound:.3g} "
            f"(the rank {r} sums terms up to e^R = {math.exp(cert.radius):.3g} times the row sums); pass a larger eps, "
            f"smaller input norms, or method='exact'")
    return _finish(out, st.max_abs_value, q.dtype, fresh=True), cert


def _exact_query_rows(call: _Call, out: torch.Tensor, rows: torch.Tensor, cert: Certificate):
    """Overwrite the heavy query rows with exact attention; the certificate is the larger of the two bounds."""
    q, k, v = call.q, call.k, call.v
    n_k = k.shape[-2]
    batch = torch.broadcast_shapes(out.shape[:-2], rows.shape[:-1])
    idx = rows.expand(*batch, rows.shape[-1])
    qh = torch.gather(q.expand(*batch, *q.shape[-2:]), -2, idx.unsqueeze(-1).expand(*idx.shape, q.shape[-1]))
    mask = None
    if call.is_causal:
        mask = torch.arange(n_k, device=q.device) <= idx.unsqueeze(-1)
    if call.key_mask is not None:
        km = call.key_mask.unsqueeze(-2)
        mask = km if mask is None else mask & km
    # the call's own statistics still bound these rows (their queries are a subset), and its eps applies
    sub = dataclasses.replace(call, q=qh, attn_mask=mask, key_mask=None, is_causal=False,
                              stats=dataclasses.replace(call.stats, rows=None),  # per-row norms: of the full q
                              batch=torch.broadcast_shapes(qh.shape[:-2], k.shape[:-2], v.shape[:-2],
                                                           *(() if mask is None else (mask.shape[:-2],))))
    oh, ch = _run_exact(sub, "exact")
    out = out.expand(*batch, *out.shape[-2:]).scatter(-2, idx.unsqueeze(-1).expand(*idx.shape, out.shape[-1]),
                                                       oh.to(out.dtype))
    bound = max(cert.output_error_bound, ch.output_error_bound)
    return out, dataclasses.replace(cert, rounding_bound=max(cert.rounding_bound, ch.output_error_bound),
                                    output_error_bound=bound)


def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _is_key_padding(attn_mask) -> bool:
    return attn_mask.dtype == torch.bool and (attn_mask.dim() < 2 or attn_mask.shape[-2] == 1)


def _key_padding(attn_mask) -> torch.Tensor:
    if not _is_key_padding(attn_mask):
        raise ValueError(
            "attn_mask: the taylor/polynomial methods support only boolean key-padding masks "
            f"broadcastable to (..., 1, n_k) (and is_causal); got dtype {attn_mask.dtype}, shape "
            f"{tuple(attn_mask.shape)}. Use method='exact' for general masks."
        )
    return attn_mask if attn_mask.dim() == 1 else attn_mask.squeeze(-2)


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
    """The certificate a taylor/polynomial run will carry: the smallest degree meeting ``eps``, or the
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
