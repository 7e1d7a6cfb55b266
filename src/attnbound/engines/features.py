"""The torch polynomial-feature engine every family runs on (docs/theory.md §2), and the autograd path.

If P(u) = Σ_{j≤g} a_j u^j and u = ⟨q', k'⟩ with q' = α_q·q, k' = α_k·k (α_q α_k = s/R), then

    P(⟨q', k'⟩) = Σ_j a_j Σ_{|α|=j} (j!/α!) q'^α k'^α = ⟨φ(q') ⊙ w, φ(k')⟩

with φ the bare monomials on the *symmetric* basis (multi-indices α with |α| ≤ g) and the
weights w_α = a_{|α|} · |α|!/α! applied once to the key-side state (so negative a_j are fine).
The rank is r(d, g) = Σ_{j≤g} C(d+j−1, j) = C(d+g, g), not the d^g of raw tensor powers.

Then with S = φ(K')ᵀ [V, 1] ∈ ℝ^{r×(d_v+1)} (weighted by w),

    Att̃ = diag(φ(Q') S_{:, d_v})⁻¹ φ(Q') S_{:, :d_v}

costs O((n_q + n_k)·r·(d_v + 1)) time plus O((n_q + n_k)·r) to build features, with
O(chunk·r + r·d_v) memory beyond the inputs: rows are processed in chunks. Causal mode is a
chunked prefix sum: each chunk adds its exact lower-triangular intra-chunk part
((φ(Q'_c) ⊙ w) φ(K'_c)ᵀ ∘ tril) [V_c, 1] to φ(Q'_c) S_prev, then carries S.

Features are built degree by degree without index gathers: if the degree-(j−1) monomials are
ordered by their largest variable, the degree-j monomials whose largest variable is i are
x_i times the first C(i+j−1, j−1) degree-(j−1) monomials — d contiguous row-broadcast
multiplies per degree into a (r, chunk) buffer, then two thin GEMMs for BLAS.
"""

from __future__ import annotations

import math
import numpy as np
import torch

from . import fused, fused_backward, registry  # the fused float64 CPU kernels (and their backward); this module is
# their reference and the autograd path of every other case
from .monomials import feature_rank, monomial_features, monomial_weights

FEATURE_CHUNK_BYTES = 24 << 20  # target size of one (batch, r, chunk) float64 feature block (measured best ~1024 rows at r=3003)


def chunk_rows(batch_numel: int, rank: int, itemsize: int = 8, target_bytes: int = FEATURE_CHUNK_BYTES) -> int:
    """Rows per chunk so that one (batch, r, chunk) feature block is about ``target_bytes``."""
    rows = target_bytes // max(1, batch_numel * rank * itemsize)
    return int(min(4096, max(32, rows)))


def feature_memory_bytes(batch_numel: int, n_q: int, n_k: int, d: int, d_v: int, rank: int, chunk: int,
                         *, is_causal: bool, requires_grad: bool, itemsize: int = 8) -> int:
    """Peak bytes a feature-method call allocates beyond its inputs.

    Float64 copies of q, k, v (and their scaled copies), the weighted values [v, 1], the reused
    (r × chunk) feature blocks, the state, the causal tiles, the per-chunk outputs and their
    concatenation, and the final output; with gradients, the saved features. Checked against the
    measured peak resident memory of real calls in the tests.
    """
    inputs = 2 * batch_numel * (n_q * d + n_k * d + n_k * d_v) * itemsize + 2 * batch_numel * n_k * (d_v + 2) * itemsize
    feats = 3 * batch_numel * rank * chunk * itemsize
    state = 3 * batch_numel * rank * (d_v + 1) * itemsize
    causal = 4 * batch_numel * CAUSAL_TILE * CAUSAL_TILE * itemsize if is_causal else 0
    saved = 2 * batch_numel * rank * (n_q + n_k) * itemsize if requires_grad else 0
    out = 3 * batch_numel * n_q * (d_v + 1) * itemsize
    return int(1.25 * (inputs + feats + state + causal + saved + out))  # 25% for the allocator's slack


