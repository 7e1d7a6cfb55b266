"""The run stage of :func:`attnbound.attention`: one validated call on one engine, with its certificate.

* :func:`run_exact` — exact attention: torch's CPU flash kernel in its pinned order over key chunks
  (float32, :mod:`attnbound.engines.flash`) where it applies and its certificate meets eps; else torch's
  SDPA where its any-order certificate meets eps (float64 where float32's does not) within the memory
  budget; else the project's dense or blockwise kernel
  (:mod:`attnbound.engines.reference`) in the input precision or float64. Cost Θ(n_q·n_k·(d + d_v)).
* :func:`run_features` — a family's polynomial on the feature engine (fused kernels or torch,
  :mod:`attnbound.engines.registry`), with centring and heavy tokens (:mod:`attnbound.centring`), and the
  a-posteriori certificate measured on the run's own row sums. Cost O((n_q + n_k)·r·(d_v + 1)).

The engine that ran is recorded in the certificate (``Certificate.engine``); why faster engines were
passed over is :func:`attnbound.plan`'s to show. A run that raises has changed nothing: inputs are never
written.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from . import validation as val
from .centring import Split, heavy_rows
from .certificate import Certificate, CertificateMiss
from .engines import fused, registry
from .engines.features import (_min_denominator, chunk_rows, feature_attention, feature_memory_bytes,
                               feature_request, normalize_readout, weighted_values)
from .engines.flash import flash_attention, flash_candidate, flash_memory_bytes
from .engines.reference import DEFAULT_BLOCK, blockwise_attention, dense_attention, use_dense
from .engines.sdpa import merged_mask_numel, sdpa_attention, sdpa_candidate, sdpa_memory_bytes
from .families import degree_certificate, family, polynomial_setup
from .numerics import finish, normalised, scale_values, times_pow2, unit_values
from .planner import Variant, exact_candidate, exact_eps_reason, exact_memory_bytes
from .stats import InputStats, shift_mask


@dataclass(frozen=True)
class Call:
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

    @property
    def s_eff(self) -> float:
        """The dot-product scale: 2s for ℓ2 (the key-shift identity), s for softmax."""
        return 2.0 * self.scale if self.kind == "l2" else self.scale

    def mask_kind(self) -> str:
        """The mask an exact engine is asked to take (:class:`attnbound.engines.registry.Request`)."""
        m = self.attn_mask
        return "none" if m is None else ("bool" if m.dtype == torch.bool else "float")


# ----------------------------------------------------------------------------------------------
# exact


def _norms_product(call: Call) -> float:
    st = call.stats
    return max(st.q_norm * st.k_norm + (st.k_norm * st.k_norm if call.kind == "l2" else 0.0), call.scale)


def run_exact(call: Call, method: str) -> tuple[torch.Tensor, Certificate]:
    """Exact attention by ``method`` ("exact": SDPA where it applies and suffices, else dense or blockwise;
    "dense"/"blockwise": that kernel), with the certificate of the engine that ran."""
    logit, norms = call.stats.logit_bound(call.scale, call.kind), _norms_product(call)
    # the unscaled products, and the scale itself, must not overflow the compute dtype either
    if max(logit, norms) * 8.0 > float(torch.finfo(torch.float64).max):
        raise ValueError(f"scale: logits up to s·max‖q‖·max‖k‖ = {logit:.3g} overflow even float64; "
                         "use a smaller scale or smaller q, k")
    if method == "exact":
        (fc, chunk), why = flash_choice(call, logit, norms)
        if not why:
            return _run_flash(call, fc, chunk)
        sc = _sdpa_certificate(call, logit, norms)
        if not sdpa_declines(call, sc):
            return _run_sdpa(call, sc)
    return _run_reference(call, method, logit, norms)


def flash_choice(call: Call, logit: float, norms: float) -> tuple[tuple[Certificate, int], list[str]]:
    """((certificate, chunk) of the flash engine, why it cannot serve this call — empty: it can): its record's
    reasons (device, dtype: float32 compute only, the operator), then logits that could overflow float32, its
    pinned-order bound above eps, the memory budget."""
    st, q, n_k = call.stats, call.q, call.k.shape[-2]
    fc, chunk = flash_candidate(kind=call.kind, logit_bound=logit, mask_span=st.mask_span, d=q.shape[-1], n_k=n_k,
                                value_range=st.value_range, max_abs_value=st.max_abs_value, out_dtype=q.dtype,
                                eps=call.eps, scale=call.scale)
    why = registry.ENGINES["flash"].not_supported_reasons(_exact_request(call))
    if why:
        return (fc, chunk), why
    if call.attn_mask is not None and call.attn_mask.requires_grad and torch.is_grad_enabled():
        why.append("attn_mask requires grad (the kernel's backward gives no mask gradient)")
    if max(logit, norms) * 8.0 > float(torch.finfo(torch.float32).max):
        why.append("its float32 logits could overflow")
    if call.eps is not None and not fc.output_error_bound <= call.eps:
        why.append(f"its pinned-order float32 bound {fc.output_error_bound:.3g} > eps={call.eps:g}")
    mask = call.attn_mask
    need = flash_memory_bytes(call.batch_numel, q.shape[-2], n_k, q.shape[-1], call.v.shape[-1], chunk=chunk,
                              mask_rows=0 if mask is None else math.prod(mask.shape[:-1]))
    if need > call.budget:
        why.append(f"needs about {need / 2**20:.1f} MiB (budget {call.budget / 2**20:.1f} MiB)")
    return (fc, chunk), why


def _run_flash(call: Call, fc: Certificate, chunk: int) -> tuple[torch.Tensor, Certificate]:
    """torch's CPU flash kernel in its pinned order over key chunks, with its certificate ``fc``."""
    return _run_torch_kernel(call, fc, flash_attention, chunk=chunk)


