"""The public, SDPA-shaped entry point: :func:`attention` and its two named approximations.

:func:`attention` is a short pipeline of named stages (:mod:`attnbound.pipeline`): validate → statistics
→ plan (an explicit list of tries) → run → certify.

**The contract.** ``out`` is finite, has shape ``(..., n_q, d_v)`` and q's dtype, and
max|out − exact| ≤ ``certificate.output_error_bound``, where exact is the attention of the inputs as
given (real arithmetic). With ``eps`` (any method, fixed degree/order included) the bound is ≤ eps, or
the call raises ValueError saying why and what would meet it. ``certificate.certified`` is False
whenever the bound is infinite; ``certificate.engine`` names the engine that ran. Empty outputs
(n_q = 0, d_v = 0 or an empty batch) return an empty tensor.

**Methods.** ``"exact"``: torch SDPA on the CPU with an any-order rounding certificate
(:mod:`attnbound.engines.sdpa`), otherwise the project's dense kernel for small n, else blockwise
(:mod:`attnbound.engines.reference`); ``"dense"``, ``"blockwise"``: that kernel. ``"taylor"`` (Keles et
al.; ``order`` or ``eps``), ``"polynomial"`` (Alman–Song Chebyshev; ``degree`` or ``eps``),
``"relative"`` (relative-error minimax polynomials; ``degree`` or ``eps``): :mod:`attnbound.families`
on the feature engines. ``"auto"``: the fastest certified for ``eps`` (:func:`attnbound.plan`); when
that is exact and the input dtype's worst-case rounding bound would exceed ``eps``, exact runs in
float64.

**Masks.** ``attn_mask`` is bool (True = take part) or additive float, broadcastable to
``(..., n_q, n_k)``. Approximate methods accept only boolean key-padding masks (broadcastable to
``(..., 1, n_k)``; masked keys do not count towards the radius); ``"auto"`` runs exact for any other
mask. Rows with every key masked return zeros.

**Raises** TypeError/ValueError naming the argument, before any large allocation: non-tensors,
non-floating or mixed dtypes/devices, mismatched shapes, n_k = 0, NaN/Inf, bad scale, unknown
kind/method, causal with n_q ≠ n_k, entries above ``bound``, an uncertifiable request (η ≥ 1, no
degree meets ``eps``), or a feature memory need above the budget.
"""

from __future__ import annotations

import dataclasses

import torch

from . import validation as val
from .certificate import Certificate
from .eager import eager_only
from .gradient import attach
from .pipeline import Options, execute, statistics, tries, validate
from .planner import CostModel