def feature_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    coeffs: np.ndarray,
    key_log_weight: torch.Tensor | None = None,
    is_causal: bool = False,
    chunk: int | None = None,
    return_parts: bool = False,
    engine: str | None = None,
) -> torch.Tensor:
    """D̃⁻¹ Ã V for Ã_ij = P(⟨q_i, k_j⟩)·exp(b_j), never forming an n_q×n_k matrix.

    ``q``, ``k`` are already normalised (|⟨q_i, k_j⟩| ≤ 1 is where P is certified), ``coeffs`` are
    P's monomial coefficients a_0..a_g. ``key_log_weight`` b (..., n_k) is a per-key log-weight
    (key-padding masks: 0 or −inf; ℓ2 attention: −s‖k_j‖²). It is normalised over the keys each row
    can see — the maximum over all keys without ``is_causal``, the running prefix maximum with it
    (the state is rescaled when the maximum grows, as in online softmax) — so no row's weights
    underflow because of keys it cannot see. Rows whose weights all vanish (every key masked)
    return zeros. ``return_parts=True`` returns the unnormalised ``(num, ref)`` instead: num (..., n_q, d_v + 1) holds
    Σ_j P·exp(b_j − ref_i)·[v_j, 1], ref (..., n_q | 1, 1) the log-weight each row was normalised by (0
    without ``key_log_weight``), so that exactly computed terms can join the same row sums.
    ``engine``: "fused" or "torch" (default: :func:`registry.choose`, the fused kernels where they apply).
    The naive reference is :func:`attnbound.engines.naive.feature_attention`.
    """
    degree = len(coeffs) - 1
    d, d_v = q.shape[-1], v.shape[-1]
    rank = feature_rank(d, degree)
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    chunk = chunk or chunk_rows(math.prod(batch), rank)
    w = torch.as_tensor(monomial_weights(coeffs, d), dtype=q.dtype, device=q.device)
    vv = weighted_values(v)
    if engine is None or engine == "fused":  # the torch engine takes every call: nothing to check for it
        req = feature_request(q, key_log_weight, is_causal=is_causal, requires_grad=_records_grad(q, k, v))
        if engine is None:
            engine = registry.choose(req)[0]
        elif why := registry.ENGINES["fused"].not_supported_reasons(req):
            raise ValueError(f"engine: fused cannot take this call: {', '.join(why)}")
    grad = _records_grad(q, k, vv, key_log_weight)  # the fused kernels then run with their fused backward
    use_fused = engine == "fused" and (
        fused_backward.applies(q, k, vv, w, degree=degree, is_causal=is_causal) if grad else fused.available(q, k, vv)[0])
    ref = torch.zeros((1, 1), dtype=q.dtype, device=q.device)
    if is_causal:
        if use_fused:
            if key_log_weight is not None:
                # weights 1 or 0 (key padding, heavy keys): the running maximum is 0 from a row's first visible
                # key on (rows before it have no weight at all), so each row's sums are relative to ref = 0 and
                # the weighting is the zeroing of the [v, 1] rows of the keys that do not count
                vv = vv * torch.isfinite(key_log_weight).unsqueeze(-1).to(vv.dtype)
            num = fused_backward.fused_features(q, k, vv, weights=w, degree=degree, is_causal=True,
                                                reference=reference_readout) if grad \
                else fused.causal_readout(q, k, vv, degree=degree, weights=w)
        elif key_log_weight is None:
            num = causal_readout(q, k, vv, degree=degree, weights=w, chunk=chunk)
        else:
            num = _causal_readout_weighted(q, k, vv, degree=degree, weights=w, chunk=chunk,
                                           key_log_weight=key_log_weight, with_reference=True)
            num, ref = num[..., :-1], num[..., -1:]
    else:
        if key_log_weight is not None:
            ref = _safe_max(key_log_weight, -1).unsqueeze(-1)
            vv = vv * torch.exp(key_log_weight.unsqueeze(-1) - ref)
        eng = "fused" if use_fused else "torch"
        if use_fused and grad:
            num = fused_backward.fused_features(q, k, vv, weights=w, degree=degree, is_causal=False,
                                                reference=reference_readout)
        else:
            num = readout_on(eng, q, key_state_on(eng, k, vv, degree=degree, weights=w, chunk=chunk), degree=degree,
                             chunk=chunk)
    if return_parts:
        return num, ref
    return normalize_readout(num, d_v)


