"""Reverse mode through the monomial map: the backward of the fused feature kernels (Baur–Strassen; the
almost-linear gradient of Alman–Song, NeurIPS 2024).

Forward (:mod:`attnbound.engines.fused`): num = φ(Q)·S with S = diag(w)·φ(K)ᵀ·VV (VV = [V, 1], possibly
weighted per key), or causally num_i = φ(q_i)·S_i with S_i the state of keys j ≤ i. For the upstream dnum:

    dS   = φ(Q)ᵀ·dnum                          (the key-state kernel on (Q, dnum), unit weights)
    dVV  = φ(K)·(w ⊙ dS)                        (the readout kernel)
    dq_i = J_φ(q_i)ᵀ·(S·dnum_i)                 (:func:`_vjp_rows`: reverse mode through the monomial tree)
    dk_j = J_φ(k_j)ᵀ·((w ⊙ dS)·vv_j)

Each monomial is its parent times one coordinate (φ_α = φ_{p(α)}·x_{v(α)}), so the adjoint walk visits the
monomials in reverse order with ā_{p(α)} += ā_α·x_{v(α)} and dx_{v(α)} += ā_α·φ_{p(α)}: 2r multiply-adds per
row after the r·C of S·dnum_i. Causal: row i reads the state of the keys before its tile (S, carried forward),
key j the state of the queries after its tile (T = Σ φ(q_i)·dnum_iᵀ, carried backward), and the pairs inside a
tile are exact through P'(⟨q_i, k_j⟩) (Horner on the derivative's coefficients, the same real number as the
monomial sum); dVV is the fused causal readout run on the reversed sequence with the roles of q and k swapped.

Cost: about two forward passes (key state + readout) plus two row walks of 2·r·C + 3r operations: the backward
is a small constant times the forward. With ``create_graph=True`` (second derivatives) the backward is instead
autograd through the reference the caller passes (:func:`attnbound.engines.features.reference_readout`). Memory beyond inputs and outputs: the r × C states S, dS (and, causal,
S and T per batch row), one r-vector pair per thread — never an n × r activation.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import fused
from .monomials import feature_rank, gather_plan, polynomial_of_weights

try:
    import numba
    from numba import njit, prange
except Exception:  # pragma: no cover - numba is a dependency; fused.available() says why it is missing
    numba = None

ROW_TILE = 32  # rows per work item of the row walk: two r × 32 blocks (monomials, adjoints) stay in L2
CAUSAL_TILE = 32  # rows per causal tile: the exact triangle costs T·(d + g + C) per row


def tree(d: int, degree: int) -> tuple[np.ndarray, np.ndarray]:
    """(parent, variable) of every monomial in the engine order (index 0, the constant, has parent −1)."""
    r = feature_rank(d, degree)
    parent = np.full(r, -1, dtype=np.int64)
    var = np.zeros(r, dtype=np.int64)
    off = 1
    for parents, variables in gather_plan(d, degree, "cpu"):
        c = parents.numel()
        parent[off:off + c] = parents.numpy()
        var[off:off + c] = variables.numpy()
        off += c
    return parent, var


if numba is not None:
    @njit(fastmath=True, boundscheck=False, cache=True, inline="always")
    def _load(x, b, t0, tl, out):  # pragma: no cover - compiled
        """out[:, t] = x[b, t0 + t, :] (a tile, transposed so the loops over t are contiguous)."""
        for t in range(tl):
            for e in range(x.shape[2]):
                out[e, t] = x[b, t0 + t, e]

    @njit(fastmath=True, boundscheck=False, cache=True, inline="always")
    def _load_tile(q, k, vv, dn, b, t0, tl, qt, kt, vt, dt):  # pragma: no cover - compiled
        """The causal tile's q, k, [v, 1] and dnum rows, transposed."""
        _load(q, b, t0, tl, qt)
        _load(k, b, t0, tl, kt)
        _load(vv, b, t0, tl, vt)
        _load(dn, b, t0, tl, dt)

    @njit(fastmath=True, boundscheck=False, cache=True, inline="always")
    def _monomials(xt, tl, parent, var, m):  # pragma: no cover - compiled
        """m[a, t] = φ_a(x_t): each monomial its parent times one coordinate."""
        for t in range(tl):
            m[0, t] = 1.0
        for a in range(1, m.shape[0]):
            pa = parent[a]
            vi = var[a]
            for t in range(tl):
                m[a, t] = m[pa, t] * xt[vi, t]

    @njit(fastmath=True, boundscheck=False, cache=True, inline="always")
    def _projected_adjoint(M, b, yt, tl, scale, ab, m, xt, parent, var, gt):  # pragma: no cover - compiled
        """_project then _adjoint in one walk: monomial a's adjoint is its own projection scale[a]·M[b, a]·y_t plus
        what its children (later in the order, so already visited) passed up in ab[a]."""
        for a in range(ab.shape[0]):
            for t in range(tl):
                ab[a, t] = 0.0
        for a in range(ab.shape[0] - 1, 0, -1):
            for c in range(yt.shape[0]):
                mac = M[b, a, c] * scale[a]
                for t in range(tl):
                    ab[a, t] += mac * yt[c, t]
            pa = parent[a]
            vi = var[a]
            for t in range(tl):
                g = ab[a, t]
                gt[vi, t] += g * m[pa, t]
                ab[pa, t] += g * xt[vi, t]

    @njit(fastmath=True, boundscheck=False, cache=True, inline="always")
    def _accumulate(S, m, yt, tl, scale):  # pragma: no cover - compiled
        """S[a, c] += scale[a]·Σ_t m[a, t]·y_t[c]."""
        for a in range(S.shape[0]):
            for c in range(S.shape[1]):
                s = 0.0
                for t in range(tl):
                    s += m[a, t] * yt[c, t]
                S[a, c] += scale[a] * s

    @njit(fastmath=True, boundscheck=False, cache=True, inline="always")
    def _store(gt, out, b, t0, tl):  # pragma: no cover - compiled
        for t in range(tl):
            for e in range(gt.shape[0]):
                out[b, t0 + t, e] += gt[e, t]

    @njit(parallel=True, fastmath=True, boundscheck=False, cache=True)
    def _vjp_rows(x, M, Y, scale, parent, var, T, out):  # pragma: no cover - compiled
        """out[b, i] = J_φ(x_i)ᵀ·(diag(scale)·M_b·Y_i) for x (B, n, d), M (B, r, C), Y (B, n, C); tiles of T rows."""
        B, n, d = x.shape
        r, C = M.shape[1], M.shape[2]
        nt = (n + T - 1) // T
        for p in prange(B * nt):
            b = p // nt
            t0 = (p % nt) * T
            tl = min(T, n - t0)
            xt = np.empty((d, T))
            yt = np.empty((C, T))
            gt = np.zeros((d, T))
            m = np.empty((r, T))
            ab = np.empty((r, T))
            _load(x, b, t0, tl, xt)
            _load(Y, b, t0, tl, yt)
            _monomials(xt, tl, parent, var, m)
            _projected_adjoint(M, b, yt, tl, scale, ab, m, xt, parent, var, gt)
            for t in range(tl):
                for e in range(d):
                    out[b, t0 + t, e] = gt[e, t]

    @njit(parallel=True, fastmath=True, boundscheck=False, cache=True)
    def _causal_grads(q, k, vv, dn, w, dcoef, parent, var, T, dq, dk):  # pragma: no cover - compiled
        """dq, dk of the causal readout (see the module docstring), one batch row per work item."""
        B, n, d = q.shape
        r = w.shape[0]
        C = vv.shape[2]
        gd = dcoef.shape[0] - 1
        ones = np.ones(r)
        for b in prange(B):
            S = np.zeros((1, r, C))
            qt = np.empty((d, T))
            kt = np.empty((d, T))
            vt = np.empty((C, T))
            dt = np.empty((C, T))
            gq = np.empty((d, T))
            gk = np.empty((d, T))
            m = np.empty((r, T))
            ab = np.empty((r, T))
            for i in range(n):
                for e in range(d):
                    dq[b, i, e] = 0.0
                    dk[b, i, e] = 0.0
            for t0 in range(0, n, T):  # forward scan: queries against the keys of earlier tiles, then the triangle
                tl = min(T, n - t0)
                _load_tile(q, k, vv, dn, b, t0, tl, qt, kt, vt, dt)
                gq[:, :] = 0.0
                gk[:, :] = 0.0
                _monomials(qt, tl, parent, var, m)
                _projected_adjoint(S, 0, dt, tl, ones, ab, m, qt, parent, var, gq)
                for i in range(tl):  # the exact triangle: d/dq P(⟨q, k⟩) = P'(u)·k
                    for j in range(i + 1):
                        u = 0.0
                        for e in range(d):
                            u += qt[e, i] * kt[e, j]
                        h = dcoef[gd]
                        for jj in range(gd - 1, -1, -1):
                            h = h * u + dcoef[jj]
                        gv = 0.0
                        for c in range(C):
                            gv += dt[c, i] * vt[c, j]
                        f = h * gv
                        for e in range(d):
                            gq[e, i] += f * kt[e, j]
                            gk[e, j] += f * qt[e, i]
                _store(gq, dq, b, t0, tl)
                _store(gk, dk, b, t0, tl)
                _monomials(kt, tl, parent, var, m)  # the tile's keys join the state
                _accumulate(S[0], m, vt, tl, w)
            S[0, :, :] = 0.0  # now the state of the queries after the tile
            last = ((n - 1) // T) * T if n > 0 else 0
            for t0 in range(last, -1, -T):
                tl = min(T, n - t0)
                _load_tile(q, k, vv, dn, b, t0, tl, qt, kt, vt, dt)
                gk[:, :] = 0.0
                _monomials(kt, tl, parent, var, m)  # keys against the queries of later tiles
                _projected_adjoint(S, 0, vt, tl, w, ab, m, kt, parent, var, gk)
                _store(gk, dk, b, t0, tl)
                _monomials(qt, tl, parent, var, m)  # the tile's queries join the backward state
                _accumulate(S[0], m, dt, tl, ones)


def _np3(x: torch.Tensor, batch) -> np.ndarray:
    x = x.detach().expand(*batch, *x.shape[-2:])
    return np.ascontiguousarray(x.reshape(-1, *x.shape[-2:]).numpy())


def _reduce(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A gradient over the broadcast batch, summed back to ``like``'s shape."""
    return g.sum_to_size(like.shape) if g.shape != like.shape else g


def vjp_rows(x: torch.Tensor, M: torch.Tensor, Y: torch.Tensor, *, degree: int) -> torch.Tensor:
    """J_φ(x_i)ᵀ·(M·Y_i) for every row (float64, over the broadcast batch of x, M, Y)."""
    batch = torch.broadcast_shapes(x.shape[:-2], M.shape[:-2], Y.shape[:-2])
    B, n, d = math.prod(batch), x.shape[-2], x.shape[-1]
    out = np.empty((B, n, d))
    if B and n:
        parent, var = tree(d, degree)
        _vjp_rows(_np3(x, batch), _np3(M, batch), _np3(Y, batch), np.ones(M.shape[-2]), parent, var, ROW_TILE, out)
    return torch.from_numpy(out).reshape(*batch, n, d)


class FusedFeatures(torch.autograd.Function):
    """num = φ(Q)·diag(w)φ(K)ᵀ·VV (or its causal prefix form) on the fused kernels, with the fused backward."""

    @staticmethod
    def forward(ctx, q, k, vv, weights, degree, is_causal, reference=None):
        qd, kd, vd = q.detach(), k.detach(), vv.detach()
        if is_causal:
            num = fused.causal_readout(qd, kd, vd, degree=degree, weights=weights)
            state = None
        else:
            state = fused.key_state(kd, vd, degree=degree, weights=weights)
            num = fused.state_readout(qd, state, degree=degree)
        ctx.save_for_backward(q, k, vv)
        ctx.state, ctx.weights, ctx.degree, ctx.is_causal = state, weights, degree, is_causal
        ctx.reference = reference
        return num

    @staticmethod
    def backward(ctx, dnum):
        if torch.is_grad_enabled():  # create_graph: a differentiable backward, by autograd through the reference
            return _reference_backward(ctx, dnum)
        q, k, vv = (t.detach() for t in ctx.saved_tensors)
        w, g = ctx.weights, ctx.degree
        dnum = dnum.detach().to(torch.float64).contiguous()
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], vv.shape[:-2], dnum.shape[:-2])
        dq = dk = dvv = None
        if ctx.is_causal:
            B, n, d = math.prod(batch), q.shape[-2], q.shape[-1]
            if ctx.needs_input_grad[2]:
                flip = lambda x: x.expand(*batch, *x.shape[-2:]).flip(-2).contiguous()  # noqa: E731
                dvv = fused.causal_readout(flip(k), flip(q), flip(dnum), degree=g, weights=w).flip(-2)
            if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
                wn = np.ascontiguousarray(w.detach().double().numpy())
                a = polynomial_of_weights(wn, d, g)
                dcoef = np.array([(j + 1) * a[j + 1] for j in range(len(a) - 1)] or [0.0])
                parent, var = tree(d, g)
                dqn, dkn = np.empty((B, n, d)), np.empty((B, n, d))
                if B and n:
                    _causal_grads(_np3(q, batch), _np3(k, batch), _np3(vv, batch), _np3(dnum, batch), wn, dcoef,
                                  parent, var, CAUSAL_TILE, dqn, dkn)
                dq = torch.from_numpy(dqn).reshape(*batch, n, d)
                dk = torch.from_numpy(dkn).reshape(*batch, n, d)
        else:
            ones = torch.ones_like(w)
            ds = fused.key_state(q, dnum, degree=g, weights=ones)  # φ(Q)ᵀ dnum
            wds = ds * w.unsqueeze(-1)
            if ctx.needs_input_grad[2]:
                dvv = fused.state_readout(k, wds, degree=g)
            if ctx.needs_input_grad[0]:
                dq = vjp_rows(q, ctx.state, dnum, degree=g)
            if ctx.needs_input_grad[1]:
                dk = vjp_rows(k, wds, vv, degree=g)
        return (_reduce(dq, q) if dq is not None else None, _reduce(dk, k) if dk is not None else None,
                _reduce(dvv, vv) if dvv is not None else None, None, None, None, None)


