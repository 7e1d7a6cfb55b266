"""How far is an attention output from exact? :func:`measure_error` for any library's output.

    error = max_{b, i, c} |out_bic − Att(Q, K, V)_bic|,   Att = D⁻¹ exp(s·QKᵀ + M) V

over every query row i that sees at least one key. The reference Att is computed in float64 by
online softmax over key blocks (:func:`attnbound.engines.reference.blockwise_attention`): Θ(n_q·n_k·(d + d_v))
operations per batch entry, and O((n_q + n_k)·(d + d_v)) memory for the float64 copies plus
O(block·(block + n_k)) per batch entry for the tiles and the row-visibility check — never an
n_q × n_k matrix. The float64 reference itself is within a few hundred units of float64 rounding
(~1e-14 relative to max|v|) of the real-number value, far below any error worth measuring in
float32/16.

Layout. ``layout="bhnd"`` (the default, as torch SDPA): q (..., H, n_q, d), k (..., H, n_k, d),
v (..., H, n_k, d_v), out (..., H, n_q, d_v) — any leading dims that broadcast.
``layout="bnhd"`` (flash-attn, xformers, most model code before the head transpose): exactly 4-D
q (B, n_q, H, d), k (B, n_k, H, d), v (B, n_k, H, d_v), out (B, n_q, H, d_v). Mixing the two is
the classic mistake; shapes that only fit the other layout raise a ValueError saying so, and when
both layouts fit (self-attention, n_q = n_k) but ``out`` matches exact attention far better under
the other one, that raises too (``check_layout=False`` measures as given).

Masks follow torch SDPA in both layouts: ``attn_mask`` broadcastable to (..., H, n_q, n_k), bool
True = takes part, float added to the logits. Rows whose keys are all masked out have no exact
value (torch SDPA returns NaN there, attnbound zeros) and are left out.
"""

from __future__ import annotations

import math

import torch

from . import validation as val
from .engines.reference import blockwise_attention

LAYOUTS = ("bhnd", "bnhd")
LAYOUT_SHAPES = {"bhnd": "(batch, heads, n, d)", "bnhd": "(batch, n, heads, d)"}


def _shapes(out, q, k, v, layout):
    return ", ".join(f"{n} {tuple(x.shape)}" for n, x in (("out", out), ("q", q), ("k", k), ("v", v)))