def reference_readout(q, k, vv, weights, degree: int, is_causal: bool) -> torch.Tensor:
    """The fused kernels' num in differentiable torch operations (their backward's second derivatives)."""
    chunk = chunk_rows(1, feature_rank(q.shape[-1], degree))
    if is_causal:
        return causal_readout(q, k, vv, degree=degree, weights=weights, chunk=chunk)
    return state_readout(q, key_state(k, vv, degree=degree, weights=weights, chunk=chunk), degree=degree, chunk=chunk)


def key_state_on(engine: str, k, vv, *, degree: int, weights: torch.Tensor, chunk: int) -> torch.Tensor:
    """S = diag(w)·φ(K)ᵀ[V, 1] on ``engine`` ("fused" or "torch"; see :func:`registry.choose`)."""
    if engine == "fused":
        return fused.key_state(k, vv, degree=degree, weights=weights)
    return key_state(k, vv, degree=degree, weights=weights, chunk=chunk)


def readout_on(engine: str, q, state, *, degree: int, chunk: int) -> torch.Tensor:
    """φ(Q)·S on ``engine``."""
    if engine == "fused":
        return fused.state_readout(q, state, degree=degree)
    return state_readout(q, state, degree=degree, chunk=chunk)


def causal_readout_on(engine: str, q, k, vv, *, degree: int, weights: torch.Tensor, chunk: int,
                      state=None) -> torch.Tensor:
    """Row i: φ(q_i)·(S_in + Σ_{j ≤ i} diag(w) φ(k_j)[v_j, 1]ᵀ) on ``engine`` (no key log-weights)."""
    if engine == "fused":
        return fused.causal_readout(q, k, vv, degree=degree, weights=weights, state=state)
    return causal_readout(q, k, vv, degree=degree, weights=weights, chunk=chunk, state=state)


def engine_for(q: torch.Tensor, *tensors: torch.Tensor, is_causal: bool) -> str:
    """The feature engine for unweighted keys on these float64 tensors (fused where it applies)."""
    req = feature_request(q, None, is_causal=is_causal, requires_grad=_records_grad(q, *tensors))
    name = registry.choose(req)[0]
    return name if name != "fused" or fused.available(q, *tensors)[0] else "torch"


def key_weight_kind(key_log_weight: torch.Tensor | None, is_causal: bool) -> str:
    """The mask a feature engine is asked to take: "none", "0/1 key weights" or "key weights" (the 0/1
    test, a pass over the weights, only where it decides something: under ``is_causal``)."""
    if key_log_weight is None:
        return "none"
    return "0/1 key weights" if is_causal and _only_zero_or_minus_inf(key_log_weight) else "key weights"


def feature_request(q: torch.Tensor, key_log_weight: torch.Tensor | None, *, is_causal: bool,
                    requires_grad: bool, dtype: torch.dtype | None = None) -> registry.Request:
    """What a feature call asks of the engines (:mod:`attnbound.engines.registry`): ``dtype`` the one it
    computes in (default q's)."""
    return registry.Request.of("features", q, dtype=dtype, mask=key_weight_kind(key_log_weight, is_causal),
                               causal=is_causal, requires_grad=requires_grad)


def _only_zero_or_minus_inf(x: torch.Tensor) -> bool:
    """Whether every entry of x is 0 or −inf (a 0/1 key weight)."""
    return bool(((x == 0) | torch.isneginf(x)).all())


def _min_denominator(den: torch.Tensor, key_log_weight: torch.Tensor | None, is_causal: bool) -> float:
    """min D̃_i over rows that see a key (rows that see none have D̃_i = 0 exactly and return zeros)."""
    with torch.no_grad():
        den = den.detach()
        if key_log_weight is not None:
            seen = torch.isfinite(key_log_weight)
            seen = torch.cummax(seen.to(torch.uint8), -1).values.bool() if is_causal else seen.any(-1, keepdim=True)
            den = torch.where(seen.expand(den.shape), den, torch.full_like(den, math.inf))
        return float(den.min()) if den.numel() else math.inf


def _safe_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """max over ``dim`` (kept), with 0 where every entry is −inf."""
    m = x.detach().amax(dim, keepdim=True)  # a shift the result does not depend on: no gradient through it
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def weighted_values(v: torch.Tensor, key_weight: torch.Tensor | None = None) -> torch.Tensor:
    """[v, 1] per key, times the key's weight: the right factor of the key state."""
    vv = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    return vv if key_weight is None else vv * key_weight.unsqueeze(-1)


