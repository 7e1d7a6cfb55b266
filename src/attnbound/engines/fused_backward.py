"""Reverse mode through the monomial map: the backward of the fused feature kernels (Baur–Strassen; the
almost-linear gradient of Alman–Song, NeurIPS 2024).

Forward (:mod:`attnbound.engines.fused`): num = φ(Q)·S with S = diag(w)·φ(K)ᵀ·VV (VV = [V, 1], possibly
weighted per key), or causally num_i = φ(q_i)·S_i with S_i the state of keys j ≤ i. For the upstream dnum:

    dS   = φ(Q)ᵀ·dnum                          (the key-state kernel on (Q, dnum), unit weights)
    dVV  = φ(K)·(w ⊙ dS)                        (the readout kernel)
    dq_i = J_φ(q_i)ᵀ·(S·dnum_i)                 (:func:`vjp_rows`: reverse mode through the monomial tree)
    dk_j = J_φ(k_j)ᵀ·((w ⊙ dS)·vv_j)

Each monomial is its parent times one coordinate (φ_α = φ_{p(α)}·x_{v(α)}), so reverse mode gives monomial α the
adjoint ā_α = ⟨M_α, y⟩ + Σ_{children β} ā_β·x_{v(β)} and adds ā_α·φ_{p(α)} into dx_{v(α)}: r·C multiply-adds for the
projections and 3r more per row. The walk is depth first (:func:`_adjoint_walk`): one monomial vector and one adjoint
vector per depth for a tile of rows, in L1, each adjoint closed as soon as its subtree is done.

Causal: row i reads the state of the keys before its tile (S, carried forward) and key j the state of the queries
after its tile (T = Σ φ(q_i)·dnum_iᵀ, carried backward); the pairs inside a tile are exact through P(⟨q_i, k_j⟩)
and P'(⟨q_i, k_j⟩) (Horner on the polynomial's and its derivative's coefficients, the same real numbers as the
monomial sums). dVV_j = φ(k_j)·(w ⊙ T) is read out in the same walk over the keys as dk_j (when only dV is wanted,
the causal forward kernel run on the reversed sequence gives it in two walks). Each sequence is cut into segments
of whole tiles run in parallel, each starting from the key state of the segments before it and the query state of
the segments after it (the forward's key-state kernel, over (nseg − 1)/nseg of the rows for each). The number of
segments follows the thread count, so causal gradients can differ in their last bits between thread counts
(:func:`causal_grads` takes ``segments`` to fix it).

Cost: non-causal, the key state and readout of the forward plus two walks of r·(C + 3) per row; causal, four walks
(two adjoint, two state updates) and one readout per row, plus the segments' incoming states. The kernels are generated per column count C (the state
row's C entries in registers) like the forward's and cached on disk with them. With ``create_graph=True`` (second
derivatives) the backward is instead autograd through the reference the caller passes
(:func:`attnbound.engines.features.reference_readout`). Memory beyond inputs and outputs: the r × C states S, dS
(causal: one S per segment and the segments' incoming states), O((g + d + C)·T) per tile — never an n × r
activation.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import fused
from .fused import _TAB, _block
from .monomials import dfs_order, polynomial_of_weights


ROW_TILE = 128  # rows per work item of the row walk: (g + 1) × 128 monomial and adjoint vectors stay in L1
CAUSAL_TILE = 64  # rows per causal tile: the exact triangle costs T·(d + g + C) per row


# ----------------------------------------------------------------------------------------------
# generated kernels (one set per column count C; a state row's C entries are named locals, as in engines.fused)
#
# The monomials are walked depth first (monomials.dfs_order: each entry's parent is the latest earlier entry one
# degree lower), a tile of T rows keeping one T-vector per depth for the monomials (phi) and one for the adjoints
# (acc), all in L1. Reverse mode needs each monomial's adjoint ā_α = scale_α·⟨M_α, y⟩ + Σ_children ā_child·x_child
# only once its subtree is done: in the depth-first order that is when the next entry is no deeper than it, so an
# entry at depth j first closes (:func:`_close`) the open entries at depths ≥ j — passing ā·x_v up to its parent's
# adjoint and ā·φ_parent into dx_v — and then opens itself. A leaf (degree g) closes at once.


def _proj(C: int, Y: str) -> str:
    return " + ".join(f"m{c} * {Y}[{c}, t]" for c in range(C))


def _close(G: str, X: str, depth: str) -> list[str]:
    return ["u = vs[%s]" % depth,
            "for t in range(tl):",
            _TAB + f"h = acc[{depth}, t]",
            _TAB + f"{G}[u, t] += h * phi[{depth} - 1, t]",
            _TAB + f"acc[{depth} - 1, t] += h * {X}[u, t]"]


def _adjoint_walk(C: int, M: str, scale: str, X: str, Y: str, G: str, O: str | None = None) -> list[str]:
    """G[e, t] += Σ_α (scale_α·Σ_c M[α, c]·Y[c, t])·∂φ_α(x_t)/∂x_e for the tile's rows X (d × T), Y (C × T); with
    ``O`` also the readout O[c, t] += Σ_α φ_α(x_t)·scale_α·M[α, c] (the constant monomial included), same walk.
    (The readout has a loop over the tile of its own: one loop writing O, G and the adjoints is not vectorised.)"""
    loads = "; ".join(f"m{c} = {M}[a, {c}] * sa" for c in range(C))
    read = _block("for t in range(tl):", ["f = phi[j - 1, t] * %s[v, t]" % X]
                  + [f"{O}[{c}, t] += f * m{c}" for c in range(C)]) if O else []
    const = ([f"sa = {scale}[0]", "a = 0", loads, "for t in range(tl):"]
             + [_TAB + f"{O}[{c}, t] += m{c}" for c in range(C)]) if O else []
    return (["for t in range(tl):", _TAB + "phi[0, t] = 1.0", _TAB + "acc[0, t] = 0.0"] + const + ["top = 0"]
            + _block("for m in range(idx.shape[0]):",
                     ["a = idx[m]", "j = dep[m]", "v = var[m]"],
                     _block("while top >= j:", _close(G, X, "top"), ["top -= 1"]),
                     [f"sa = {scale}[a]", loads], read,
                     _block("if j == g:",  # a leaf: its adjoint is its projection, passed on at once
                            _block("for t in range(tl):", [f"h = {_proj(C, Y)}", f"{G}[v, t] += h * phi[j - 1, t]",
                                                           f"acc[j - 1, t] += h * {X}[v, t]"])),
                     _block("else:",
                            _block("for t in range(tl):", [f"phi[j, t] = phi[j - 1, t] * {X}[v, t]",
                                                           f"acc[j, t] = {_proj(C, Y)}"]),
                            ["vs[j] = v", "top = j"]))
            + _block("while top >= 1:", _close(G, X, "top"), ["top -= 1"]))


def _state_walk(C: int, S: str, scale: str, X: str, Y: str) -> list[str]:
    """S[α, c] += scale_α·Σ_t φ_α(x_t)·Y[c, t] for every monomial α (the constant one included)."""
    sums = [f"x{c} += f * {Y}[{c}, t]" for c in range(C)]
    zeros = "; ".join(f"x{c} = 0.0" for c in range(C))
    adds = [f"{S}[a, {c}] += sa * x{c}" for c in range(C)]
    return (["for t in range(tl):", _TAB + "phi[0, t] = 1.0", zeros,
             "for t in range(tl):"] + [_TAB + f"x{c} += {Y}[{c}, t]" for c in range(C)]
            + ["a = 0", f"sa = {scale}[0]"] + adds
            + _block("for m in range(idx.shape[0]):",
                     ["a = idx[m]", "j = dep[m]", "v = var[m]", zeros],
                     _block("if j == g:", _block("for t in range(tl):", [f"f = phi[j - 1, t] * {X}[v, t]"], sums)),
                     _block("else:", _block("for t in range(tl):", [f"f = phi[j - 1, t] * {X}[v, t]",
                                                                    "phi[j, t] = f"], sums)),
                     [f"sa = {scale}[a]"], adds))


_VJP = """
@njit(parallel=True, fastmath=FM, boundscheck=False, cache=CACHE)
def vjp(x, M, Y, scale, idx, dep, var, g, T, out):
    B, n, d = x.shape
    nt = (n + T - 1) // T
    for p in prange(B * nt):
        b = p // nt
        t0 = (p % nt) * T
        tl = min(T, n - t0)
        xt = np.empty((d, T)); yt = np.empty(({C}, T)); gt = np.zeros((d, T))
        phi = np.empty((g + 1, T)); acc = np.empty((g + 1, T)); vs = np.zeros(g + 1, dtype=np.int64)
        for t in range(tl):
            for e in range(d):
                xt[e, t] = x[b, t0 + t, e]
            for c in range({C}):
                yt[c, t] = Y[b, t0 + t, c]
        Mb = M[b]
        <walk>
        for t in range(tl):
            for e in range(d):
                out[b, t0 + t, e] += gt[e, t]
