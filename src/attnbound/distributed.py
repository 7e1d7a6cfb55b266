"""Sequence-parallel attention on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Each of the P ranks of ``group`` holds a contiguous shard of one sequence — rank order is
sequence order, shard lengths n_0, …, n_{P−1} may differ — and gets back its shard of the output:
the same numbers, to rounding, as single-process :func:`attnbound.attention` on the
concatenated sequence, with the same certificate on every rank.

Exact (``method="exact"``): ring attention. The K/V shards travel round the ring (P − 1
``batch_isend_irecv`` steps, each rank sending its current block to rank + 1 while receiving
the next from rank − 1); each rank folds every block into an online softmax (running max, sum
and output) for its own queries, in tiles of ``block_size`` keys, so its memory stays
O(n_r·(d + d_v) + n_r·block). Causal: blocks from later ranks are passed on without compute.
Communication per rank: (P − 1)·(its received shards) ≈ N·(d + d_v)·itemsize bytes — the whole
K and V of the sequence — whatever the method's cost.

Polynomial / Taylor (``method="polynomial" | "taylor"``, ``eps`` or ``degree``/``order``): the
radius must be global, so one ``all_reduce(MAX)`` of (max‖q‖, max‖k‖, per-column max and −min of
V, max|V|) precedes the degree choice, and every rank runs the same polynomial. Each rank builds
its key state S_r = diag(w)·φ(K_r)ᵀ[V_r, 1] (r × (d_v + 1)).
Non-causal: one ``all_reduce(SUM)`` of S. Causal: ``all_gather`` of the states, the exclusive
prefix Σ_{p<r} S_p seeds the local causal pass. Communication per rank: r·(d_v + 1)·8 bytes
(non-causal) or P·r·(d_v + 1)·8 (causal) — independent of n, against N·(d + d_v)·itemsize for
exact: the reason low-rank attention is the one that scales out.

Validation runs on every rank and its outcome is shared (``all_gather_object``) before any
other collective, so bad input on one rank — NaN/Inf, a shape or dtype that differs from the
others — makes every rank raise the same ValueError instead of hanging. The degree follows from
global scalars, so every rank accepts or refuses ``eps`` alike; the memory-budget check, whose
budget may differ per machine, is shared the same way. Only ``kind="softmax"``
and no ``attn_mask`` (use ``is_causal``).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from . import validation as val
from .certificate import exact_certificate
from .engines.features import (causal_readout_on, chunk_rows, engine_for, feature_memory_bytes, key_state_on,
                               normalize_readout, readout_on, weighted_values)
from .engines.monomials import feature_rank, monomial_weights
from .engines.reference import DEFAULT_BLOCK, _causal_block_mask, finish_online_softmax, online_softmax_step
from .families import choose_certificate, degree_certificate, family, fixed_degree, polynomial_setup
from .numerics import finish, normalised, scale_values, times_pow2, unit_values
from .pipeline import Options, check_options
from .planner import default_memory_budget, exact_candidate, exact_eps_reason
from .stats import InputStats, row_norms, value_extremes

METHODS = ("exact",) + val.FEATURE_METHODS
_LAST = {"bytes_sent": 0, "bytes_received": 0, "messages": 0}


def last_communication() -> dict:
    """Bytes this rank sent and received (and messages) in its last :func:`attention` call."""
    return dict(_LAST)


def _count(sent: int, received: int, messages: int = 1, world: int = 2):
    if world == 1:  # a collective over one process moves nothing
        return
    _LAST["bytes_sent"] += sent
    _LAST["bytes_received"] += received
    _LAST["messages"] += messages


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    method: str = "exact",
    scale: float | None = None,
    is_causal: bool = False,
    eps: float | None = None,
    degree: int | None = None,
    order: int | None = None,
    bound: float | None = None,
    block_size: int | None = None,
    memory_budget: int | None = None,
    return_certificate: bool = False,
):
    """Attention over a sequence sharded across the ranks of ``group`` (see the module docstring).

    Args:
        q, k, v: this rank's shard, ``(..., n_r, d)``, ``(..., n_r, d)``, ``(..., n_r, d_v)``; the
            leading dims, d, d_v, dtype and device must agree on every rank.
        group: the process group (default: the world).
        method: ``"exact"`` (ring), ``"polynomial"`` (``degree`` or ``eps``) or ``"taylor"``
            (``order`` or ``eps``).
        scale, is_causal, eps, bound, block_size, memory_budget: as in :func:`attnbound.attention`.
        return_certificate: also return the :class:`~attnbound.Certificate` (identical on all ranks).

    Returns:
        this rank's output shard ``(..., n_r, d_v)``, or ``(out, certificate)``.

    Raises:
        ValueError (on every rank) when any rank's input is invalid or the ranks disagree.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("attnbound.distributed.attention needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group, or launch with torchrun)")
    world, me = dist.get_world_size(group), dist.get_rank(group)
    _LAST.update(bytes_sent=0, bytes_received=0, messages=0)
    opts = Options(method=method, scale=scale, is_causal=is_causal, eps=eps, degree=degree, order=order, bound=bound,
                   block_size=block_size, memory_budget=memory_budget)
    lengths = _agree(_check_shard(q, k, v, opts), opts, group, world)
    s = val.resolve_scale(scale, q.shape[-1])
    if method == "exact":
        return _ring(q, k, v, s=s, is_causal=is_causal, lengths=lengths, me=me, world=world, group=group,
                     block=block_size or DEFAULT_BLOCK, eps=eps, return_certificate=return_certificate)
    return _features(q, k, v, s=s, method=method, is_causal=is_causal, lengths=lengths, me=me, world=world,
                     group=group, eps=eps, degree=fixed_degree(method, degree, order), bound=bound,
                     memory_budget=memory_budget, return_certificate=return_certificate)