def key_state(k, vv, *, degree: int, weights: torch.Tensor, chunk: int) -> torch.Tensor:
    """S = diag(w)·φ(K)ᵀ[V, 1] of shape (..., r, d_v + 1): everything the queries need of the keys."""
    state = None
    buf = _feature_buffer(k, degree, chunk, vv)
    for j0 in range(0, k.shape[-2], chunk):
        part = monomial_features(k[..., j0 : j0 + chunk, :], degree, out=buf) @ vv[..., j0 : j0 + chunk, :]
        state = part if state is None else state + part
    return state * weights.unsqueeze(-1)


def _feature_buffer(x: torch.Tensor, degree: int, chunk: int, *other: torch.Tensor) -> torch.Tensor | None:
    """One (..., r, chunk) block reused by every chunk of a no-grad pass (None when autograd records through x or
    through a tensor the features multiply, which then saves them)."""
    if _records_grad(x, *other):
        return None
    r = feature_rank(x.shape[-1], degree)
    return torch.empty((*x.shape[:-2], r, min(chunk, x.shape[-2])), dtype=x.dtype, device=x.device)


def state_readout(q, state, *, degree: int, chunk: int) -> torch.Tensor:
    """φ(Q)·S, chunk by chunk: the unnormalised output and, in its last column, the row sums.

    Each chunk computes Sᵀ·φ (a thin (d_v+1) × chunk block) into its slice of one output buffer,
    so the (r × chunk) features are never transposed into a copy.
    """
    buf = _feature_buffer(q, degree, chunk, state)
    batch = torch.broadcast_shapes(q.shape[:-2], state.shape[:-2])
    st = state.transpose(-1, -2)
    if buf is None:
        outs = [(st @ monomial_features(q[..., i0:i0 + chunk, :], degree)).transpose(-1, -2)
                for i0 in range(0, q.shape[-2], chunk)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, -2)
    out = torch.empty((*batch, state.shape[-1], q.shape[-2]), dtype=state.dtype, device=state.device)
    for i0 in range(0, q.shape[-2], chunk):
        i1 = min(i0 + chunk, q.shape[-2])
        torch.matmul(st, monomial_features(q[..., i0:i1, :], degree, out=buf), out=out[..., i0:i1])
    return out.transpose(-1, -2)


CAUSAL_TILE = registry.ENGINES["torch"].causal_tile  # 64 rows per triangular tile: the n·tile·r intra-tile cost
# against the n·r·d_v state cost (the fused kernels have their own, fused.CAUSAL_TILE)


def causal_readout(q, k, vv, *, degree: int, weights: torch.Tensor, chunk: int, state=None,
                   key_log_weight=None) -> torch.Tensor:
    """Row i sees keys j ≤ i (and everything already in ``state``, the keys before this sequence).

    Features are built ``chunk`` rows at a time; inside a chunk the triangle is walked in tiles of
    ``CAUSAL_TILE`` rows, so the quadratic intra-tile work is n·64·r instead of n·chunk·r.
    With ``key_log_weight`` b, row i weights key j ≤ i by exp(b_j − m_i), m_i = max_{j'≤i} b_{j'}:
    inside a tile explicitly, and through the state, which holds Σ φ(k_j)[v_j, 1]·exp(b_j − m_S) for
    its running maximum m_S ≤ m_i and is read out with the factor exp(m_S − m_i) ≤ 1.
    """
    if key_log_weight is not None:
        return _causal_readout_weighted(q, k, vv, degree=degree, weights=weights, chunk=chunk,
                                        key_log_weight=key_log_weight)
    outs = [] if _records_grad(q, k, vv) else None
    for r0, fq_t, fk_t, vv_t in _causal_tiles(q, k, vv, degree, weights, chunk):
        num = torch.tril(fq_t @ fk_t) @ vv_t
        if state is not None:
            num = num + fq_t @ state
        outs = _put(outs, num, r0, q.shape[-2])
        part = fk_t @ vv_t
        state = part if state is None else state + part
    return _collected(outs)