"""


_CAUSAL = """
@njit(parallel=True, fastmath=FM, boundscheck=False, cache=CACHE)
def causal_grads(q, k, vv, dn, w, ones, coef, dcoef, idx, dep, var, g, T, sin, tin, nseg, per, dq, dk, dvv):
    B, n, d = q.shape
    r = w.shape[0]
    gd = dcoef.shape[0] - 1
    gc = coef.shape[0] - 1
    ntiles = (n + T - 1) // T
    for p in prange(B * nseg):
        b = p // nseg
        sgi = p % nseg
        S = np.empty((r, {C}))
        qt = np.empty((d, T)); kt = np.empty((d, T)); vt = np.empty(({C}, T)); dt = np.empty(({C}, T))
        gq = np.empty((d, T)); gk = np.empty((d, T)); ov = np.empty(({C}, T))
        phi = np.empty((g + 1, T)); acc = np.empty((g + 1, T)); vs = np.zeros(g + 1, dtype=np.int64)
        first = sgi * per
        last = min(ntiles, (sgi + 1) * per)
        for a in range(r):
            for c in range({C}):
                S[a, c] = sin[p, a, c]
        for tile in range(first, last):
            t0 = tile * T
            tl = min(T, n - t0)
            <load>
            gq[:, :] = 0.0
            gk[:, :] = 0.0
            ov[:, :] = 0.0
            <query_walk>
            for i in range(tl):
                for j in range(i + 1):
                    u = 0.0
                    for e in range(d):
                        u += qt[e, i] * kt[e, j]
                    h = dcoef[gd]
                    for jj in range(gd - 1, -1, -1):
                        h = h * u + dcoef[jj]
                    f = h * ({pair})
                    for e in range(d):
                        gq[e, i] += f * kt[e, j]
                        gk[e, j] += f * qt[e, i]
                    h = coef[gc]
                    for jj in range(gc - 1, -1, -1):
                        h = h * u + coef[jj]
                    <pair_value>
            for t in range(tl):
                for e in range(d):
                    dq[b, t0 + t, e] += gq[e, t]
                    dk[b, t0 + t, e] += gk[e, t]
                for c in range({C}):
                    dvv[b, t0 + t, c] += ov[c, t]
            <key_state>
        for a in range(r):
            for c in range({C}):
                S[a, c] = tin[p, a, c]
        for tile in range(last - 1, first - 1, -1):
            t0 = tile * T
            tl = min(T, n - t0)
            <load>
            gk[:, :] = 0.0
            ov[:, :] = 0.0
            <key_walk>
            for t in range(tl):
                for e in range(d):
                    dk[b, t0 + t, e] += gk[e, t]
                for c in range({C}):
                    dvv[b, t0 + t, c] += ov[c, t]
            <query_state>
