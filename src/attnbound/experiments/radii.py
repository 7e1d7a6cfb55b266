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

    ``q``: (..., n_q, d) and ``k``: (..., n_k, d), flattened over the leading dims (one call's queries
    and keys); ``key_mask`` (bool, broadcastable to k's leading shape + (n_k,)) marks the keys that take
    part — masked keys count towards neither c_k nor the radii. ``heavy``: the h of each R_h (h < the
    number of queries and of taking-part keys, else R_h = 0: everything exact).
    """
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    if q.dim() < 2 or k.dim() < 2 or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must be (..., n, d) with the same d, got {tuple(q.shape)} and {tuple(k.shape)}")
    d = q.shape[-1]
    qs = q.detach().double().reshape(-1, d)
    if key_mask is not None:
        keep = torch.broadcast_to(key_mask.bool(), k.shape[:-1]).reshape(-1)
        ks = k.detach().double().reshape(-1, d)[keep]
    else:
        ks = k.detach().double().reshape(-1, d)
    if qs.shape[0] == 0 or ks.shape[0] == 0:
        raise ValueError("q and the taking-part keys must be non-empty")
    out = {"R": scale * float(qs.norm(dim=-1).max()) * float(ks.norm(dim=-1).max())}
    qn = (qs - qs.mean(0)).norm(dim=-1).sort(descending=True).values
    kn = (ks - ks.mean(0)).norm(dim=-1).sort(descending=True).values
    out["R_centred"] = scale * float(qn[0]) * float(kn[0])
    for h in heavy:
        if h < 0:
            raise ValueError(f"heavy counts must be >= 0, got {h}")
        out[f"R_heavy{h}"] = scale * float(qn[h]) * float(kn[h]) if h < len(qn) and h < len(kn) else 0.0
    return out