def _causal_tiles(q, k, vv, degree, weights, chunk):
    """The causal walk: features ``chunk`` rows at a time (in reusable buffers), then tiles of
    ``CAUSAL_TILE`` rows: yields (first row, φ(q) rows, diag(w)·φ(k) columns, [v, 1] rows) per tile."""
    n_q = q.shape[-2]
    bq, bk = _feature_buffer(q, degree, chunk, k, vv), _feature_buffer(k, degree, chunk, q, vv)
    for i0 in range(0, n_q, chunk):
        i1 = min(i0 + chunk, n_q)
        fq, fkw = _chunk_features(q, k, i0, i1, degree, weights, bq, bk)
        for t0 in range(0, i1 - i0, CAUSAL_TILE):
            t1 = min(t0 + CAUSAL_TILE, i1 - i0)
            yield i0 + t0, fq[..., t0:t1, :], fkw[..., :, t0:t1], vv[..., i0 + t0:i0 + t1, :]


def _put(out, rows: torch.Tensor, i0: int, n: int):
    """Collect a tile's rows: into one (..., n, ·) output allocated at the first tile (a list of tiles
    and a final cat would interleave small long-lived blocks with the transient feature blocks and
    fragment the heap), or, while autograd records, into a list for one final cat."""
    if isinstance(out, list):
        out.append(rows)
        return out
    if out is None:
        out = rows.new_empty((*rows.shape[:-2], n, rows.shape[-1]))
    out[..., i0:i0 + rows.shape[-2], :] = rows
    return out


def _records_grad(*xs) -> bool:
    """Whether autograd records through any of ``xs``."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def _collected(outs) -> torch.Tensor:
    return (outs[0] if len(outs) == 1 else torch.cat(outs, -2)) if isinstance(outs, list) else outs


def _chunk_features(q, k, i0, i1, degree, weights, bq, bk):
    """(φ(q_i0..i1) as rows, diag(w)·φ(k_i0..i1) as columns), in the reusable buffers when there are any."""
    fq = monomial_features(q[..., i0:i1, :], degree, out=bq).transpose(-1, -2)
    fk = monomial_features(k[..., i0:i1, :], degree, out=bk)
    return fq, (fk.mul_(weights.unsqueeze(-1)) if bk is not None else fk * weights.unsqueeze(-1))


def _causal_readout_weighted(q, k, vv, *, degree, weights, chunk, key_log_weight, with_reference=False):
    outs = [] if _records_grad(q, k, vv, key_log_weight) else None
    state, ref = None, None  # ref: the state's running maximum m_S (..., 1, 1); −inf while no key counts
    for r0, fq_t, fk_t, vv_t in _causal_tiles(q, k, vv, degree, weights, chunk):
        t = fq_t.shape[-2]
        lw = key_log_weight[..., r0:r0 + t]
        pm = torch.cummax(lw.detach(), -1).values.unsqueeze(-1)  # (..., t, 1): this tile's prefix maxima (shifts)
        if ref is not None:
            pm = torch.maximum(pm, ref)
        pm_safe = torch.where(torch.isfinite(pm), pm, torch.zeros_like(pm))
        tri = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        logits = torch.where(tri, lw.unsqueeze(-2) - pm_safe, torch.full_like(pm_safe, -math.inf))
        num = ((fq_t @ fk_t) * torch.exp(logits)) @ vv_t
        if state is not None:
            num = num + (fq_t @ state) * torch.exp(ref - pm_safe)
        if with_reference:  # the log-weight each row's sums are relative to, as one more column
            num = torch.cat([num, pm_safe.expand(*num.shape[:-1], 1)], -1)
        outs = _put(outs, num, r0, q.shape[-2])
        top = lw.detach().amax(-1, keepdim=True).unsqueeze(-1)
        new_ref = top if ref is None else torch.maximum(ref, top)
        new_safe = torch.where(torch.isfinite(new_ref), new_ref, torch.zeros_like(new_ref))
        part = (fk_t * torch.exp(lw.unsqueeze(-2) - new_safe)) @ vv_t
        state = part if state is None else state * torch.exp(ref - new_safe) + part
        ref = new_ref
    return _collected(outs)


def normalize_readout(num: torch.Tensor, d_v: int) -> torch.Tensor:
    """Numerator / row sum; rows whose weights all vanish (every key masked) return zeros."""
    den = num[..., d_v:]
    return num[..., :d_v] / torch.where(den > 0, den, torch.ones_like(den))
