"""The gradient certificate (attnbound.gradient, docs/theory.md §7): every bound against long-double gradients of
exact attention, at flash-chunk and feature-chunk boundaries, with every mask form, causal, ℓ2, GQA, centring and
heavy tokens; the derivative's η₁ against the polynomial itself; grad_eps; the modules."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import attnbound
from attnbound import gradient as gr
from attnbound.families import family
from attnbound.nn import Attention, Transformer

from reference import _ld, long_double_gradients


def _inputs(shape_q, shape_k, d_v=None, *, spread=1.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(*shape_q, generator=g, dtype=torch.float64) * spread).to(dtype).requires_grad_()
    k = (torch.randn(*shape_k, generator=g, dtype=torch.float64) * spread).to(dtype).requires_grad_()
    vs = (*shape_k[:-1], d_v or shape_k[-1])
    v = torch.randn(*vs, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return q, k, v, g


def _run(q, k, v, grad, **kw):
    out, cert = attnbound.attention(q, k, v, return_certificate=True, **kw)
    out.backward(grad)
    return out, cert, cert.gradient_certificate


def _errors(q, k, v, grad, *, scale, kind="softmax", is_causal=False, attn_mask=None):
    rq, rk, rv = long_double_gradients(q, k, v, grad, scale=scale, kind=kind, is_causal=is_causal,
                                       attn_mask=attn_mask)
    return tuple(float(np.abs(_ld(x.grad) - r).max()) for x, r in ((q, rq), (k, rk), (v, rv)))


def _check(q, k, v, grad, *, scale, kind="softmax", is_causal=False, attn_mask=None, **kw):
    out, cert, gc = _run(q, k, v, grad, scale=scale, kind=kind, is_causal=is_causal, attn_mask=attn_mask, **kw)
    eq, ek, ev = _errors(q, k, v, grad, scale=scale, kind=kind, is_causal=is_causal, attn_mask=attn_mask)
    assert gc is not None and math.isfinite(gc.bound), gc
    assert eq <= gc.dq_bound and ek <= gc.dk_bound and ev <= gc.dv_bound, (cert.method, cert.engine, eq, ek, ev, gc)
    return (eq, ek, ev), gc, cert


# ---------------------------------------------------------------------------------------------------------------
# η₁


@pytest.mark.parametrize("method", ["taylor", "polynomial", "relative"])
@pytest.mark.parametrize("radius", [0.25, 1.0, 3.0])
def test_derivative_eta_covers_the_polynomial(method, radius):
    fam = family(method)
    u = np.linspace(-1.0, 1.0, 40001)
    for g in range(2, 11, 2):
        a = fam.coefficients(radius, g)
        dp = np.polynomial.polynomial.polyval(u, np.polynomial.polynomial.polyder(a)) / radius
        measured = float(np.max(np.abs(dp * np.exp(-radius * u) - 1.0)))
        eta1 = gr.derivative_eta(method, radius, g)
        assert measured <= eta1, (g, measured, eta1)
        # each of the two proofs holds on its own; the piecewise one is the tight one for minimax fits
        assert measured <= gr.polynomial_derivative_eta(tuple(a), radius)
        piecewise = gr.piecewise_derivative_eta(tuple(a), radius)
        assert measured <= piecewise
        if measured > 1e-12:  # below, the grid's own float64 evaluation is what is measured
            assert eta1 <= piecewise <= 3.0 * measured, (g, measured, piecewise)


@pytest.mark.parametrize("method", ["taylor", "polynomial", "relative"])
@pytest.mark.parametrize("radius", [0.25, 1.0, 3.0])
def test_derivative_eta_profile_covers_each_range(method, radius):
    """η₁ of the arguments |u| ≤ ρ (the profile the per-pair bucket refinement charges) covers the polynomial's measured
    derivative error there, is the whole η₁ from ρ = 1 on, and is smaller inside for the minimax fits."""
    fam = family(method)
    u = np.linspace(-1.0, 1.0, 40001)
    for g in (3, 5, 8):
        a = fam.coefficients(radius, g)
        dp = np.polynomial.polynomial.polyval(u, np.polynomial.polynomial.polyder(a)) / radius
        err = np.abs(dp * np.exp(-radius * u) - 1.0)
        prof = gr.derivative_eta_profile(method, radius, g)
        rhos = torch.tensor([0.0, 0.05, 0.125, 0.2, 0.37, 0.5, 0.75, 0.99, 1.0, 1.5], dtype=torch.float64)
        within = gr._eta1_within(prof, rhos)
        for rho, e in zip(rhos.tolist(), within.tolist()):
            assert float(err[np.abs(u) <= rho].max()) <= e, (g, rho, e)
        assert within[-2] == within[-1] == gr.derivative_eta(method, radius, g)
        assert list(within) == sorted(within)
    if method == "relative" and radius == 1.0:  # the equioscillating fits err most at the ends
        assert gr._eta1_within(prof, torch.tensor([0.5], dtype=torch.float64)) < 0.3 * within[-1]


def test_norm_buckets_partition_the_rows():
    """Every row in exactly one bucket, its norm at most the bucket's edge (ties at an edge included)."""
    norms = torch.cat([torch.rand(500, dtype=torch.float64), torch.full((40,), 0.5, dtype=torch.float64)])
    edges = gr._norm_edges(norms)
    assert edges[-1] == norms.max() and list(edges) == sorted(edges)
    ind = torch.cat(gr._bucket_indicators(norms, edges), -1)
    assert torch.equal(ind.sum(-1), torch.ones(540, dtype=torch.float64))
    assert bool((norms <= (ind * edges).sum(-1)).all())
    assert gr._norm_edges(norms[:10]).tolist() == [float(norms[:10].max())]  # few rows: one bucket