"""

_LOAD = ["for t in range(tl):",
         _TAB + "for e in range(d):",
         _TAB * 2 + "qt[e, t] = q[b, t0 + t, e]",
         _TAB * 2 + "kt[e, t] = k[b, t0 + t, e]",
         _TAB + "for c in range({C}):",
         _TAB * 2 + "vt[c, t] = vv[b, t0 + t, c]",
         _TAB * 2 + "dt[c, t] = dn[b, t0 + t, c]"]


def _source(C: int) -> str:
    head = fused.header("# generated by attnbound.fused_backward: backward kernels for %d columns" % C)
    vjp = fused._frame(_VJP, C, walk=_adjoint_walk(C, "Mb", "scale", "xt", "yt", "gt"))
    pair = " + ".join(f"dt[{c}, i] * vt[{c}, j]" for c in range(C))
    causal = fused._frame(_CAUSAL.replace("{pair}", pair), C, load=[line.replace("{C}", str(C)) for line in _LOAD],
                          query_walk=_adjoint_walk(C, "S", "ones", "qt", "dt", "gq"),
                          key_state=_state_walk(C, "S", "w", "kt", "vt"),
                          key_walk=_adjoint_walk(C, "S", "w", "kt", "vt", "gk", "ov"),
                          pair_value=[f"ov[{c}, j] += h * dt[{c}, i]" for c in range(C)],
                          query_state=_state_walk(C, "S", "ones", "qt", "dt"))
    return "\n".join(head + vjp + [""] + causal) + "\n"


_NAMES = ("vjp", "causal_grads")


def _kernels(C: int):
    """(vjp, causal_grads) for C columns, generated, compiled on first use and cached on disk like the forward's."""
    return fused.generated(C, _source, _NAMES)


