"""Exact attention: the reference every approximation is measured against (docs/theory.md §1).

    Att(Q, K, V) = D⁻¹ A V,   A_ij = exp(s·⟨q_i, k_j⟩ + b_ij),   D = diag(A·1)

Dot-product (``kind="softmax"``) attention has b = 0. Keles et al.'s ℓ2 attention
(``kind="l2"``) has weights exp(−s‖q_i − k_j‖²) = exp(−s‖q_i‖²)·exp(2s⟨q_i,k_j⟩ − s‖k_j‖²); the
query factor cancels in D⁻¹A, so it is dot-product attention with scale 2s and a per-key shift
b_j = −s‖k_j‖² (the key-shift identity; no n_q×n_k×d difference tensor is ever formed).

Three implementations, same function to rounding. ``method="exact"`` on the CPU calls torch's
fused kernel through :func:`attnbound.engines.sdpa.sdpa_attention` (with its own any-order rounding
certificate, :func:`attnbound.engines.sdpa.sdpa_certificate`); the project's two kernels below serve
``method="dense"``/``"blockwise"``, other devices, and the cases SDPA cannot take within the memory
budget or eps, and are the reference it is tested against:

* :func:`dense_attention` materialises the n_q×n_k score block: Θ(n_q n_k (d + d_v)) time,
  Θ(n_q n_k) memory. For small n.
* :func:`blockwise_attention` walks query chunks × key blocks with the online-softmax
  recurrence (running max m_i, running sum ℓ_i, running output): the same Θ(n_q n_k (d + d_v))
  time, O((q_chunk + block)·(d + d_v) + q_chunk·block) memory per batch entry.

Both subtract the running row maximum, so logits of any finite size do not overflow (callers
shift additive masks by their row maximum first, :func:`attnbound.stats.shift_mask`). A row whose
keys are all masked out returns zeros (torch SDPA returns NaN there); this is documented
behaviour, not an error.
"""

from __future__ import annotations

import torch

DENSE_MAX_ENTRIES = 1 << 24  # batch·n_q·n_k above which method="exact" goes blockwise
DEFAULT_BLOCK = 1024


def key_logit_shift(k: torch.Tensor, scale: float, kind: str) -> tuple[float, torch.Tensor | None]:
    """(effective dot-product scale, per-key additive shift (..., 1, n_k) or None) for ``kind``."""
    if kind == "l2":
        return 2.0 * scale, (-scale * (k * k).sum(-1)).unsqueeze(-2)
    return scale, None


def _apply_mask(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask


def _causal_block_mask(i0: int, i1: int, j0: int, j1: int, device) -> torch.Tensor:
    rows = torch.arange(i0, i1, device=device).unsqueeze(-1)
    cols = torch.arange(j0, j1, device=device).unsqueeze(0)
    return cols <= rows


def dense_attention(q, k, v, *, scale: float, kind: str = "softmax", is_causal: bool = False, attn_mask=None):
    """Exact attention through the full n_q×n_k score matrix (inputs already validated, computed in q.dtype)."""
    s, shift = key_logit_shift(k, scale, kind)
    scores = s * (q @ k.transpose(-1, -2))
    if shift is not None:
        scores = scores + shift
    scores = _apply_mask(scores, attn_mask)
    if is_causal:
        n = q.shape[-2]
        scores = scores.masked_fill(~_causal_block_mask(0, n, 0, n, q.device), float("-inf"))
    m = scores.detach().amax(-1, keepdim=True)  # a shift the output does not depend on: no gradient through it
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m)
    denom = p.sum(-1, keepdim=True)
    out = (p @ v) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out


def blockwise_attention(
    q, k, v, *, scale: float, kind: str = "softmax", is_causal: bool = False, attn_mask=None, block_size=None
):
    """Exact attention by online softmax over key blocks, in query chunks (inputs validated)."""
    block = block_size or DEFAULT_BLOCK
    s, shift = key_logit_shift(k, scale, kind)
    n_q, n_k = q.shape[-2], k.shape[-2]
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    if attn_mask is not None:  # a view: size-1 dims (a (..., 1, n_k) key-padding mask) broadcast, never slice
        attn_mask = attn_mask.expand(*batch, n_q, n_k)
    outs = []
    for i0 in range(0, n_q, block):
        i1 = min(i0 + block, n_q)
        qc = q[..., i0:i1, :]
        m = torch.full((*batch, i1 - i0, 1), float("-inf"), dtype=q.dtype, device=q.device)
        l = torch.zeros((*batch, i1 - i0, 1), dtype=q.dtype, device=q.device)
        acc = torch.zeros((*batch, i1 - i0, v.shape[-1]), dtype=q.dtype, device=q.device)
        j_end = min(n_k, i1) if is_causal else n_k
        for j0 in range(0, j_end, block):
            j1 = min(j0 + block, j_end)
            scores = s * (qc @ k[..., j0:j1, :].transpose(-1, -2))
            if shift is not None:
                scores = scores + shift[..., j0:j1]
            if attn_mask is not None:
                scores = _apply_mask(scores, attn_mask[..., i0:i1, j0:j1])
            if is_causal and j1 > i0:
                scores = scores.masked_fill(~_causal_block_mask(i0, i1, j0, j1, q.device), float("-inf"))
            m, l, acc = online_softmax_step(m, l, acc, scores, v[..., j0:j1, :])
        outs.append(finish_online_softmax(l, acc))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def online_softmax_step(m, l, acc, scores, v_block):
    """Fold one block of logits (..., rows, keys) and its values into the running (max, sum, output)."""
    m_new = torch.maximum(m, scores.detach().amax(-1, keepdim=True))  # a shift: no gradient through it
    m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
    p = torch.exp(scores - m_safe)
    alpha = torch.exp(m - m_safe)
    return m_new, l * alpha + p.sum(-1, keepdim=True), acc * alpha + p @ v_block


def finish_online_softmax(l, acc):
    """acc / l, with rows that saw no key (l = 0) returned as zeros."""
    return acc / torch.where(l > 0, l, torch.ones_like(l))


def use_dense(batch_numel: int, n_q: int, n_k: int) -> bool:
    return batch_numel * n_q * n_k <= DENSE_MAX_ENTRIES