@pytest.mark.parametrize("centre", [False, True])
def test_softmax_charges_each_key_bucket_its_own_range(centre):
    """Softmax without heavy tokens (plain or centred): the refined bounds are below the whole-range ones and still
    above the long-double error, also when a few large keys align with the largest query (their pairs reach
    |u| ≈ 1)."""
    torch.manual_seed(3)
    n, d = 600, 8
    q, k = torch.randn(1, n, d), torch.randn(1, n, d)
    k[0, :12] = q[0, q[0].norm(dim=-1).argmax()] * 3.0  # a few keys along the largest query, three times as long
    q = q / q.norm(dim=-1).max()
    k = k / k.norm(dim=-1).max() + (0.5 if centre else 0.0)  # centred: an offset the centring takes out
    q, k = q.requires_grad_(), k.requires_grad_()
    v = torch.randn(1, n, d)
    v[0, :12] = 4.0  # and large values there
    v.requires_grad_()
    grad = torch.randn(1, n, d)
    (eq, ek, ev), gc, cert = _check(q, k, v, grad, scale=1.0, method="relative", eps=1e-3, centre=centre)
    assert ("centred" in cert.radius_source) == centre
    slot = cert._gradient_slot
    assert slot.spec.per_pair
    whole = dataclasses.replace(slot.spec, per_pair=False)
    saved = slot.spec
    try:
        object.__setattr__(slot, "spec", whole)
        slot._cert = None
        gw = slot.certificate
    finally:
        object.__setattr__(slot, "spec", saved)
    assert gc.dq_bound < gw.dq_bound and gc.dk_bound < gw.dk_bound


def test_bucket_layouts_agree():
    """Uncentred calls sum only the squares per bucket, centred ones (2d + 1) columns: with centres of zero both
    layouts bound the same numbers, and the bounds agree (a wrong stride or offset in either would not)."""
    torch.manual_seed(5)
    q, k, v, grad = (torch.randn(2, 300, 3, dtype=torch.float64) * 0.4 for _ in range(4))
    spec = gr.GradientSpec(method="relative", kind="softmax", scale=1.0, is_causal=False, eta=1e-6, eta1=None,
                           eta_fp=0.0, forward_bound=1e-5, compute_dtype=torch.float64, poly=("relative", 1.0, 4),
                           per_pair=True)
    out = attnbound.attention(q, k, v, scale=1.0)
    plain = gr.gradient_bounds(q, k, v, grad, spec=spec, out=out)
    zero = torch.zeros(1, 3, dtype=torch.float64)
    centred = gr.gradient_bounds(q, k, v, grad, spec=spec, out=out, c_q=zero, c_k=zero)
    whole = gr.gradient_bounds(q, k, v, grad, spec=dataclasses.replace(spec, per_pair=False), out=out)
    for name in ("dq_bound", "dk_bound"):
        assert getattr(plain, name) == pytest.approx(getattr(centred, name), rel=1e-12)
        assert getattr(plain, name) < getattr(whole, name)


def _gaussian_head(n: int, d: int = 8):
    """A Gaussian head of radius 1 (q, k scaled by their largest norms), relative at eps = 1e-3, checked against the
    long-double reference: ((dq, dk, dv errors), gradient certificate)."""
    torch.manual_seed(0)
    q, k = torch.randn(1, n, d), torch.randn(1, n, d)
    q = (q / q.norm(dim=-1).max()).requires_grad_()
    k = (k / k.norm(dim=-1).max()).requires_grad_()
    v = torch.randn(1, n, d, requires_grad=True)
    grad = torch.randn(1, n, d)
    errs, gc, _ = _check(q, k, v, grad, scale=1.0, method="relative", eps=1e-3)
    return errs, gc


def test_dq_dk_bounds_are_within_100x_of_the_error_on_gaussian_data():
    """The per-pair refinement (each key and query bucket charged η₁ of its own range) and the forward error entering
    dQ through the signed key mean: dQ and dK read within 100× of the long-double error on Gaussian heads."""
    (eq, ek, ev), gc = _gaussian_head(1024)
    assert gc.dq_bound <= 100.0 * eq and gc.dk_bound <= 100.0 * ek, (eq, ek, gc)


def test_derivative_eta_of_taylor_by_hand():
    # T_2(x) = 1 + x + x²/2: f'(x) = 1 + x, |(1 + x)e^{−x} − 1| on [−R, R] is largest at x = −R: (1 − R)e^R − 1
    r = 0.5
    a = family("taylor").coefficients(r, 2)
    true = abs((1 - r) * math.exp(r) - 1.0)
    eta1 = gr.polynomial_derivative_eta(tuple(a), r)
    assert true <= eta1 <= 1.5 * true
    assert gr.polynomial_derivative_eta(tuple(a), 0.0) == math.inf


# ---------------------------------------------------------------------------------------------------------------
# exact engines


@pytest.mark.parametrize("n", [1, 7, 511, 513, 2049])
def test_exact_float32_bounds_hold_across_flash_chunks(n):
    q, k, v, g = _inputs((2, n, 8), (2, n, 8), 5)
    grad = torch.randn(2, n, 5, generator=g)
    _, gc, cert = _check(q, k, v, grad, scale=8 ** -0.5)
    assert cert.engine.startswith("flash") and gc.method == "exact" and gc.eta_derivative == 0.0


@pytest.mark.parametrize("method", ["dense", "blockwise"])
def test_project_kernels(method):
    q, k, v, g = _inputs((3, 130, 4), (3, 130, 4))
    _check(q, k, v, torch.randn(3, 130, 4, generator=g), scale=0.5, method=method, block_size=64)


def test_float64_sdpa_bound_is_at_float64_scale():
    q, k, v, g = _inputs((2, 100, 8), (2, 100, 8), dtype=torch.float64)
    errs, gc, cert = _check(q, k, v, torch.randn(2, 100, 8, generator=g, dtype=torch.float64), scale=0.3)
    assert gc.bound < 1e-8 and gc.compute_dtype == "float64"