def _check_shard(q, k, v, opts: Options) -> tuple[str, tuple | None]:
    """(this rank's error message or "", its shard's metadata): the validate stage, without raising, so that
    every rank learns of any rank's error (a rank that raised alone would leave the others waiting)."""
    try:
        if opts.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {opts.method!r}")
        val.check_qkv(q, k, v, is_causal=opts.is_causal)
        if q.shape[-2] != k.shape[-2]:
            raise ValueError(f"q and k must hold the same shard of the sequence: n_q={q.shape[-2]}, n_k={k.shape[-2]}")
        if not isinstance(opts.is_causal, bool):
            raise TypeError(f"is_causal must be a bool, got {type(opts.is_causal).__name__}")
        val.check_positive_int("block_size", opts.block_size)
        val.resolve_scale(opts.scale, q.shape[-1])
        val.check_eps(opts.eps)
        bound = val.check_bound(opts.bound)
        check_options(opts)
        if bound is not None:
            for name, x in (("q", q), ("k", k)):
                top = float(x.detach().abs().max()) if x.numel() else 0.0
                if top > bound:
                    raise ValueError(f"{name} has an entry of magnitude {top:.6g} above the declared bound={bound:g}")
        return "", (tuple(q.shape[:-2]), tuple(k.shape[:-2]), tuple(v.shape[:-2]), q.shape[-1], v.shape[-1],
                    str(q.dtype), q.device.type, q.shape[-2])
    except (ValueError, TypeError) as exc:
        return str(exc), None


def _agree(checked: tuple[str, tuple | None], opts: Options, group, world: int) -> list[int]:
    """Every rank's check, gathered: raise on every rank if any rank failed or the ranks disagree; else the
    shard lengths."""
    options = dict(method=opts.method, scale=opts.scale, is_causal=opts.is_causal, eps=opts.eps,
                   degree=opts.degree, order=opts.order, bound=opts.bound, block_size=opts.block_size)
    reports = [None] * world
    dist.all_gather_object(reports, (*checked, repr(sorted(options.items()))), group=group)
    bad = [(r, e) for r, (e, _, _) in enumerate(reports) if e]
    if bad:
        raise ValueError("; ".join(f"rank {r}: {e}" for r, e in bad))
    if len({o for _, _, o in reports}) > 1:
        raise ValueError("the ranks disagree on the call's options (every rank must pass the same method, scale, "
                         "is_causal, eps, degree, order, bound, block_size): "
                         + "; ".join(f"rank {r}: {o}" for r, (_, _, o) in enumerate(reports)))
    metas = [m for _, m, _ in reports]
    if len({m[:-1] for m in metas}) > 1:
        raise ValueError("the ranks disagree on (q batch, k batch, v batch, d, d_v, dtype, device): "
                         + "; ".join(f"rank {r}: {m[:-1]}" for r, m in enumerate(metas)))
    return [m[-1] for m in metas]


