"""Naive references beside the fast engines: the explicit n_q × n_k forms, small and slow on purpose.

:func:`feature_attention` is what every feature engine (:mod:`attnbound.engines.features`,
:mod:`attnbound.engines.fused`) computes, written as the dense weight matrix

    W_ij = P(⟨q_i, k_j⟩)·exp(b_j − m_i)   over the keys j row i sees,   out = W V / W 1,

with m_i the largest per-key log-weight b_j row i sees (0 without ``key_log_weight``); rows that see no
key return zeros. It is the comparison the engines' tests make at every tile, chunk and shard
boundary. Exact attention's naive form is :func:`attnbound.engines.reference.dense_attention`.
Cost Θ(n_q·n_k·(d + g + d_v)) time and Θ(n_q·n_k) memory, in float64.
"""

from __future__ import annotations

import torch


def feature_attention(q, k, v, coeffs, *, key_log_weight=None, is_causal=False) -> torch.Tensor:
    """Σ_j P(⟨q_i,k_j⟩)·exp(b_j − m_i)·v_j / Σ_j P(⟨q_i,k_j⟩)·exp(b_j − m_i) over visible j, in float64."""
    x = q.double() @ k.double().transpose(-1, -2)
    p = sum(float(c) * x**j for j, c in enumerate(coeffs))
    n_q, n_k = x.shape[-2], x.shape[-1]
    b = torch.zeros(x.shape[:-2] + (1, n_k), dtype=torch.float64) if key_log_weight is None else \
        key_log_weight.double().unsqueeze(-2).expand(*x.shape[:-2], 1, n_k)
    b = b.expand(*x.shape)
    visible = torch.ones(x.shape, dtype=torch.bool)
    if is_causal:
        visible = visible & torch.ones(n_q, n_k, dtype=torch.bool).tril()
    visible = visible & torch.isfinite(b)
    bm = torch.where(visible, b, torch.tensor(-torch.inf, dtype=torch.float64))
    m = bm.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.where(visible, p * torch.exp(bm - m), torch.zeros_like(p))
    den = w.sum(-1, keepdim=True)
    return (w @ v.double()) / torch.where(den > 0, den, torch.ones_like(den))