@pytest.mark.parametrize("case", ["causal", "l2", "bool", "float", "padding", "dead rows", "half"])
def test_exact_masks_causal_l2(case):
    n = 70
    dtype = torch.bfloat16 if case == "half" else torch.float32
    q, k, v, g = _inputs((2, n, 6), (2, n, 6), dtype=dtype, spread=0.7 if case == "l2" else 1.0)
    kw = {}
    if case == "causal":
        kw["is_causal"] = True
    if case == "l2":
        kw["kind"] = "l2"
    if case == "bool":
        kw["attn_mask"] = torch.rand(2, n, n, generator=g) > 0.3
    if case == "float":
        kw["attn_mask"] = torch.randn(2, 1, n, generator=g) * 4.0
    if case == "padding":
        m = torch.ones(2, 1, n, dtype=torch.bool)
        m[0, :, 50:] = False
        kw["attn_mask"] = m
    if case == "dead rows":
        m = torch.rand(2, n, n, generator=g) > 0.5
        m[:, 3] = False
        kw["attn_mask"] = m
    grad = torch.randn(2, n, 6, generator=g).to(dtype)
    _check(q, k, v, grad, scale=0.4, **kw)


def test_gqa_and_broadcast_keys_sum_their_bounds():
    q, _, _, g = _inputs((1, 4, 33, 8), (1, 2, 33, 8))
    k = torch.randn(1, 2, 33, 8, generator=g).requires_grad_()
    v = torch.randn(1, 2, 33, 8, generator=g).requires_grad_()
    grad = torch.randn(1, 4, 33, 8, generator=g)
    out, cert, gc = _run(q, k, v, grad, enable_gqa=True, is_causal=True)
    kk, vv = (x.detach().repeat_interleave(2, dim=1) for x in (k, v))
    rq, rk, rv = long_double_gradients(q, kk, vv, grad, scale=8 ** -0.5, is_causal=True)
    rk, rv = rk.reshape(1, 2, 2, 33, 8).sum(2), rv.reshape(1, 2, 2, 33, 8).sum(2)
    assert float(np.abs(_ld(q.grad) - rq).max()) <= gc.dq_bound
    assert float(np.abs(_ld(k.grad) - rk).max()) <= gc.dk_bound
    assert float(np.abs(_ld(v.grad) - rv).max()) <= gc.dv_bound


@pytest.mark.parametrize("case", ["dominant key", "near overflow", "equal values", "one upstream row"])
def test_exact_adversarial(case):
    n, d = 200, 8
    q, k, v, g = _inputs((1, n, d), (1, n, d))
    grad = torch.randn(1, n, d, generator=g)
    with torch.no_grad():
        if case == "dominant key":
            k[0, 17] = q[0].mean(0) * 30.0
        if case == "near overflow":
            q.mul_(6.0)
            k.mul_(6.0)
        if case == "equal values":
            v.fill_(0.5)
        if case == "one upstream row":
            grad.zero_()
            grad[0, 5] = 100.0
    _check(q, k, v, grad, scale=8 ** -0.5)


# ---------------------------------------------------------------------------------------------------------------
# feature methods