def _global_stats(q, k, v, group) -> InputStats:
    """The call's :class:`~attnbound.stats.InputStats` over the whole sequence: one all_reduce(MAX)."""
    with torch.no_grad():
        qd, kd = q.detach().double(), k.detach().double()
        hi, lo = value_extremes(v)
        top = lambda x: float(x.max()) if x.numel() else 0.0  # noqa: E731  (an empty shard holds nothing)
        scalars = torch.tensor([top(row_norms(qd)), top(row_norms(kd)),
                                top(qd.abs()), top(kd.abs())], dtype=torch.float64)
        local = torch.cat([scalars, hi.reshape(-1).cpu(), (-lo).reshape(-1).cpu()]).to(q.device)
    dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
    _count(local.numel() * 8, local.numel() * 8, world=dist.get_world_size(group))
    cols = (local.numel() - 4) // 2
    hi, neg_lo = local[4:4 + cols], local[4 + cols:]
    spread = torch.where(torch.isfinite(hi) & torch.isfinite(neg_lo), hi + neg_lo, torch.zeros_like(hi))
    vmax = torch.maximum(hi.abs(), neg_lo.abs())
    vmax = torch.where(torch.isfinite(vmax), vmax, torch.zeros_like(vmax))
    return InputStats(q_norm=float(local[0]), k_norm=float(local[1]), q_abs=float(local[2]), k_abs=float(local[3]),
                      value_range=float(spread.max()) if cols else 0.0, max_abs_value=float(vmax.max()) if cols else 0.0)