@eager_only
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              is_causal: bool = False, kind: str = "softmax", method: str = "exact", block_size: int | None = None,
              attn_mask: torch.Tensor | None = None, eps: float | None = None, bound: float | None = None,
              degree: int | None = None, order: int | None = None, memory_budget: int | None = None,
              cost_model: CostModel | None = None, strict: bool = True, enable_gqa: bool = False,
              centre: bool | None = None, heavy: int | None = None, grad_eps: float | None = None,
              return_certificate: bool = False):
    r"""Self-attention ``D⁻¹ exp(s·QKᵀ) V``, exactly or with a certified polynomial approximation.

    Args (the contract, methods and masks in detail: :mod:`attnbound.api`):
        q, k, v: ``(..., n_q, d)``, ``(..., n_k, d)``, ``(..., n_k, d_v)``; leading dims broadcast as in
            SDPA; float16/bfloat16 are computed in float32 and returned in the input dtype.
        scale: s (``None``: 1/√d, torch's default; Alman–Song's setting is 1/d). is_causal: row i sees j ≤ i.
        kind: ``"softmax"`` (weights exp(s⟨q,k⟩)) or ``"l2"`` (weights exp(−s‖q−k‖²)).
        method: ``"exact"`` (default), ``"dense"``, ``"blockwise"``, ``"taylor"``, ``"polynomial"``,
            ``"relative"`` or ``"auto"``. block_size: the blockwise method's key block and query chunk.
        attn_mask: bool (True = take part) or additive float mask; approximate methods: key padding only.
        eps: the largest acceptable ‖out − exact‖∞ (families pick the smallest degree that meets it).
        bound: a declared entry bound B on |q|, |k|: radius s·d·B² instead of s·max‖q‖·max‖k‖.
        degree, order: a fixed Chebyshev/relative degree or even Taylor order (instead of ``eps``).
        memory_budget: bytes a call may allocate (default: half the available RAM). cost_model: the planner's.
        strict: with a fixed degree, refuse (default) or run anyway one that cannot be certified (η ≥ 1;
            its certificate then says ``inf``), for demonstrations such as the hardness reductions.
        enable_gqa: grouped-query attention as in SDPA (H_kv divides H_q; K and V never copied per head).
        centre: families: centre q and k (:mod:`attnbound.centring`); ``None``: off, weighed under ``auto``.
        heavy: families: the ``heavy`` keys and queries of largest norm exactly; ``None``: 0, planned under auto.
        grad_eps: the largest acceptable gradient error ‖dX − dX_exact‖∞ (X = q, k, v) of the backward through
            this call: the backward raises ValueError saying why when its bound (:mod:`attnbound.gradient`) exceeds it,
            before q, k and v receive gradients (tensors autograd reaches first — layers after this call — may
            already have theirs: zero the gradients after such an error).
        return_certificate: also return the :class:`~attnbound.Certificate`.

    Returns:
        ``out`` of shape ``(..., n_q, d_v)``, or ``(out, certificate)``. After a backward through ``out``,
        ``certificate.gradient_certificate`` (and :func:`attnbound.last_gradient_certificate`) bounds the
        gradients' distance from exact attention's.
    """
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    opts = Options(scale=scale, is_causal=is_causal, kind=kind, method=method, block_size=block_size, eps=eps,
                   bound=bound, degree=degree, order=order, memory_budget=memory_budget, cost_model=cost_model,
                   strict=strict, centre=centre, heavy=heavy)
    grad_eps = val.check_eps(grad_eps, name="grad_eps")
    if enable_gqa:
        return _grouped(q, k, v, attn_mask, opts, return_certificate, grad_eps)
    out, cert, call = run_call(q, k, v, attn_mask, opts)
    out = attach(out, cert, call, grad_eps=grad_eps)
    return (out, cert) if return_certificate else out


def run_call(q, k, v, attn_mask, opts: Options):
    """(out, certificate, the validated call with its statistics — None for an empty input): the whole of
    :func:`attention` without grouped-query heads, for callers that reuse the call's statistics
    (:mod:`attnbound.integrations.huggingface` builds its per-head records from them)."""
    checked = validate(q, k, v, attn_mask, opts)
    if val.check_empty(q, v, checked.batch):
        out = torch.zeros((*checked.batch, q.shape[-2], v.shape[-1]), dtype=q.dtype, device=q.device)
        return out, Certificate(method=opts.method, kind=opts.kind, eps=checked.eps), None
    call = statistics(q, k, v, checked, opts)
    out, cert = execute(call, tries(call, opts))
    return out, cert, call


def _grouped(q, k, v, attn_mask, opts: Options, return_certificate: bool, grad_eps: float | None = None):
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
    g, n_q, is_causal = h_q // h_kv, q.shape[-2], opts.is_causal
    options = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name != "is_causal"}
    mask = attn_mask
    per_head = mask is not None and mask.dim() >= 3 and mask.shape[-3] == h_q and h_q > 1
    if not is_causal and not per_head and (mask is None or mask.dim() < 2 or mask.shape[-2] == 1):
        qg = q.reshape(*q.shape[:-3], h_kv, g * n_q, q.shape[-1])
        res = attention(qg, k, v, attn_mask=mask, is_causal=False, return_certificate=return_certificate,
                        grad_eps=grad_eps, **options)
        out = res[0] if return_certificate else res
        out = out.reshape(*out.shape[:-3], h_q, n_q, out.shape[-1])
        return (out, res[1]) if return_certificate else out
    qg = q.unflatten(-3, (h_kv, g))
    if mask is not None and mask.dim() >= 3:
        mask = mask.unflatten(-3, (h_kv, g)) if per_head else mask.unsqueeze(-3)
    res = attention(qg, k.unsqueeze(-3), v.unsqueeze(-3), attn_mask=mask, is_causal=is_causal,
                    return_certificate=return_certificate, grad_eps=grad_eps, **options)
    out = res[0] if return_certificate else res
    out = out.flatten(-4, -3)
    return (out, res[1]) if return_certificate else out


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
