"""References for the contract tests: the long-double and mpmath ones independent of attnbound.

``long_double_attention`` computes attention of the inputs *as given* in numpy's long double
(64-bit mantissa on x86: 2^11 times finer than float64), from the explicit n_q × n_k weight
matrix: softmax or ℓ2 (direct ‖q − k‖², no key-shift identity), bool masks (True = take part),
additive masks, causal. Rows that see no key return zeros.

``dense_feature_reference`` is the package's naive feature reference
(:func:`attnbound.engines.naive.feature_attention`), the explicit form of what the feature engines
compute: weights P(⟨q_i, k_j⟩)·exp(b_j − max_{j' visible} b_{j'}) over the visible keys, normalised —
the small dense reference each fast path is compared with at tile and chunk boundaries.
"""

from __future__ import annotations

import numpy as np
import torch

from attnbound.engines.naive import feature_attention as dense_feature_reference  # noqa: F401

LD = np.longdouble


def _ld(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).cpu().numpy().astype(LD) if x.dtype != torch.float64 else \
        x.detach().cpu().numpy().astype(LD)


def long_double_weights(q, k, *, scale, kind="softmax", is_causal=False, attn_mask=None, batch=None):
    """(P, q, k) in long double: the normalised weights (..., n_q, n_k) of the visible keys (rows that see none:
    0) and the broadcast inputs."""
    batch = batch if batch is not None else torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    n_q, n_k = q.shape[-2], k.shape[-2]
    qq = np.broadcast_to(_ld(q), (*batch, n_q, q.shape[-1]))
    kk = np.broadcast_to(_ld(k), (*batch, n_k, k.shape[-1]))
    s = LD(scale)
    if kind == "l2":
        diff = qq[..., :, None, :] - kk[..., None, :, :]
        logits = -s * (diff * diff).sum(-1)
    else:
        logits = s * np.einsum("...id,...jd->...ij", qq, kk)
    visible = np.ones(logits.shape, dtype=bool)
    if attn_mask is not None:
        am = attn_mask.detach().cpu()
        m = np.broadcast_to((am if am.dtype == torch.bool else am.double()).numpy(), logits.shape)
        if attn_mask.dtype == torch.bool:
            visible &= m
        else:
            mm = m.astype(LD)
            visible &= np.isfinite(mm)
            # softmax is invariant to a per-row constant: subtract the row's largest mask entry first, or
            # a row of entries near −1e30 would swamp the logits even in long double
            top = np.where(np.isfinite(mm), mm, -np.inf).max(-1, keepdims=True)
            mm = mm - np.where(np.isfinite(top), top, 0)
            logits = logits + np.where(np.isfinite(mm), mm, 0)
    if is_causal:
        visible &= np.tril(np.ones((n_q, n_k), dtype=bool))
    logits = np.where(visible, logits, -np.inf)
    top = logits.max(-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    w = np.where(visible, np.exp(logits - top), 0)
    den = w.sum(-1, keepdims=True)
    return np.where(den > 0, w / np.where(den > 0, den, 1), 0), qq, kk


def long_double_attention(q, k, v, *, scale, kind="softmax", is_causal=False, attn_mask=None) -> np.ndarray:
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    p, _, _ = long_double_weights(q, k, scale=scale, kind=kind, is_causal=is_causal, attn_mask=attn_mask, batch=batch)
    vv = np.broadcast_to(_ld(v), (*batch, k.shape[-2], v.shape[-1]))
    return np.einsum("...ij,...jc->...ic", p, vv)


def _sum_to(x: np.ndarray, shape) -> np.ndarray:
    """Sum a broadcast gradient back to an input's shape."""
    lead = x.ndim - len(shape)
    x = x.sum(tuple(range(lead))) if lead else x
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axes, keepdims=True) if axes else x


def long_double_gradients(q, k, v, grad_out, *, scale, kind="softmax", is_causal=False, attn_mask=None):
    """(dq, dk, dv) of exact attention of the inputs as given for the upstream ``grad_out``, in long double, from
    the explicit weights: dV = PᵀG, dX = P∘(G Vᵀ − rowsum(G∘O)), dQ/dK through the logits (softmax: s·k, s·q;
    ℓ2: −2s(q − k), 2s(q − k)); the mask gets no gradient."""
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2], grad_out.shape[:-2])
    p, qq, kk = long_double_weights(q, k, scale=scale, kind=kind, is_causal=is_causal, attn_mask=attn_mask,
                                    batch=batch)
    vv = np.broadcast_to(_ld(v), (*batch, k.shape[-2], v.shape[-1]))
    g = np.broadcast_to(_ld(grad_out), (*batch, q.shape[-2], v.shape[-1]))
    o = np.einsum("...ij,...jc->...ic", p, vv)
    dv = np.einsum("...ij,...ic->...jc", p, g)
    dp = np.einsum("...ic,...jc->...ij", g, vv)
    delta = (g * o).sum(-1, keepdims=True)
    dx = p * (dp - delta)
    s = LD(scale)
    if kind == "l2":
        # X = −s‖q − k‖²: ∂X/∂q_i = −2s(q_i − k_j), ∂X/∂k_j = 2s(q_i − k_j)
        dq = -2 * s * (dx.sum(-1, keepdims=True) * qq - np.einsum("...ij,...jc->...ic", dx, kk))
        dk = 2 * s * (np.einsum("...ij,...ic->...jc", dx, qq) - dx.sum(-2)[..., :, None] * kk)
    else:
        dq = s * np.einsum("...ij,...jc->...ic", dx, kk)
        dk = s * np.einsum("...ij,...ic->...jc", dx, qq)
    return _sum_to(dq, tuple(q.shape)), _sum_to(dk, tuple(k.shape)), _sum_to(dv, tuple(v.shape))


def max_error(out: torch.Tensor, ref: np.ndarray) -> float:
    o = _ld(out)
    assert o.shape == ref.shape, (o.shape, ref.shape)
    return float(np.abs(o - ref).max()) if o.size else 0.0


def mpmath_attention(q, k, v, scale, *, attn_mask=None, is_causal=False, dps=80) -> np.ndarray:
    """Attention of 2-D q, k, v at ``dps`` decimal digits (for logits formed by cancellation or underflow)."""
    import mpmath

    Q, K, V = (x.detach().double().numpy() for x in (q, k, v))
    M = None if attn_mask is None else attn_mask.detach().cpu()
    M = None if M is None else (M.numpy() if M.dtype == torch.bool else M.double().numpy())
    out = np.zeros((Q.shape[0], V.shape[1]))
    with mpmath.workdps(dps):
        s = mpmath.mpf(scale)
        for i in range(Q.shape[0]):
            logits = []
            for j in range(K.shape[0]):
                hidden = (is_causal and j > i) or (M is not None and (
                    (M.dtype == bool and not M[i, j]) or (M.dtype != bool and M[i, j] == -np.inf)))
                if hidden:
                    logits.append(None)
                    continue
                x = s * mpmath.fsum(mpmath.mpf(float(a)) * mpmath.mpf(float(b)) for a, b in zip(Q[i], K[j]))
                if M is not None and M.dtype != bool:
                    x += mpmath.mpf(float(M[i, j]))
                logits.append(x)
            if all(x is None for x in logits):
                continue
            top = max(x for x in logits if x is not None)
            w = [mpmath.exp(x - top) if x is not None else 0 for x in logits]
            for c in range(V.shape[1]):
                out[i, c] = float(mpmath.fsum(wj * mpmath.mpf(float(V[j, c])) for j, wj in enumerate(w)) / mpmath.fsum(w))
    return out