def _ring(q, k, v, *, s, is_causal, lengths, me, world, group, block, eps, return_certificate):
    # the global statistics first: they choose the precision (float64 when float32 logits, products or the
    # scale could overflow, or eps needs it) and whether values must be scaled, as single-process attention
    st = _global_stats(q, k, v, group)
    n = sum(lengths)
    d = q.shape[-1]
    logit = st.logit_bound(s, "softmax")
    cert = exact_candidate(kind="softmax", logit_bound=logit, mask_span=0.0, d=d, n_k=n, block=block,
                           value_range=st.value_range, max_abs_value=st.max_abs_value, out_dtype=q.dtype, eps=eps,
                           norms_product=st.q_norm * st.k_norm, scale=s)
    cert = exact_certificate(kind="softmax", logit_bound=logit, d=d, n_k=n, blocks=sum(-(-x // block) for x in lengths),
                             block=block, value_range=st.value_range, max_abs_value=st.max_abs_value,
                             compute_dtype=getattr(torch, cert.compute_dtype), out_dtype=q.dtype, scale=s, eps=eps)
    cert = dataclasses.replace(cert, engine="blockwise ring")
    if max(logit, st.q_norm * st.k_norm) * 8.0 > float(torch.finfo(torch.float64).max):
        raise ValueError(f"scale: logits up to s·max‖q‖·max‖k‖ = {logit:.3g} overflow even float64")
    if eps is not None and not cert.output_error_bound <= eps:
        raise ValueError(exact_eps_reason(cert, eps, q.dtype))
    cd = getattr(torch, cert.compute_dtype)
    v, vexp = scale_values(v, st.max_abs_value, n, cd)
    qc = q.to(cd)
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    d, d_v, n_r = q.shape[-1], v.shape[-1], q.shape[-2]
    m = torch.full((*batch, n_r, 1), float("-inf"), dtype=cd, device=q.device)
    l = torch.zeros((*batch, n_r, 1), dtype=cd, device=q.device)
    acc = torch.zeros((*batch, n_r, d_v), dtype=cd, device=q.device)
    kv = torch.cat([k.to(cd).expand(*batch, n_r, d), v.to(cd).expand(*batch, n_r, d_v)], -1).contiguous()
    for step in range(world):
        src = (me - step) % world
        pending, incoming = None, None
        if step < world - 1:
            nxt = (me - step - 1) % world
            incoming = torch.empty((*batch, lengths[nxt], d + d_v), dtype=cd, device=q.device)
            ops = [dist.P2POp(dist.isend, kv, (me + 1) % world, group=group),
                   dist.P2POp(dist.irecv, incoming, (me - 1) % world, group=group)]
            pending = dist.batch_isend_irecv(ops)
            _count(kv.numel() * kv.element_size(), incoming.numel() * incoming.element_size(), 2)
        if not (is_causal and src > me):
            kb, vb = kv[..., :d], kv[..., d:]
            for j0 in range(0, kb.shape[-2], block):
                j1 = min(j0 + block, kb.shape[-2])
                for i0 in range(0, n_r, block):
                    i1 = min(i0 + block, n_r)
                    if is_causal and src == me and j0 >= i1:
                        continue  # the whole tile lies after these queries
                    scores = s * (qc[..., i0:i1, :] @ kb[..., j0:j1, :].transpose(-1, -2))
                    if is_causal and src == me and j1 > i0:
                        scores = scores.masked_fill(~_causal_block_mask(i0, i1, j0, j1, q.device), float("-inf"))
                    part = online_softmax_step(m[..., i0:i1, :], l[..., i0:i1, :], acc[..., i0:i1, :], scores,
                                               vb[..., j0:j1, :])
                    m[..., i0:i1, :], l[..., i0:i1, :], acc[..., i0:i1, :] = part
        if pending is not None:
            for work in pending:
                work.wait()
            kv = incoming
    out = finish(times_pow2(finish_online_softmax(l, acc), vexp), st.max_abs_value, q.dtype)
    return (out, cert) if return_certificate else out


def _features(q, k, v, *, s, method, is_causal, lengths, me, world, group, eps, degree, bound, memory_budget,
              return_certificate):
    d, d_v = q.shape[-1], v.shape[-1]
    n = sum(lengths)
    st = _global_stats(q, k, v, group)
    radius, source = st.radius(s, "softmax", bound=bound, d=d)
    # every rank evaluates the same scalars below, so they agree on the degree (or on the error)
    cert = choose_certificate(method, radius, source, eps=eps, degree=degree, d=d, n_k=n,
                              value_range=st.value_range, max_abs_value=st.max_abs_value, out_dtype=q.dtype)
    g, r = cert.degree, feature_rank(d, cert.degree)
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    batch_numel = math.prod(batch)
    chunk = chunk_rows(batch_numel, r)
    need = feature_memory_bytes(batch_numel, q.shape[-2], k.shape[-2], d, d_v, r, chunk, is_causal=is_causal,
                                requires_grad=False) + (world * batch_numel * r * (d_v + 1) * 8 if is_causal else 0)
    budget = memory_budget if memory_budget is not None else default_memory_budget(q.device)
    budgets = [None] * world  # budgets differ between machines: decide together, or one rank would wait forever
    dist.all_gather_object(budgets, (need, budget), group=group)
    over = [(i, nd, b) for i, (nd, b) in enumerate(budgets) if nd > b]
    if over:
        raise ValueError(f"memory_budget: {method} degree {g} needs rank r={r}; " + "; ".join(
            f"rank {i} needs about {nd / 2**20:.1f} MiB (budget {b / 2**20:.1f} MiB)" for i, nd, b in over))
    coeffs, aq, ak = polynomial_setup(method, radius, g, d=d, bound=bound, norms=(st.q_norm, st.k_norm))
    qd = normalised(q, aq).expand(*batch, *q.shape[-2:])
    kd = normalised(k, ak).expand(*batch, *k.shape[-2:])
    vd, vexp = unit_values(v, st.max_abs_value)
    vv = weighted_values(vd.expand(*batch, *v.shape[-2:]))  # |v| ≤ 1, exactly
    deg = len(coeffs) - 1
    w = torch.as_tensor(monomial_weights(coeffs, d), dtype=torch.float64, device=q.device)
    engine = engine_for(qd, kd, vv, is_causal=is_causal)
    state = key_state_on(engine, kd, vv, degree=deg, weights=w, chunk=chunk).contiguous()
    nbytes = state.numel() * 8
    if not is_causal:
        dist.all_reduce(state, op=dist.ReduceOp.SUM, group=group)
        _count(nbytes, nbytes, world=world)
        num = readout_on(engine, qd, state, degree=deg, chunk=chunk)
    else:
        states = [torch.empty_like(state) for _ in range(world)]
        dist.all_gather(states, state, group=group)
        _count(nbytes, nbytes * world, world=world)
        prefix = sum(states[:me]) if me > 0 else None
        num = causal_readout_on(engine, qd, kd, vv, degree=deg, weights=w, chunk=chunk, state=prefix)
    # the a-posteriori rounding bound divides by the smallest row sum of the whole sequence: one all_reduce(MIN)
    den = num[..., d_v]
    low = torch.tensor([float(den.min()) if den.numel() else math.inf], dtype=torch.float64, device=q.device)
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    _count(8, 8, world=world)
    cert = degree_certificate(method, radius, g, d=d, n_k=n, value_range=st.value_range,
                              max_abs_value=st.max_abs_value, radius_source=source, out_dtype=q.dtype, eps=eps,
                              min_denominator=float(low))
    cert = dataclasses.replace(cert, engine=engine)
    if eps is not None and not cert.output_error_bound <= eps:
        raise ValueError(f"eps: {method} {family(method).degree_name} {g}: the float64 rounding bound measured on this "
                         f"input is {cert.rounding_bound:.3g}, so the bound {cert.output_error_bound:.3g} misses "
                         f"eps={eps:g}; pass a larger eps or use method='exact'")
    out = finish(times_pow2(normalize_readout(num, d_v), vexp), st.max_abs_value, q.dtype)
    return (out, cert) if return_certificate else out