def _reference_backward(ctx, dnum):
    """The backward with its own graph (``create_graph=True``: second derivatives): autograd through the reference
    the caller named (``reference(q, k, vv, weights, degree, is_causal) -> num``, the torch feature engine's same
    products)."""
    if ctx.reference is None:
        raise RuntimeError("create_graph through the fused feature kernels needs a reference to differentiate; "
                           "pass reference= to fused_features")
    leaves = list(ctx.saved_tensors)  # with create_graph, these carry the graph to the call's inputs
    with torch.enable_grad():
        num = ctx.reference(*leaves, ctx.weights, ctx.degree, ctx.is_causal)
        wanted = [x for x in leaves if x.requires_grad]
        grads = iter(torch.autograd.grad(num, wanted, dnum, create_graph=True))
    out = [next(grads) if x.requires_grad else None for x in leaves]
    return (*(o if need else None for o, need in zip(out, ctx.needs_input_grad[:3])), None, None, None, None)


def applies(q, k, vv, weights, *, degree: int, is_causal: bool) -> bool:
    """Whether :class:`FusedFeatures` can take the call: the fused kernels available on float64 CPU tensors and,
    causal, the engine's weights (Horner on the triangle)."""
    if numba is None or not fused.runtime_available()[0]:
        return False
    for t in (q, k, vv):
        if t.dtype != torch.float64 or t.device.type != "cpu" or t.layout != torch.strided:
            return False
    if is_causal:
        wn = np.ascontiguousarray(weights.detach().double().numpy())
        if polynomial_of_weights(wn, q.shape[-1], degree) is None:
            return False
    return True


def fused_features(q, k, vv, *, weights: torch.Tensor, degree: int, is_causal: bool, reference=None) -> torch.Tensor:
    """The unnormalised readout num (…, n_q, C) with the fused backward recorded; ``reference`` (the same products in
    differentiable torch operations) serves second derivatives."""
    return FusedFeatures.apply(q, k, vv, weights, degree, is_causal, reference)
