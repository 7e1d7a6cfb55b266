"""Centring and heavy tokens: two exact transformations that shrink the radius the polynomial covers.

**Centring** (docs/theory.md §3). For any centres c_q, c_k and s_eff the scale of the dot product,

    s_eff⟨q_i, k_j⟩ = s_eff⟨q_i − c_q, k_j − c_k⟩ + s_eff⟨q_i, c_k⟩ + s_eff⟨c_q, k_j⟩ − s_eff⟨c_q, c_k⟩.

The second term is constant along row i and cancels in D⁻¹A, the last is a global constant; the third
is a per-key log-weight b_j = s_eff⟨c_q, k_j⟩, applied exactly like ℓ2 attention's −s‖k_j‖² and the
key-padding masks — normalised over the keys each row can see (the feature engine's running maximum).
The polynomial then covers y = s_eff⟨q_i − c_q, k_j − c_k⟩ with |y| ≤ R_c = s_eff·max‖q − c_q‖·max‖k − c_k‖,
and the certificate formula is unchanged. The centres are the means (queries: all rows; keys: the keys
that take part), per batch entry: O(n·d).

**Heavy tokens** (docs/theory.md §3). Let H_k be the h keys of largest centred norm (among those that
take part; ranked by the upper bounds :func:`centred_norms` gives) and H_q the h queries likewise.
Pairs with j ∈ H_k are computed exactly and join the polynomial's row sums on the same scale (each
row's sums are relative to a log-weight the engine reports, and both parts are rescaled by a per-row
maximum so neither overflows); rows i ∈ H_q are computed exactly outright. The rest is the polynomial at
R_light = s_eff·max_{i∉H_q}‖q_i − c_q‖·max_{j∉H_k}‖k_j − c_k‖. Exact weights carry only rounding, so
the certificate holds with η(R_light). Cost: O(h·(n_q + n_k)·(d + d_v)) on top of the polynomial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .stats import row_norms


@dataclass(frozen=True)
class Split:
    """How one call's radius was shrunk: the centres, the heavy indices, and the norms the light pairs reach."""

    c_q: torch.Tensor | None  # (..., 1, d) or None (not centred)
    c_k: torch.Tensor | None
    heavy_k: torch.Tensor | None  # (..., h) key indices, or None
    heavy_q: torch.Tensor | None  # (..., h) query indices, or None
    q_norm: float  # max ‖q_i − c_q‖ over light queries
    k_norm: float  # max ‖k_j − c_k‖ over light keys that take part