def _run_torch_kernel(call: Call, cert: Certificate, kernel, **extra) -> tuple[torch.Tensor, Certificate]:
    """One of torch's kernels (flash chunks, SDPA) in ``cert``'s compute dtype: additive masks row-shifted, values
    scaled clear of overflow, the kernel's own output finished in place."""
    cd, mask, st = getattr(torch, cert.compute_dtype), call.attn_mask, call.stats
    if mask is not None and mask.is_floating_point():
        mask = shift_mask(mask, cd)
    vs, vexp = scale_values(call.v, st.max_abs_value, call.k.shape[-2], cd)
    out = kernel(call.q.to(cd), call.k.to(cd), vs, scale=call.scale, kind=call.kind, is_causal=call.is_causal,
                 attn_mask=mask, **extra)
    return finish(times_pow2(out, vexp), st.max_abs_value, call.q.dtype, fresh=True), cert


def _exact_request(call: Call) -> registry.Request:
    """What this call asks of an exact engine (:class:`attnbound.engines.registry.Request`)."""
    return registry.Request.of("exact", call.q, dtype=val.compute_dtype(call.q.dtype), mask=call.mask_kind(),
                               causal=call.is_causal, requires_grad=call.requires_grad)


def sdpa_declines(call: Call, sc: Certificate) -> list[str]:
    """Why SDPA cannot serve this call (empty: it can): its record's reasons (device, dtype), then the
    per-call ones — over the memory budget, or its any-order certificate ``sc`` above eps."""
    return registry.ENGINES["sdpa"].not_supported_reasons(_exact_request(call)) or _sdpa_declines(call, sc)


def _sdpa_certificate(call: Call, logit: float, norms: float) -> Certificate:
    st, q = call.stats, call.q
    return sdpa_candidate(kind=call.kind, logit_bound=logit, mask_span=st.mask_span, d=q.shape[-1],
                          n_k=call.k.shape[-2], value_range=st.value_range, max_abs_value=st.max_abs_value,
                          out_dtype=q.dtype, eps=call.eps, norms_product=norms, scale=call.scale)


def _sdpa_declines(call: Call, sc: Certificate) -> list[str]:
    """The per-call reasons SDPA cannot serve: over the memory budget, or its any-order bound above eps."""
    mask, (n_q, n_k, d_v) = call.attn_mask, (call.q.shape[-2], call.k.shape[-2], call.v.shape[-1])
    need = sdpa_memory_bytes(call.batch_numel, n_q, n_k, d_v, getattr(torch, sc.compute_dtype).itemsize,
                             mask_numel=0 if mask is None else mask.numel(),
                             merged_mask_numel=merged_mask_numel(mask, call.is_causal, n_q, n_k))
    why = []
    if need > call.budget:
        why.append(f"needs about {need / 2**20:.1f} MiB (budget {call.budget / 2**20:.1f} MiB)")
    if call.eps is not None and not sc.output_error_bound <= call.eps:
        why.append(f"its any-order bound {sc.output_error_bound:.3g} > eps={call.eps:g}")
    return why


def _run_sdpa(call: Call, sc: Certificate) -> tuple[torch.Tensor, Certificate]:
    """torch's fused kernel, with its any-order certificate ``sc``."""
    return _run_torch_kernel(call, sc, sdpa_attention)