def _fits(out, q, k, v, layout: str, enable_gqa: bool) -> str | None:
    """None when the shapes fit ``layout``; otherwise why not."""
    if layout == "bnhd":
        if not all(x.dim() == 4 for x in (out, q, k, v)):
            return "layout='bnhd' needs 4-D tensors (batch, n, heads, d)"
        out, q, k, v = (x.transpose(1, 2) for x in (out, q, k, v))
    if not all(x.dim() >= 2 for x in (out, q, k, v)):
        return "every tensor needs at least 2 dims (n, d)"
    if q.shape[-1] != k.shape[-1]:
        return f"q and k must share the head dim d, got {q.shape[-1]} and {k.shape[-1]}"
    if k.shape[-2] != v.shape[-2]:
        return f"k and v must share the key length n_k, got {k.shape[-2]} and {v.shape[-2]}"
    if k.shape[-2] == 0:
        return "k and v must hold at least one key"
    hq, hk = (q.shape[-3] if q.dim() >= 3 else 1), (k.shape[-3] if k.dim() >= 3 else 1)
    if enable_gqa and hq != hk and not (hk > 0 and hq % hk == 0 and k.shape[-3] == v.shape[-3]):
        return f"enable_gqa needs the query heads ({hq}) to be a multiple of the key/value heads ({hk})"
    if enable_gqa and hq != hk:
        k, v = _repeat_heads(k, hq // hk), _repeat_heads(v, hq // hk)
    try:
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError:
        return "the leading (batch, heads) dims of q, k, v do not broadcast"
    want = (*batch, q.shape[-2], v.shape[-1])
    if tuple(out.shape) != want:
        return f"out should have shape {want} (batch dims, n_q, d_v), got {tuple(out.shape)}"
    return None


def _repeat_heads(x, rep):
    return x.repeat_interleave(rep, dim=-3)


def _to_bhnd(out, q, k, v, layout, enable_gqa):
    if layout == "bnhd":
        out, q, k, v = (x.transpose(1, 2) for x in (out, q, k, v))
    if enable_gqa and q.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = _repeat_heads(k, rep), _repeat_heads(v, rep)
    return out, q, k, v


def _max_error(out, q, k, v, s, kind, is_causal, mask, block) -> float:
    """max over visible rows of |out − exact|, with exact in float64 (inputs in the bhnd layout)."""
    dev = q.device
    qd, kd, vd = q.double(), k.double(), v.double()
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    n_q, n_k = q.shape[-2], k.shape[-2]
    if mask is not None:
        mask = mask.to(torch.float64) if mask.is_floating_point() else mask
        mask = mask.expand(*batch, n_q, n_k)  # a view
    exact = blockwise_attention(qd, kd, vd, scale=s, kind=kind, is_causal=is_causal, attn_mask=mask,
                                block_size=block)
    outd = out.to(device=dev, dtype=torch.float64).expand(*batch, n_q, v.shape[-1])
    worst = 0.0
    for i0 in range(0, n_q, block):
        i1 = min(i0 + block, n_q)
        diff = (outd[..., i0:i1, :] - exact[..., i0:i1, :]).abs()
        if mask is not None or is_causal:
            seen = torch.ones((*batch, i1 - i0, n_k), dtype=torch.bool, device=dev)
            if mask is not None:
                part = mask[..., i0:i1, :]
                seen = seen & (part if part.dtype == torch.bool else ~torch.isneginf(part))
            if is_causal:
                rows = torch.arange(i0, i1, device=dev).unsqueeze(-1)
                seen = seen & (torch.arange(n_k, device=dev) <= rows)
            diff = diff.masked_fill(~seen.any(-1, keepdim=True), 0.0)
        if not bool(torch.isfinite(diff).all()):
            return math.inf
        if diff.numel():
            worst = max(worst, float(diff.max()))
    return worst


def measure_error(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  scale: float | None = None, is_causal: bool = False, attn_mask: torch.Tensor | None = None,
                  kind: str = "softmax", layout: str = "bhnd", enable_gqa: bool = False,
                  block_size: int = 1024, check_layout: bool = True) -> float:
    """The max-abs error ‖out − exact‖∞ of an attention output from any library, in float64.

    Args:
        out: the output to judge. q, k, v: the inputs that produced it. In ``layout="bhnd"``
            (default; torch SDPA's): ``(..., H, n, d)``; in ``layout="bnhd"`` (flash-attn's):
            ``(B, n, H, d)``. out has q's shape with d_v in place of d.
        scale: s in exp(s·⟨q, k⟩); None means 1/√d (torch's default).
        is_causal: row i sees keys j ≤ i (n_q = n_k).
        attn_mask: bool (True = takes part) or additive float, broadcastable to (..., H, n_q, n_k)
            (SDPA's convention, in either layout).
        kind: ``"softmax"`` or ``"l2"`` (weights exp(−s‖q − k‖²)).
        enable_gqa: k and v may have fewer heads than q (each shared by H_q/H_kv query heads,
            consecutive as in SDPA's ``enable_gqa``).
        block_size: key block and query chunk of the float64 reference.
        check_layout: raise when ``out`` matches exact attention far better under the other layout.

    Returns:
        max |out − exact| over every entry of every query row that sees at least one key
        (``inf`` when ``out`` holds NaN or Inf there).

    Cost: Θ(n_q·n_k·(d + d_v)) float64 operations per batch entry, twice when the layout check
    has to try the other layout; memory as in the module docstring (no n_q × n_k matrix).

    Raises:
        TypeError/ValueError naming the argument: non-tensors, non-floating dtypes, shapes that do
        not fit the layout (saying when they fit the other one), a transposed layout, bad scale,
        kind or mask, NaN/Inf in q, k or v.
    """
    for name, x in (("out", out), ("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    val.check_choice("layout", layout, LAYOUTS)
    val.check_choice("kind", kind, val.KINDS)
    val.check_positive_int("block_size", block_size, allow_none=False)
    why = _fits(out, q, k, v, layout, enable_gqa)
    if why is not None:
        other = LAYOUTS[1 - LAYOUTS.index(layout)]
        hint = (f"; the shapes fit layout={other!r} {LAYOUT_SHAPES[other]}: pass layout={other!r}"
                if _fits(out, q, k, v, other, enable_gqa) is None else "")
        raise ValueError(f"layout={layout!r} {LAYOUT_SHAPES[layout]}: {why} ({_shapes(out, q, k, v, layout)}){hint}")
    o, qb, kb, vb = _to_bhnd(out, q, k, v, layout, enable_gqa)
    qb, kb, vb = qb.double(), kb.double(), vb.double()
    val.check_qkv(qb, kb, vb, is_causal=is_causal)
    if attn_mask is not None:
        val.check_mask(attn_mask, qb, kb)
    s = val.resolve_scale(scale, qb.shape[-1])
    err = _max_error(o, qb, kb, vb, s, kind, is_causal, attn_mask, block_size)
    other = LAYOUTS[1 - LAYOUTS.index(layout)]
    vmax = float(v.detach().abs().max())
    if (check_layout and err > 1e-3 * max(vmax, 1e-300) and attn_mask is None
            and _fits(out, q, k, v, other, enable_gqa) is None):
        o2, q2, k2, v2 = _to_bhnd(out, q, k, v, other, enable_gqa)
        err2 = _max_error(o2, q2.double(), k2.double(), v2.double(), s, kind, is_causal, None, block_size)
        if err2 < err / 10:
            raise ValueError(
                f"layout={layout!r} {LAYOUT_SHAPES[layout]} looks transposed: out matches exact attention with "
                f"max error {err2:.3g} under layout={other!r} {LAYOUT_SHAPES[other]} but {err:.3g} under "
                f"{layout!r}; pass layout={other!r} (or check_layout=False to measure as given)"
            )
    return err
