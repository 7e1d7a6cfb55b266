"""Radii a certificate could use for one attention call: plain, after centring, and with the heaviest tokens exact.

With x = s⟨q_i, k_j⟩ and any centres c_q, c_k,

    s⟨q, k⟩ = s⟨q − c_q, k − c_k⟩ + s⟨q, c_k⟩ + s⟨c_q, k⟩ − s⟨c_q, c_k⟩.

The term s⟨q_i, c_k⟩ − s⟨c_q, c_k⟩ depends on the row alone and cancels in the softmax; s⟨c_q, k_j⟩ is a
per-key log-weight that can be applied exactly. So a polynomial only has to cover the centred logits, and by
Cauchy–Schwarz

    R   = s·max_i ‖q_i‖·max_j ‖k_j‖                        (what the data certificate uses today)
    R_c = s·max_i ‖q_i − c_q‖·max_j ‖k_j − c_k‖,           c_q = mean of the queries, c_k = mean of the keys that take part
    R_h = s·max_{i ∉ H_q} ‖q_i − c_q‖·max_{j ∉ H_k} ‖k_j − c_k‖

where H_q, H_k are the h queries and h keys of largest centred norm: pairs with a heavy query or a heavy key are
computed exactly, the rest by the polynomial at R_h. These are statistics of the inputs only (no attention is run).

Cost: O(n·d) per call (norms, means, a partial sort).
"""

from __future__ import annotations

import torch


def radii(q: torch.Tensor, k: torch.Tensor, scale: float, key_mask: torch.Tensor | None = None,
          heavy: tuple[int, ...] = (2, 8)) -> dict:
    """{"R": R, "R_centred": R_c, "R_heavy{h}": R_h for h in ``heavy``} for one call.

    ``q``: (..., n_q, d) and ``k``: (..., n_k, d) with the same leading dims (one attention call); the centres
    and the heavy tokens are taken per batch entry (each entry is its own softmax), the maxima over the whole
    call. ``key_mask`` (bool, broadcastable to k's leading shape + (n_k,)) marks the keys that take part —
    masked keys count towards neither c_k nor the radii. ``heavy``: the h of each R_h (per entry; an entry
    with no more than h queries or keys is then computed exactly and contributes nothing).
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    if q.dim() < 2 or k.dim() < 2 or q.shape[-1] != k.shape[-1] or q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"q and k must be (..., n, d) with the same leading dims and d, got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    if any(h < 0 for h in heavy):
        raise ValueError(f"heavy counts must be >= 0, got {heavy}")
    d = q.shape[-1]
    qs = q.detach().double().reshape(-1, q.shape[-2], d)
    ks = k.detach().double().reshape(-1, k.shape[-2], d)
    keep = (torch.ones(ks.shape[:2], dtype=torch.bool) if key_mask is None
            else torch.broadcast_to(key_mask.bool(), k.shape[:-1]).reshape(ks.shape[:2]))
    if qs.shape[1] == 0 or not bool(keep.any()):
        raise ValueError("q and the taking-part keys must be non-empty")
    out = {"R": 0.0, "R_centred": 0.0, **{f"R_heavy{h}": 0.0 for h in heavy}}
    q_max = {key: 0.0 for key in out}
    k_max = dict(q_max)
    for qe, ke, m in zip(qs, ks, keep):
        if not bool(m.any()):  # no key takes part: the row is zero, no pair is computed
            continue
        ke = ke[m]
        q_max["R"] = max(q_max["R"], float(qe.norm(dim=-1).max()))
        k_max["R"] = max(k_max["R"], float(ke.norm(dim=-1).max()))
        qn = (qe - qe.mean(0)).norm(dim=-1).sort(descending=True).values
        kn = (ke - ke.mean(0)).norm(dim=-1).sort(descending=True).values
        for key, h in [("R_centred", 0)] + [(f"R_heavy{h}", h) for h in heavy]:
            if h < len(qn) and h < len(kn):
                q_max[key] = max(q_max[key], float(qn[h]))
                k_max[key] = max(k_max[key], float(kn[h]))
    return {key: scale * q_max[key] * k_max[key] for key in out}