def _run_reference(call: Call, method: str, logit: float, norms: float) -> tuple[torch.Tensor, Certificate]:
    """The project's dense or blockwise kernel (:mod:`attnbound.engines.reference`), in the input precision or
    float64, whichever certifies; over the memory budget, or eps below even float64's bound: raises."""
    q, k, st = call.q, call.k, call.stats
    n_q, n_k, d_v = q.shape[-2], k.shape[-2], call.v.shape[-1]
    item = 8 if val.compute_dtype(q.dtype) == torch.float64 else 4
    dense = method == "dense" or (method == "exact" and use_dense(call.batch_numel, n_q, n_k)
                                  and exact_memory_bytes(call.batch_numel, n_q, n_k, d_v, None, 8) <= call.budget)
    block = None if dense else (call.block_size or DEFAULT_BLOCK)
    cert = exact_candidate(kind=call.kind, logit_bound=logit, mask_span=st.mask_span, d=q.shape[-1], n_k=n_k,
                           block=block, value_range=st.value_range, max_abs_value=st.max_abs_value,
                           out_dtype=q.dtype, eps=call.eps, norms_product=norms, scale=call.scale)
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
    vc, vexp = scale_values(call.v, st.max_abs_value, n_k, cd)
    kernel = dense_attention if dense else blockwise_attention
    extra = {} if dense else {"block_size": block}
    out = kernel(q.to(cd), k.to(cd), vc, scale=call.scale, kind=call.kind, is_causal=call.is_causal,
                 attn_mask=mask, **extra)
    return finish(times_pow2(out, vexp), st.max_abs_value, q.dtype), cert


# ----------------------------------------------------------------------------------------------
# features


def _fused_backward(call: Call, var) -> bool:
    """Whether this call's gradients come from the fused backward (no saved n × r features): the fused kernels
    on the CPU, and under causality only keys weighted 0 or 1 (softmax, not centred: no per-key log-weights)."""
    if call.q.device.type != "cpu" or not fused.runtime_available()[0]:
        return False
    return not call.is_causal or (call.kind == "softmax" and var is not None and not var.centre)


def check_feature_memory(call: Call, method: str, degree: int, rank: int, var=None) -> None:
    """Refuse, naming what would fit, a feature run whose memory exceeds the budget (before any allocation)."""
    q, v = call.q, call.v
    chunk = chunk_rows(call.batch_numel, rank)
    need = feature_memory_bytes(call.batch_numel, q.shape[-2], call.k.shape[-2], q.shape[-1], v.shape[-1], rank,
                                chunk, is_causal=call.is_causal,
                                requires_grad=call.requires_grad and not _fused_backward(call, var))
    if need <= call.budget:
        return
    fam = family(method)
    fixes = ["a larger eps", "smaller input norms (radius)"] if call.eps is not None else [f"a lower {fam.degree_name}"]
    if call.requires_grad:
        fixes.append("no gradients (torch.no_grad())")
    raise ValueError(
        f"memory_budget: {method} {fam.degree_name} {degree} needs feature rank r={rank} and about "
        f"{need / 2**20:.1f} MiB (budget {call.budget / 2**20:.1f} MiB); ask for {', '.join(fixes)}, a larger "
        f"memory_budget, or method='exact'")


@dataclass
class _FeatureInputs:
    """What the feature engine is given: centred/heavy-masked float64 q, k (unscaled), per-key log-weights
    of the light keys, and the full log-weights and q1, k1 the exact heavy pass needs."""

    qd: torch.Tensor
    kd: torch.Tensor
    q1: torch.Tensor
    k1: torch.Tensor
    log_w: torch.Tensor | None
    light_w: torch.Tensor | None


def _feature_inputs(call: Call, var: Variant, sp: Split) -> _FeatureInputs:
    q, k = call.q, call.k
    # one float64 copy of k where it is computed with; otherwise the engine's scaling converts q and k in its copy
    k64 = k.double() if (var.centre or call.kind == "l2" or sp.heavy_k is not None) else None
    if var.centre:  # s⟨q,k⟩ = s⟨q−c_q, k−c_k⟩ + (row term, cancels) + s⟨c_q, k⟩ (a per-key log-weight)
        q1, k1 = q - sp.c_q, k64 - sp.c_k  # float64 (c is): the same values as q.double() − c_q
    elif sp.heavy_k is not None:
        q1, k1 = q.double(), k64
    else:
        q1, k1 = q, k
    log_w = None
    if call.kind == "l2":
        log_w = -call.scale * (k64 * k64).sum(-1)
    if var.centre:
        cw = call.s_eff * (k64 @ sp.c_q.transpose(-1, -2)).squeeze(-1)
        log_w = cw if log_w is None else log_w + cw
    minus_inf = torch.tensor(-math.inf, dtype=torch.float64, device=q.device)
    if call.key_mask is not None:
        log_w = torch.where(call.key_mask, log_w if log_w is not None else torch.zeros_like(minus_inf), minus_inf)
    light_w, qd, kd = log_w, q1, k1
    if sp.heavy_k is not None:  # heavy keys leave the polynomial (weight 0 there) and are added exactly below
        base = log_w if log_w is not None else torch.zeros(k.shape[:-1], dtype=torch.float64, device=q.device)
        hk = sp.heavy_k.expand(*torch.broadcast_shapes(base.shape[:-1], sp.heavy_k.shape[:-1]), sp.heavy_k.shape[-1])
        light_w = base.expand(*hk.shape[:-1], base.shape[-1]).scatter(-1, hk, -math.inf)
    if light_w is not None:  # keys outside the radius (masked or heavy) must not reach the features
        kd = torch.where(torch.isfinite(light_w).unsqueeze(-1), kd, torch.zeros((), dtype=torch.float64,
                                                                                  device=q.device))
    if sp.heavy_q is not None:  # heavy query rows are computed exactly below; keep their features finite
        qd = qd.scatter(-2, sp.heavy_q.unsqueeze(-1).expand(*sp.heavy_q.shape, q.shape[-1]), 0.0)
    return _FeatureInputs(qd, kd, q1, k1, log_w, light_w)