def centred_norms(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Upper bounds on ‖fl64(x_i − c)‖, the norms of the centred rows the engine computes with (float64).

    Float32 x is centred in float32 against c' = fl32(c): each entry of fl32(x_i − c') is (x_ic − c'_c)(1 + δ),
    |δ| ≤ u = 2⁻²⁴ (a difference that falls below float32's normals is exact), so
    ‖x_i − c‖ ≤ ‖fl32(x_i − c')‖/(1 − u) + ‖c' − c‖ (c' − c is exact in float64), and ‖fl64(x_i − c)‖ ≤
    ‖x_i − c‖(1 + 2⁻⁵³); √d·2⁻¹²⁶ more covers differences flushed to zero where subnormals are disabled.
    The factor 1 + 2⁻⁵⁰ covers that and the float64 roundings of this formula itself. No n×d float64
    copy is made unless a difference leaves float32's range (then, and for other dtypes, the rows are
    centred in float64 directly)."""
    x = x.detach()
    if x.dtype != torch.float32:
        return row_norms(x.double() - c)
    c32 = c.to(torch.float32)
    gap = row_norms(c32.double() - c)  # (..., 1): the rounding of the centre, an exact difference
    u = 2.0**-24
    flushed = math.sqrt(x.shape[-1]) * 2.0**-126
    n32 = row_norms(x - c32)
    if not bool(torch.isfinite(n32).all()):  # a difference beyond float32's range: centre in float64
        return row_norms(x.double() - c)
    return (n32 / (1.0 - u) + gap + flushed) * (1.0 + 2.0**-50)


def centres(q: torch.Tensor, k: torch.Tensor, keys: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean query, mean key over the keys that take part), float64, shapes (..., 1, d)."""
    c_q = q.detach().mean(-2, keepdim=True, dtype=torch.float64)
    if keys is None:
        return c_q, k.detach().mean(-2, keepdim=True, dtype=torch.float64)
    kd = k.detach().double()
    w = keys.to(torch.float64).unsqueeze(-1)
    count = w.sum(-2, keepdim=True)
    return c_q, (kd * w).sum(-2, keepdim=True) / torch.where(count > 0, count, torch.ones_like(count))


def splits(q: torch.Tensor, k: torch.Tensor, keys: torch.Tensor | None, *, centre: bool,
           heavies: list[int], rows: tuple | None = None) -> dict[int, Split]:
    """Centre (or not) once, then for every h in ``heavies`` the h keys and queries of largest norm and the
    norms the rest reach: the norms once (centred: :func:`centred_norms`) and one top-k (of the largest h) for all of them. ``rows`` are the
    plain per-row norms (q, k) if the caller has them (:attr:`attnbound.stats.InputStats.rows`)."""
    with torch.no_grad():
        c_q, c_k = centres(q, k, keys) if centre else (None, None)
        if not centre and rows is not None:
            qn, kn = rows
        elif centre:
            qn, kn = centred_norms(q, c_q), centred_norms(k, c_k)
        else:
            qn, kn = row_norms(q), row_norms(k)
        if keys is not None:
            kn = torch.where(keys, kn, torch.full((), -1.0, dtype=kn.dtype, device=kn.device))
        top = max(heavies)
        kv, ki = torch.topk(kn, min(top + 1, kn.shape[-1]), dim=-1)  # sorted, largest first
        qv, qi = torch.topk(qn, min(top + 1, qn.shape[-1]), dim=-1)
        out = {}
        for h in heavies:
            h = min(h, kv.shape[-1] - 1, qv.shape[-1] - 1)
            light = lambda v: max(float(v[..., h].max()), 0.0) if v.numel() else 0.0  # noqa: E731
            out[h] = Split(c_q, c_k, ki[..., :h] if h else None, qi[..., :h] if h else None, light(qv), light(kv))
        return out


def split(q: torch.Tensor, k: torch.Tensor, keys: torch.Tensor | None, *, centre: bool, heavy: int) -> Split:
    """Centre (or not) and pick ``heavy`` keys and queries; report the norms the light pairs reach."""
    return next(iter(splits(q, k, keys, centre=centre, heavies=[heavy]).values()))


def heavy_rows(num: torch.Tensor, ref: torch.Tensor, q1: torch.Tensor, k1: torch.Tensor, vv: torch.Tensor,
               log_w: torch.Tensor | None, heavy_k: torch.Tensor, s_eff: float, is_causal: bool) -> torch.Tensor:
    """Join the exact terms of the heavy keys to the polynomial's row sums.

    ``num`` (..., n_q, d_v + 1) holds Σ_{light j} P·exp(b_j − ref_i)·[v_j, 1]; the heavy terms are
    exp(y_ij + b_j − ref_i)·[v_j, 1] with y_ij = s_eff⟨q1_i, k1_j⟩ (centred inputs), j ≤ i under
    ``is_causal``. Both are scaled by exp(−M_i), M_i = max(0, max_j (y_ij + b_j − ref_i)), so no term overflows. Terms of the polynomial part that underflow by this rescale were below e^{−745}
    of the row's largest heavy term: the certificate's key-weight underflow term covers them.
    """
    batch = torch.broadcast_shapes(q1.shape[:-2], k1.shape[:-2], vv.shape[:-2], heavy_k.shape[:-1])
    idx = heavy_k.expand(*batch, heavy_k.shape[-1])
    kh = torch.gather(k1.expand(*batch, *k1.shape[-2:]), -2, idx.unsqueeze(-1).expand(*idx.shape, k1.shape[-1]))
    vh = torch.gather(vv.expand(*batch, *vv.shape[-2:]), -2, idx.unsqueeze(-1).expand(*idx.shape, vv.shape[-1]))
    t = s_eff * (q1 @ kh.transpose(-1, -2))  # (..., n_q, h)
    if log_w is not None:
        t = t + torch.gather(log_w.expand(*batch, log_w.shape[-1]), -1, idx).unsqueeze(-2)
    t = t - ref
    if is_causal:
        rows = torch.arange(q1.shape[-2], device=q1.device).unsqueeze(-1)
        t = torch.where(idx.unsqueeze(-2) <= rows, t, torch.full((), -math.inf, dtype=t.dtype, device=t.device))
    # the light sums are relative to weight 1 (their largest key) when the row sees a light key at all;
    # a row that sees only heavy keys is scaled by its largest heavy term, or every term could underflow
    light = torch.where(num[..., -1:] > 0, torch.zeros((), dtype=t.dtype, device=t.device),
                        torch.full((), -math.inf, dtype=t.dtype, device=t.device))
    m = torch.maximum(t.detach().amax(-1, keepdim=True), light)  # a shift: no gradient through it
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return num * torch.exp(light - m) + torch.exp(t - m) @ vh  # exp(light − m) ≤ 1, and 0 for rows without light