def _np3(x: torch.Tensor, batch) -> np.ndarray:
    x = x.detach().expand(*batch, *x.shape[-2:])
    return np.ascontiguousarray(x.reshape(math.prod(batch), *x.shape[-2:]).numpy())


def _reduce(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A gradient over the broadcast batch, summed back to ``like``'s shape."""
    return g.sum_to_size(like.shape) if g.shape != like.shape else g


def _vjp(x: np.ndarray, M: np.ndarray, Y: np.ndarray, degree: int) -> np.ndarray:
    """J_φ(x_i)ᵀ·(M_b·Y_i) for numpy x (B, n, d), M (B, r, C), Y (B, n, C), in column groups."""
    B, n, d = x.shape
    out = np.zeros((B, n, d))
    if B and n:
        idx, dep, var = dfs_order(d, degree)
        size, starts = fused._column_groups(M.shape[-1])
        kern = _kernels(size)[0]
        ones = np.ones(M.shape[-2])
        for c0 in starts:
            kern(x, fused._take(M, c0, size), fused._take(Y, c0, size), ones, idx, dep, var, degree, ROW_TILE, out)
    return out


def vjp_rows(x: torch.Tensor, M: torch.Tensor, Y: torch.Tensor, *, degree: int) -> torch.Tensor:
    """J_φ(x_i)ᵀ·(M·Y_i) for every row (float64, over the broadcast batch of x, M, Y)."""
    batch = torch.broadcast_shapes(x.shape[:-2], M.shape[:-2], Y.shape[:-2])
    out = _vjp(_np3(x, batch), _np3(M, batch), _np3(Y, batch), degree)
    return torch.from_numpy(out).reshape(*batch, x.shape[-2], x.shape[-1])


def causal_grads(q: np.ndarray, k: np.ndarray, vv: np.ndarray, dn: np.ndarray, w: np.ndarray, degree: int,
                 segments: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dq, dk, dvv of the causal readout for numpy (B, n, ·) inputs: each sequence split into segments of whole
    tiles run in parallel, each starting from the weighted key state of the segments before it (forward scan) and
    the query state of the segments after it (backward scan), both from the forward's key_partials kernel.
    ``segments`` (default: enough for every thread, at least 4 tiles each) sets their number."""
    B, n, d = q.shape
    C = vv.shape[-1]
    r = w.shape[0]
    dq, dk, dvv = np.zeros((B, n, d)), np.zeros((B, n, d)), np.zeros((B, n, C))
    if not (B and n):
        return dq, dk, dvv
    a = polynomial_of_weights(w, d, degree)
    if a is None:
        raise ValueError("w: the fused causal backward needs weights of the form w_α = a_{|α|}·|α|!/α! "
                         "(monomials.monomial_weights): the triangle is evaluated by Horner's rule in ⟨q, k⟩")
    dcoef = np.array([(j + 1) * a[j + 1] for j in range(len(a) - 1)] or [0.0])
    T = CAUSAL_TILE
    ntiles = -(-n // T)
    nseg = segments or max(1, min(ntiles // 4, -(-fused._threads() // B)))
    per = -(-ntiles // max(1, min(int(nseg), ntiles)))
    nseg = -(-ntiles // per)
    sin, tin = np.zeros((B, nseg, r, C)), np.zeros((B, nseg, r, C))
    if nseg > 1:
        m = (nseg - 1) * per * T  # the keys before the last segment, the queries after the first
        keys = fused._key_partials(np.ascontiguousarray(k[:, :m]), np.ascontiguousarray(vv[:, :m]), degree,
                                   nseg - 1, per, T).reshape(B, nseg - 1, r, C)
        sin[:, 1:] = np.cumsum(keys * w[:, None], axis=1)
        qs = fused._key_partials(np.ascontiguousarray(q[:, per * T:]), np.ascontiguousarray(dn[:, per * T:]),
                                 degree, nseg - 1, per, T).reshape(B, nseg - 1, r, C)
        tin[:, :-1] = np.cumsum(qs[:, ::-1], axis=1)[:, ::-1]
    sin, tin = sin.reshape(B * nseg, r, C), tin.reshape(B * nseg, r, C)
    idx, dep, var = dfs_order(d, degree)
    size, starts = fused._column_groups(C)
    kern = _kernels(size)[1]
    for c0 in starts:
        take = lambda x: fused._take(x, c0, size)  # noqa: E731
        part = np.zeros((B, n, size))
        kern(q, k, take(vv), take(dn), w, np.ones(r), a, dcoef, idx, dep, var, degree, T, take(sin), take(tin),
             nseg, per, dq, dk, part)
        dvv[..., c0:c0 + size] = part[..., :min(size, C - c0)]
    return dq, dk, dvv


class FusedFeatures(torch.autograd.Function):
    """num = φ(Q)·diag(w)φ(K)ᵀ·VV (or its causal prefix form) on the fused kernels, with the fused backward."""

    @staticmethod
    def forward(ctx, q, k, vv, weights, degree, is_causal, reference=None):
        qd, kd, vd = q.detach(), k.detach(), vv.detach()
        # columns of vv that are zero everywhere give zero columns of num (and nothing to dq, dk): only the others
        # are computed (the certificate's value-gradient sums run on zero values, for their graph)
        live = vd.reshape(-1, vd.shape[-1]).ne(0).any(0) if vd.numel() else torch.ones(vd.shape[-1], dtype=torch.bool)
        cols = None if bool(live.all()) or not bool(live.any()) else live.nonzero().flatten()
        vl = vd if cols is None else vd.index_select(-1, cols)
        if is_causal:
            part = fused.causal_readout(qd, kd, vl, degree=degree, weights=weights)
            state = None
        else:
            state = fused.key_state(kd, vl, degree=degree, weights=weights)
            part = fused.state_readout(qd, state, degree=degree)
        if cols is None:
            num = part
        else:
            num = part.new_zeros(*part.shape[:-1], vd.shape[-1])
            num[..., cols] = part
        ctx.save_for_backward(q, k, vv)
        ctx.state, ctx.weights, ctx.degree, ctx.is_causal, ctx.cols = state, weights, degree, is_causal, cols
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
        if ctx.is_causal and not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            if ctx.needs_input_grad[2]:  # dV alone: the causal readout of the reversed sequence, q and k swapped
                flip = lambda x: x.expand(*batch, *x.shape[-2:]).flip(-2).contiguous()  # noqa: E731
                dvv = fused.causal_readout(flip(k), flip(q), flip(dnum), degree=g, weights=w).flip(-2)
        elif ctx.is_causal:
            n, d = q.shape[-2], q.shape[-1]
            wn = np.ascontiguousarray(w.detach().double().numpy())
            grads = causal_grads(_np3(q, batch), _np3(k, batch), _np3(vv, batch), _np3(dnum, batch), wn, g)
            dq, dk, dvv = (torch.from_numpy(x).reshape(*batch, n, x.shape[-1]) if need else None
                           for x, need in zip(grads, ctx.needs_input_grad[:3]))
        else:
            ones = torch.ones_like(w)
            ds = fused.key_state(q, dnum, degree=g, weights=ones)  # φ(Q)ᵀ dnum
            wds = ds * w.unsqueeze(-1)
            if ctx.needs_input_grad[2]:
                dvv = fused.state_readout(k, wds, degree=g)
            cols = ctx.cols  # dq and dk see only the columns of vv that are not zero (the state holds those)
            live = (lambda x: x) if cols is None else (lambda x: x.index_select(-1, cols))  # noqa: E731
            if ctx.needs_input_grad[0]:
                dq = vjp_rows(q, ctx.state, live(dnum), degree=g)
            if ctx.needs_input_grad[1]:
                dk = vjp_rows(k, live(wds), live(vv), degree=g)
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
    if not fused.runtime_available()[0]:
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