def run_features(call: Call, method: str, cert: Certificate, var: Variant, sp: Split
                 ) -> tuple[torch.Tensor, Certificate]:
    """``method``'s polynomial of ``cert.degree`` on the feature engine; the certificate measured on the run's
    row sums (raises :class:`CertificateMiss` when that misses eps)."""
    q, v, st = call.q, call.v, call.stats
    g, d_v = cert.degree, v.shape[-1]
    check_feature_memory(call, method, g, cert.rank, var)
    coeffs, aq, ak = polynomial_setup(method, cert.radius, g, d=q.shape[-1],
                                      bound=call.bound if cert.radius_source == "bound" else None,
                                      norms=(sp.q_norm, sp.k_norm))
    x = _feature_inputs(call, var, sp)
    vd, vexp = unit_values(v, st.max_abs_value)
    engine = registry.choose(feature_request(x.qd, x.light_w, is_causal=call.is_causal,
                                             requires_grad=call.requires_grad, dtype=torch.float64))[0]
    # the normalised float64 copies live only as long as the engine's call (they are the call's largest temporaries)
    num, ref = feature_attention(normalised(x.qd, aq), normalised(x.kd, ak), vd, coeffs=coeffs,
                                 key_log_weight=x.light_w, is_causal=call.is_causal,
                                 chunk=chunk_rows(call.batch_numel, cert.rank), return_parts=True, engine=engine)
    if sp.heavy_k is not None:
        num = heavy_rows(num, ref, x.q1, x.k1, weighted_values(vd), x.log_w, sp.heavy_k, call.s_eff, call.is_causal)
    den = num[..., d_v]
    if sp.heavy_q is not None:
        den = den.scatter(-1, sp.heavy_q.expand(*den.shape[:-1], sp.heavy_q.shape[-1]), math.inf)
    cert = degree_certificate(method, cert.radius, g, d=q.shape[-1], n_k=call.k.shape[-2],
                              value_range=cert.value_range, max_abs_value=cert.max_abs_value, kind=call.kind,
                              radius_source=cert.radius_source, out_dtype=q.dtype, eps=call.eps,
                              key_log_weight=var.key_log_weight, exact_eta=var.exact_eta,
                              min_denominator=_min_denominator(den, x.log_w, call.is_causal))
    cert = dataclasses.replace(cert, engine=engine)
    out = times_pow2(normalize_readout(num, d_v), vexp, fresh=True)
    if sp.heavy_q is not None:
        out, cert = exact_query_rows(call, out, sp.heavy_q, cert)
    if call.eps is not None and not cert.output_error_bound <= call.eps:
        raise CertificateMiss(
            f"eps: {method} {family(method).degree_name} {g} meets eps={call.eps:g} in its approximation term "
            f"({cert.approximation_bound:.3g}) but its float64 rounding bound on this input is "
            f"{cert.rounding_bound:.3g} (the rank {cert.rank} sums terms up to e^R = {math.exp(cert.radius):.3g} "
            f"times the row sums); pass a larger eps, smaller input norms, or method='exact'")
    return finish(out, st.max_abs_value, q.dtype, fresh=True), cert


def exact_query_rows(call: Call, out: torch.Tensor, rows: torch.Tensor, cert: Certificate):
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
    oh, ch = run_exact(sub, "exact")
    out = out.expand(*batch, *out.shape[-2:]).scatter(-2, idx.unsqueeze(-1).expand(*idx.shape, out.shape[-1]),
                                                       oh.to(out.dtype))
    bound = max(cert.output_error_bound, ch.output_error_bound)
    # the heavy rows' weights carry the exact engine's relative error: η is the larger of the two
    return out, dataclasses.replace(cert, rounding_bound=max(cert.rounding_bound, ch.output_error_bound),
                                    output_error_bound=bound, eta=max(cert.eta, ch.eta),
                                    engine=f"{cert.engine} + {ch.engine} (heavy rows)")