@pytest.mark.parametrize("method", ["taylor", "polynomial", "relative"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_families_bounds_hold(method, is_causal):
    n = 130  # crosses the torch engine's 64-row causal tile twice
    q, k, v, g = _inputs((2, n, 6), (2, n, 6), spread=0.4)
    _check(q, k, v, torch.randn(2, n, 6, generator=g), scale=0.5, method=method, eps=1e-3, is_causal=is_causal)


@pytest.mark.parametrize("case", ["centre", "heavy", "l2", "padding", "gqa", "float64"])
def test_families_with_every_option(case):
    n = 97
    dtype = torch.float64 if case == "float64" else torch.float32
    q, k, v, g = _inputs((2, n, 6), (2, n, 6), spread=0.35, dtype=dtype)
    kw = {"method": "relative", "eps": 1e-3}
    if case == "centre":
        with torch.no_grad():
            q.add_(1.0)
            k.sub_(0.8)
        kw["centre"] = True
    if case == "heavy":
        with torch.no_grad():
            k[:, 3] *= 6.0
            q[:, 9] *= 6.0
        kw["heavy"] = 2
    if case == "l2":
        kw["kind"] = "l2"
    if case == "padding":
        m = torch.ones(2, 1, n, dtype=torch.bool)
        m[1, :, 60:] = False
        kw["attn_mask"] = m
    grad = torch.randn(2, n, 6, generator=g).to(dtype)
    if case == "gqa":
        q2 = torch.randn(2, 2, n, 6, generator=g).mul(0.35).requires_grad_()
        k1, v1 = k.detach()[:, None].requires_grad_(), v.detach()[:, None].requires_grad_()
        grad2 = torch.randn(2, 2, n, 6, generator=g)
        out, cert, gc = _run(q2, k1, v1, grad2, enable_gqa=True, scale=0.5, **kw)
        rq, rk, rv = long_double_gradients(q2, k1.expand(2, 2, n, 6), v1.expand(2, 2, n, 6), grad2, scale=0.5)
        assert float(np.abs(_ld(q2.grad) - rq).max()) <= gc.dq_bound
        assert float(np.abs(_ld(k1.grad) - rk.sum(1, keepdims=True)).max()) <= gc.dk_bound
        assert float(np.abs(_ld(v1.grad) - rv.sum(1, keepdims=True)).max()) <= gc.dv_bound
        return
    _, gc, cert = _check(q, k, v, grad, scale=0.5, **kw)
    if case in ("centre", "heavy"):
        assert ("centred" if case == "centre" else "heavy") in cert.radius_source


def test_feature_sums_bound_the_dense_sums():
    """The O(n·r) column and row sums through the approximation are upper bounds of the exact weights' sums."""
    q, k, v, g = _inputs((2, 150, 6), (2, 150, 6), spread=0.4)
    grad = torch.randn(2, 150, 6, generator=g)
    out, cert, gc = _run(q, k, v, grad, scale=0.5, method="relative", eps=1e-3, is_causal=True)
    slot = cert.__dict__["_gradient_slot"]
    qq, kk, vv, mask, c_q, c_k, sums, out = slot._tensors
    dense = gr.gradient_bounds(qq, kk, vv, slot._grad, spec=slot.spec, mask=mask, c_q=c_q, c_k=c_k, out=out)
    for name in ("dq_bound", "dk_bound", "dv_bound"):
        assert getattr(gc, name) >= getattr(dense, name) * (1 - 1e-12), name
        assert getattr(gc, name) <= getattr(dense, name) * 1.01, name  # and as tight


def test_dv_bound_is_within_100x_of_the_error_on_gaussian_data():
    """dV's error is η-sized weight errors times |G|: the bound reads within 100× of it on Gaussian heads."""
    (eq, ek, ev), gc = _gaussian_head(512)
    assert gc.dv_bound <= 100.0 * ev


# ---------------------------------------------------------------------------------------------------------------
# by hand


@pytest.mark.parametrize("kind", ["softmax", "l2"])
@pytest.mark.parametrize("centred", [False, True])
def test_bound_formula_by_hand(kind, centred):
    """One query, two keys, d = 1, the float32 rounding model: every term of the module docstring by hand."""
    q = torch.tensor([[0.5]], dtype=torch.float64, requires_grad=True)
    k = torch.tensor([[1.0], [-1.0]], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([[2.0], [-1.0]], dtype=torch.float64, requires_grad=True)
    grad = torch.tensor([[3.0]], dtype=torch.float64)
    c_q, c_k = (torch.tensor([[0.25]]), torch.tensor([[-0.5]])) if centred else (None, None)
    eta, eta1, E = 1e-6, 3e-5, 1e-5
    spec = gr.GradientSpec(method="relative", kind=kind, scale=1.0, is_causal=False, eta=eta, eta1=eta1,
                           eta_fp=0.0, forward_bound=E, compute_dtype=torch.float32)
    gc = gr.gradient_bounds(q, k, v, grad, spec=spec, c_q=c_q, c_k=c_k)
    u = 2.0 ** -24
    gam = lambda m: m * u / (1 - m * u)  # noqa: E731
    eta_v = 2 * eta / (1 - eta)
    eta_p = max(eta_v, (eta1 + eta) / (1 - eta))
    rng, vmax = 3.0, 2.0 + E
    b = 3.0 * (rng + E + 2 * gam(3) * vmax)
    a = eta_p * b + 3.0 * E + 2 * gam(3) * 3.0 * vmax
    x = np.array([0.5, -0.5]) if kind == "softmax" else -np.array([0.25, 2.25])
    p = np.exp(x) / np.exp(x).sum()
    s_e = 1.0 if kind == "softmax" else 2.0
    cq, ck = (0.25, 0.5) if centred else (0.0, 0.0)
    l2 = kind == "l2"
    row = float(p @ np.array([1.0, 1.0])) + ck + (0.5 if l2 else 0.0)  # Σ_j P_ij(|k_j| + |c_k| [+ |q_i|])
    dq = s_e * (a + gam(2 + 3) * (1 + eta_p) * b) * row
    a_k = a + gam(1 + 3) * (1 + eta_p) * b
    dk = s_e * a_k * p * (0.5 + 2 * cq + (np.array([1.0, 1.0]) if l2 else 0.0))  # κ^K_j: |q| + 2|c_q| [+ |k_j|]
    dv = (eta_v + gam(4) * (1 + eta_v)) * 3.0 * p.max()
    assert gc.dq_bound == pytest.approx(dq, rel=1e-9)
    assert gc.dk_bound == pytest.approx(float(dk.max()), rel=1e-9)
    assert gc.dv_bound == pytest.approx(dv, rel=1e-9)


def test_backward_weights_are_within_eta_backward():
    """The quantity the proof rests on, measured: the weights the Taylor backward uses, f'(x_ij)/Σ_l f(x_il),
    are within η' of the exact weights (order 4, R = 1: the derivative's error dominates the forward's)."""
    q = torch.tensor([[[1.0], [0.3], [-0.7]]], dtype=torch.float64, requires_grad=True)
    k = torch.tensor([[[1.0], [-1.0], [0.2]]], dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 3, 2, dtype=torch.float64, requires_grad=True)
    out, cert = attnbound.attention(q, k, v, method="taylor", order=4, scale=1.0, return_certificate=True)
    out.sum().backward()
    gc = cert.gradient_certificate
    a = family("taylor").coefficients(cert.radius, 4)
    x = (q.detach() @ k.detach().transpose(-1, -2)).numpy()[0] / cert.radius
    f = np.polynomial.polynomial.polyval(x, a)
    fd = np.polynomial.polynomial.polyval(x, np.polynomial.polynomial.polyder(a)) / cert.radius
    pb = fd / f.sum(-1, keepdims=True)
    p = np.exp(x * cert.radius) / np.exp(x * cert.radius).sum(-1, keepdims=True)
    measured = float(np.abs(pb / p - 1).max())
    assert measured > 2 * cert.eta / (1 - cert.eta)  # the forward's η alone would not cover it
    assert measured <= gc.eta_backward


def test_exact_backward_charges_the_stored_log_sum_exp():
    """The exact backward recomputes exp(x − lse) from the forward's float32 log-sum-exp: its rounding,
    4u·(s·max‖q‖·max‖k‖ + ln(n_k + 1) + 4), is charged on top of η. The engines add the mask shifted by its row
    maximum, so however large the mask's entries, the log-sum-exp stays within that."""
    q, k, v, g = _inputs((1, 20, 4), (1, 20, 4), spread=3.0)
    mask = torch.randn(1, 20, 20, generator=g) * 7.0 - 1e6
    out, cert = attnbound.attention(q, k, v, attn_mask=mask, return_certificate=True)
    spec = cert.__dict__["_gradient_slot"].spec
    big = 0.5 * float(q.detach().norm(dim=-1).max()) * float(k.detach().norm(dim=-1).max()) + math.log(21) + 4.0
    assert spec.eta_fp == pytest.approx(math.expm1(4 * 2.0 ** -24 * big), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# grad_eps, the modules, no-grad calls


def test_grad_eps_raises_in_backward_and_leaves_grads_alone():
    q, k, v, g = _inputs((1, 64, 6), (1, 64, 6), spread=0.4)
    out = attnbound.attention(q, k, v, method="taylor", order=4, scale=0.5, grad_eps=1e-9)
    with pytest.raises(ValueError, match="grad_eps"):
        out.sum().backward()
    assert q.grad is None and k.grad is None and v.grad is None
    out = attnbound.attention(q, k, v, method="exact", grad_eps=1.0)
    out.sum().backward()
    assert q.grad is not None and attnbound.last_gradient_certificate().bound <= 1.0
    with pytest.raises(ValueError, match="grad_eps"):
        attnbound.attention(q, k, v, grad_eps=-1.0)


def test_no_certificate_without_a_backward():
    q, k, v, _ = _inputs((1, 8, 4), (1, 8, 4))
    with torch.no_grad():
        _, cert = attnbound.attention(q, k, v, return_certificate=True)
    assert cert.gradient_certificate is None
    _, cert = attnbound.attention(q, k, v, return_certificate=True)
    assert cert.gradient_certificate is None  # no backward yet
    assert "gradient" not in str(cert.as_dict())


def test_modules_report_each_layers_gradient_certificate():
    torch.manual_seed(0)
    model = Transformer(2, 16, 2, method="relative", eps=1e-3)
    x = torch.randn(2, 40, 16) * 0.2
    assert model.last_gradient_certificates == [None, None]
    model(x).square().mean().backward()
    certs = model.last_gradient_certificates
    assert all(c is not None and math.isfinite(c.bound) for c in certs)
    att = Attention(16, 2, method="exact")
    y, _ = att(x, x, x, need_weights=False)
    y.sum().backward()
    assert att.last_gradient_certificate.method == "exact"
    assert attnbound.last_gradient_certificate() is att.last_gradient_certificate


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_cauchy_schwarz_refinement_by_hand(sign):
    """One query, three keys, d = d_v = 1 with the forward's output given: the refined dQ and dK bounds, worked out
    from the formulas (Σ_j P_j (G·v_j − c)² expanded into row and column sums, c = G·õ), each below the plain one.
    ``sign`` flips q and k (the same weights, a key mean of the other sign: the bound takes its magnitude)."""
    q = sign * torch.tensor([[0.7]], dtype=torch.float64)
    k = sign * torch.tensor([[1.0], [-0.5], [0.25]], dtype=torch.float64)
    v = torch.tensor([[2.0], [-1.0], [0.5]], dtype=torch.float64)
    grad = torch.tensor([[3.0]], dtype=torch.float64)
    x = 0.7 * np.array([1.0, -0.5, 0.25])
    p = np.exp(x) / np.exp(x).sum()
    vv = np.array([2.0, -1.0, 0.5])
    out = torch.tensor([[float(p @ vv) + 1e-6]], dtype=torch.float64)
    eta, eta1, E = 1e-6, 3e-5, 1e-5
    spec = gr.GradientSpec(method="relative", kind="softmax", scale=1.0, is_causal=False, eta=eta, eta1=eta1,
                           eta_fp=0.0, forward_bound=E, compute_dtype=torch.float32)
    plain = gr.gradient_bounds(q, k, v, grad, spec=spec)
    gc = gr.gradient_bounds(q, k, v, grad, spec=spec, out=out)
    u, u64 = 2.0 ** -24, 2.0 ** -53
    gam = lambda m, uu=u: m * uu / (1 - m * uu)  # noqa: E731
    eta_v = 2 * eta / (1 - eta)
    eta_p = max(eta_v, (eta1 + eta) / (1 - eta))
    G, vmax = 3.0, 2.0 + E
    b = G * (3.0 + E + 2 * gam(3) * vmax)
    a = eta_p * b + G * E + 2 * gam(3) * G * vmax
    a_rest = (1 + eta_p) * (a - eta_p * b)  # e_i = a − η′b: the dot products and E, times 1 + η′
    lam = 2 * gam(2 + 6, u64) * (0.7 * 1.0) + 2 * gam(3 + 4, u64) + 8 * u64
    rel = math.expm1(lam) + gam(3 + 2, u64)
    up = 1 + rel
    c = G * float(out)
    m2 = (G * 2.0 + abs(c)) ** 2
    s2r = (G * G * (p @ vv ** 2) - 2 * c * G * (p @ vv) + c * c + 2 * rel * m2) * up
    kabs, k2 = (p @ np.abs(k.numpy()[:, 0])) * up, (p @ k.numpy()[:, 0] ** 2) * up
    r_i = 2 * gam(3) * G * vmax  # the dot products' rounding
    kmean = abs(p @ k.numpy()[:, 0]) + (rel + up - 1) * (1 + rel) * kabs  # |Σ_j P_j k_j|: E enters through it
    dq = min((a + gam(3 + 3) * (1 + eta_p) * b) * kabs,
             eta_p * math.sqrt(s2r * k2) + ((1 + eta_p) * r_i + gam(3 + 3) * (1 + eta_p) * b) * kabs + G * E * kmean)
    ar_k = a_rest + gam(1 + 3) * (1 + eta_p) * b
    a_k = a + gam(1 + 3) * (1 + eta_p) * b
    s2c = (p * G * G * vv ** 2 - 2 * vv * p * c * G + p * c * c + 2 * rel * p * m2) * up
    dk = np.minimum(p * a_k * 0.7 * up, eta_p * np.sqrt(s2c * p * 0.49 * up) + p * ar_k * 0.7 * up)
    assert gc.dq_bound == pytest.approx(dq, rel=1e-9)
    assert gc.dk_bound == pytest.approx(float(dk.max()), rel=1e-9)
    assert gc.dq_bound < 0.5 * plain.dq_bound and gc.dk_bound < 0.5 * plain.dk_bound
    assert gc.dv_bound == plain.dv_bound
    # a sums provider with a visible rounding ρ and factor up (as the feature path's): the margin 2ρM² enters
    up2, rho2 = 1.01, 1e-3

    def sums(qe, ke, cols, rows):
        cs_, rs_, _ = gr.weighted_sums(qe, ke, cols, rows, mask=None, scale=1.0, kind="softmax", is_causal=False)
        return cs_, rs_, up2, rho2

    # per pair: every |u| ≤ s·|q|·max|k|/R = 0.7/2 < ½, so the profile's first step (η₁ = 1e-5, not 3e-5) is charged
    pair = dataclasses.replace(spec, per_pair=True, poly=("relative", 2.0, 2), eta1_profile=((0.0, 0.5), (1e-5, 3e-5)))
    gp = gr.gradient_bounds(q, k, v, grad, spec=pair, out=out)
    eta_pp = max(eta_v, (1e-5 + eta) / (1 - eta))
    dqp = min((a + gam(3 + 3) * (1 + eta_p) * b) * kabs,
              eta_pp * math.sqrt(s2r * k2) + ((1 + eta_p) * r_i + gam(3 + 3) * (1 + eta_p) * b) * kabs + G * E * kmean)
    dkp = np.minimum(p * a_k * 0.7 * up, eta_pp * np.sqrt(s2c * p * 0.49 * up) + p * ar_k * 0.7 * up)
    assert gp.dq_bound == pytest.approx(dqp, rel=1e-9) and gp.dq_bound < gc.dq_bound
    assert gp.dk_bound == pytest.approx(float(dkp.max()), rel=1e-9) and gp.dk_bound < gc.dk_bound

    gc2 = gr.gradient_bounds(q, k, v, grad, spec=spec, out=out, sums=sums)
    s2r2 = (G * G * (p @ vv ** 2) - 2 * c * G * (p @ vv) + c * c + 2 * rho2 * m2) * up2
    kabs2, k22 = kabs / up * up2, k2 / up * up2
    kmean2 = abs(p @ k.numpy()[:, 0]) + (rho2 + up2 - 1) * (1 + rho2) * kabs2  # the mean's margin: ρ and up − 1
    dq2 = min((a + gam(3 + 3) * (1 + eta_p) * b) * kabs2,
              eta_p * math.sqrt(s2r2 * k22) + ((1 + eta_p) * r_i + gam(3 + 3) * (1 + eta_p) * b) * kabs2
              + G * E * kmean2)
    assert gc2.dq_bound == pytest.approx(dq2, rel=1e-9)


def test_the_cast_of_the_output_is_charged():
    """Float32 inputs on a float64 backward: g̃ uses the backward's own output õ', the certificate E the returned one,
    |õ' − õ| ≤ u₃₂/(1 − u₃₂)·(max|v| + E) = o_err. Against the same numbers with no cast (float64 inputs), the dQ
    bound grows by exactly s·(1 + η')·Σ_j P_j|k_j|·(‖G‖₁·o_err + u₃₂·b) — the first the cast of õ (E + o_err in b
    moves only terms of float64 size), the second the gradient's own cast into float32."""
    vals = dict(q=[[0.75]], k=[[1.0], [-0.5], [0.25]], v=[[2.0], [-1.0], [0.5]], grad=[[3.0]])  # exact in float32
    eta, eta1, E = 1e-6, 3e-5, 1e-5
    spec = gr.GradientSpec(method="relative", kind="softmax", scale=1.0, is_causal=False, eta=eta, eta1=eta1,
                           eta_fp=0.0, forward_bound=E, compute_dtype=torch.float64)
    x = 0.75 * np.array([1.0, -0.5, 0.25])
    p = np.exp(x) / np.exp(x).sum()
    u32 = 2.0 ** -24
    o_err = u32 / (1 - u32) * (2.0 + E) + 2.0 ** -149
    eta_p = max(2 * eta / (1 - eta), (eta1 + eta) / (1 - eta))
    b = 3.0 * (3.0 + E + o_err)  # ‖G‖₁·(range + E + o_err), float64 rounding terms left out
    grow_q = (1 + eta_p) * float(p @ np.array([1.0, 0.5, 0.25])) * (3.0 * o_err + u32 * b)
    grow_k = (1 + eta_p) * 0.75 * float(p.max()) * (3.0 * o_err + u32 * b)  # through a (and s_b, the cast of dK)
    for with_out in (True, False):  # the Cauchy–Schwarz branches, and the plain ones (b, a, vmax)
        got = {}
        for dtype in (torch.float64, torch.float32):
            t = {name: torch.tensor(x_, dtype=dtype) for name, x_ in vals.items()}
            out = torch.tensor([[float(p @ np.array([2.0, -1.0, 0.5]))]], dtype=dtype) if with_out else None
            got[dtype] = gr.gradient_bounds(t["q"], t["k"], t["v"], t["grad"], spec=spec, out=out)
        dq = got[torch.float32].dq_bound - got[torch.float64].dq_bound
        dk = got[torch.float32].dk_bound - got[torch.float64].dk_bound
        assert dq == pytest.approx(grow_q, rel=1e-6 if with_out else 1e-9), with_out
        assert dk == pytest.approx(grow_k, rel=1e-5 if with_out else 1e-9), with_out


# ---------------------------------------------------------------------------------------------------------------
# the audit's cases (each failed before its fix)


def _check_small(q, k, v, grad, **kw):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out, cert = attnbound.attention(q, k, v, return_certificate=True, **kw)
    out.backward(grad)
    gc = cert.gradient_certificate
    errs = _errors(q, k, v, grad, scale=kw.get("scale", q.shape[-1] ** -0.5), is_causal=kw.get("is_causal", False),
                   attn_mask=kw.get("attn_mask"))
    for e, b in zip(errs, (gc.dq_bound, gc.dk_bound, gc.dv_bound)):
        assert e <= b, (errs, gc)
    return errs, gc, cert


def test_weights_that_underflow_are_charged():
    t = torch.tensor
    _check_small(t([[1.0]]), t([[0.0], [-104.0]]), t([[0.0], [1e15]]), t([[1e15]]), scale=1.0)
    d = torch.float64
    _check_small(t([[1.0]], dtype=d), t([[0.0], [-740.0]], dtype=d), t([[0.0], [1e150]], dtype=d),
                 t([[1e150]], dtype=d), scale=1.0)


@pytest.mark.parametrize("dtype, g", [(torch.float16, 1e-6), (torch.bfloat16, 1e-40)])
def test_gradients_cast_into_the_subnormal_range_are_charged(dtype, g):
    t = torch.tensor
    _check_small(t([[0.5]], dtype=dtype), t([[1.0], [-1.0]], dtype=dtype), t([[1.0], [-1.0]], dtype=dtype),
                 t([[g]], dtype=dtype), scale=1.0)


def test_heavy_query_rows_carry_their_exact_engines_rounding():
    gen = torch.Generator().manual_seed(0)
    n = 32
    q = torch.randn(1, n, 2, generator=gen) * 0.1
    k = torch.randn(1, n, 2, generator=gen) * 0.1
    v = torch.randn(1, n, 2, generator=gen)
    q[0, 5] = torch.tensor([60.0, -45.0])
    grad = torch.zeros(1, n, 2)
    grad[0, 5] = torch.tensor([1.0, -1.0])
    _, gc, cert = _check_small(q, k, v, grad, method="relative", degree=8, heavy=1, scale=1.0)
    assert "heavy rows" in cert.engine and gc.compute_dtype == "float32"
    row = attnbound.attention(q[:, 5:6], k, v, scale=1.0, return_certificate=True)[1]
    assert cert.eta >= row.eta  # the exact rows' weight error is the certificate's η too


@pytest.mark.parametrize("method", ["dense", "blockwise"])
def test_project_kernels_do_not_differentiate_through_the_row_maximum(method):
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        n = 512
        q = torch.randn(1, n, 2, generator=gen) * 0.3
        k = torch.randn(1, n, 2, generator=gen) * 0.3
        v = torch.full((1, n, 3), 0.7)
        grad = torch.zeros(1, n, 3)
        grad[0, n - 1] = 5.0
        _check_small(q, k, v, grad, method=method, block_size=64, scale=0.05)


def test_two_backward_passes_are_bounded_together():
    q, k, v, g = _inputs((1, 16, 4), (1, 16, 4))
    g1, g2 = torch.randn(1, 16, 4, generator=g) * 1e3, torch.randn(1, 16, 4, generator=g) * 1e-3
    for kw in ({}, {"method": "relative", "eps": 1e-3, "scale": 0.1}):
        for x in (q, k, v):
            x.grad = None
        out, cert = attnbound.attention(q, k, v, return_certificate=True, **kw)
        out.backward(g1, retain_graph=True)
        out.backward(g2)
        gc = cert.gradient_certificate
        errs = _errors(q, k, v, g1 + g2, scale=kw.get("scale", 0.5))
        assert all(e <= b for e, b in zip(errs, (gc.dq_bound, gc.dk_bound, gc.dv_bound))), (errs, gc)


def test_the_certificate_reads_the_call_as_it_was():
    q, k, v, g = _inputs((1, 16, 4), (1, 16, 4))
    grad = torch.randn(1, 16, 4, generator=g)
    out, cert = attnbound.attention(q, k, v, return_certificate=True)
    out.backward(grad)
    before = attnbound.attention(q.detach(), k.detach(), v.detach(), return_certificate=True)[1]  # unrelated call
    grad.mul_(0.0)  # the caller reuses its upstream tensor: the slot kept a copy
    assert cert.gradient_certificate.dq_bound > 1e-10
    del before
    out, cert = attnbound.attention(q, k, v, return_certificate=True)
    out.backward(torch.randn(1, 16, 4, generator=g))
    with torch.no_grad():
        q.add_(1.0)  # an optimizer step on a leaf before the certificate was read
    with pytest.raises(RuntimeError, match="modified in place"):
        cert.gradient_certificate


def test_overflow_and_non_finite_upstream_gradients_certify_nothing():
    t = torch.tensor
    q, k, v = t([[0.5]]), t([[1.0], [-1.0]]), t([[1e20], [-1e20]])
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, cert = attnbound.attention(*leaves, scale=1.0, return_certificate=True)
    out.backward(t([[1e19]]))
    assert cert.gradient_certificate.dq_bound == math.inf and cert.gradient_certificate.dk_bound == math.inf
    h = torch.float16
    leaves = [x.clone().requires_grad_() for x in (t([[0.0]], dtype=h), t([[100.0], [-100.0]], dtype=h),
                                                   t([[300.0], [-300.0]], dtype=h))]
    out, cert = attnbound.attention(*leaves, scale=1.0, return_certificate=True)
    out.backward(t([[1000.0]], dtype=h))
    assert not torch.isfinite(leaves[0].grad).all() and cert.gradient_certificate.dq_bound == math.inf
    leaves = [x.clone().requires_grad_() for x in (t([[0.5]]), t([[1.0], [-1.0]]), t([[1.0], [-1.0]]))]
    out, cert = attnbound.attention(*leaves, scale=1.0, return_certificate=True)
    out.backward(t([[float("nan")]]))
    assert cert.gradient_certificate.bound == math.inf and not cert.gradient_certificate.certified


def test_a_padding_mask_of_finfo_min_keeps_the_bound_finite():
    """Hugging Face pads with finfo.min: the stored log-sum-exp is bounded by each row's largest mask entry (0)."""
    q, k, v, g = _inputs((1, 2, 24, 8), (1, 2, 24, 8))
    mask = torch.zeros(1, 1, 24, 24)
    mask[..., 20:] = torch.finfo(torch.float32).min
    _, gc, _ = _check(q, k, v, torch.randn(1, 2, 24, 8, generator=g), scale=8 ** -0.5, attn_mask=mask)
    assert gc.bound < 1e-2


# ---------------------------------------------------------------------------------------------------------------
# the review's cases


def test_the_output_can_be_edited_in_place_and_the_hook_sees_the_calls_gradient():
    q, k, v, g = _inputs((1, 20, 4), (1, 20, 4))
    grad = torch.randn(1, 20, 4, generator=g)
    out, cert = attnbound.attention(q, k, v, return_certificate=True)
    out.mul_(2.0)  # a later in-place edit (worked before the watch existed)
    out.backward(grad)
    errs = _errors(q, k, v, 2.0 * grad, scale=0.5)
    gc = cert.gradient_certificate
    assert all(e <= b for e, b in zip(errs, (gc.dq_bound, gc.dk_bound, gc.dv_bound)))


@pytest.mark.parametrize("is_causal", [False, True])
def test_second_derivatives_through_the_fused_engine(is_causal, monkeypatch):
    """create_graph through the fused kernels gives the approximation's second derivative, as the torch engine does."""
    from attnbound.engines import registry

    q, k, v, g = _inputs((1, 40, 3), (1, 40, 3), spread=0.3, dtype=torch.float64)
    hess = {}
    for name in ("fused", "torch"):
        if name == "torch":
            monkeypatch.setattr(registry, "FEATURE_ORDER", ("torch",))
        out, cert = attnbound.attention(q, k, v, method="relative", eps=1e-4, is_causal=is_causal,
                                        return_certificate=True)
        assert cert.engine == name
        (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        hess[name] = torch.autograd.grad(gq.square().sum(), k)[0]
    assert torch.allclose(hess["fused"], hess["torch"], rtol=1e-9, atol=1e-12)


def test_a_refused_backward_leaves_the_slot_and_the_last_certificate_alone():
    q, k, v, g = _inputs((1, 30, 4), (1, 30, 4), spread=0.4)
    good = attnbound.attention(q, k, v)
    good.sum().backward()
    last = attnbound.last_gradient_certificate()
    out, cert = attnbound.attention(q, k, v, method="taylor", order=4, scale=0.5, grad_eps=1e-12,
                                    return_certificate=True)
    with pytest.raises(ValueError, match="grad_eps"):
        out.sum().backward(retain_graph=True)
    slot = cert.__dict__["_gradient_slot"]
    assert slot._grads == [] and cert.gradient_certificate is None
    assert attnbound.last_gradient_certificate() == last


def test_certificates_pickle_without_their_slot():
    import pickle

    q, k, v, _ = _inputs((1, 30, 4), (1, 30, 4), spread=0.4)
    for kw in ({}, {"method": "relative", "eps": 1e-3}):
        out, cert = attnbound.attention(q, k, v, return_certificate=True, **kw)
        out.sum().backward()
        back = pickle.loads(pickle.dumps(cert))
        assert back == cert and back.gradient_certificate is None and cert.gradient_certificate is not None


def test_mask_edits_are_seen():
    q, k, v, g = _inputs((1, 12, 4), (1, 12, 4))
    mask = torch.randn(1, 12, 12, generator=g)
    out, cert = attnbound.attention(q, k, v, attn_mask=mask, return_certificate=True)
    out.sum().backward()
    mask.zero_()
    with pytest.raises(RuntimeError, match="modified in place"):
        cert.gradient_certificate


def test_fully_padded_query_rows_keep_the_bound_finite():
    """Hugging Face's 4-D masks fill a padded query's whole row with finfo.min: shifted by its row maximum, as the
    engines add it, the row is ordinary (and the dense pass's weights stay the true ones)."""
    q, k, v, g = _inputs((1, 16, 4), (1, 16, 4))
    mask = torch.zeros(1, 16, 16)
    mask[:, 12:, :] = torch.finfo(torch.float32).min
    mask[:, :, 14:] = torch.finfo(torch.float32).min
    _, gc, _ = _check(q, k, v, torch.randn(1, 16, 4, generator=g), scale=0.5, attn_mask=mask)
    assert gc.bound < 1e-2


def test_the_feature_path_takes_the_cheaper_sums():
    q, k, v, g = _inputs((1, 20, 6), (1, 20, 6), spread=0.3)
    out, cert = attnbound.attention(q, k, v, method="relative", eps=1e-3, scale=0.5, return_certificate=True)
    assert cert.__dict__["_gradient_slot"]._tensors[6] is None  # n² ≪ n·r: the dense pass
    q, k, v, g = _inputs((1, 3000, 2), (1, 3000, 2), spread=0.3)
    out, cert = attnbound.attention(q, k, v, method="relative", eps=1e-3, scale=0.5, return_certificate=True)
    assert cert.__dict__["_gradient_slot"]._tensors[6] is not None  # n ≫ r: through the approximation
