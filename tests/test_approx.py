import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnbound
from attnbound.engines.monomials import monomial_exponents, monomial_weights
from conftest import reference_l2, reference_softmax

METHODS = [("polynomial", "degree"), ("taylor", "order")]


def measured(out, q, k, v, scale, kind="softmax", is_causal=False, mask=None):
    if kind == "l2":
        ref = reference_l2(q, k, v, scale, is_causal)
    else:
        ref = reference_softmax(q, k, v, scale, is_causal, mask)
    return float((out.double() - ref).abs().max())


def scaled_inputs(g, shape_q, shape_k, d, d_v, radius, scale, dtype=torch.float64):
    q = torch.randn(*shape_q, d, generator=g, dtype=dtype)
    k = torch.randn(*shape_k, d, generator=g, dtype=dtype)
    v = torch.randn(*shape_k[:-1], shape_k[-1], d_v, generator=g, dtype=dtype)
    # rescale so that s·max‖q‖·max‖k‖ = radius
    c = math.sqrt(radius / (scale * float(q.norm(dim=-1).max()) * float(k.norm(dim=-1).max())))
    return q * c, k * c, v


def test_rank_is_binomial_and_features_reproduce_the_polynomial(rng):
    for d, g in [(1, 5), (3, 4), (5, 3), (8, 2)]:
        assert attnbound.feature_rank(d, g) == math.comb(d + g, g)
        alpha = monomial_exponents(d, g)
        assert alpha.shape == (math.comb(d + g, g), d)
        assert len({tuple(a) for a in alpha}) == len(alpha)  # every monomial once
        coeffs = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=rng))).normal(size=g + 1)
        q = torch.randn(7, d, generator=rng, dtype=torch.float64) / math.sqrt(d)
        k = torch.randn(9, d, generator=rng, dtype=torch.float64) / math.sqrt(d)
        fq, fk = attnbound.monomial_features(q, g), attnbound.monomial_features(k, g)
        w = torch.as_tensor(monomial_weights(coeffs, d))
        got = (fq * w[:, None]).T @ fk
        u = q @ k.T
        want = sum(c * u**j for j, c in enumerate(coeffs))
        assert torch.allclose(got, want, atol=1e-12)


def test_features_with_grad_equal_features_without(rng):
    x = torch.randn(11, 4, generator=rng, dtype=torch.float64, requires_grad=True)
    a = attnbound.monomial_features(x, 3)
    with torch.no_grad():
        b = attnbound.monomial_features(x, 3)
    assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("radius", [0.3, 1.0, 2.5, 6.0])
def test_chebyshev_delta_is_rigorous_against_mpmath(radius):
    mpmath.mp.dps = 40
    for g in range(1, 14):
        delta = attnbound.chebyshev_error(radius, g)
        a = attnbound.chebyshev_coefficients(radius, g)
        worst = 0.0
        for u in np.linspace(-1, 1, 801):
            p = sum(mpmath.mpf(float(c)) * mpmath.mpf(float(u)) ** j for j, c in enumerate(a))
            worst = max(worst, float(abs(mpmath.exp(radius * mpmath.mpf(float(u))) - p)))
        assert worst <= delta
        # and it is not wildly loose: within 3x of the true max error when it is above rounding
        if worst > 1e-13:
            assert delta <= 3 * worst + 1e-13


@pytest.mark.parametrize("radius", [0.5, 1.0, 3.0])
def test_taylor_remainder_is_rigorous_against_mpmath(radius):
    mpmath.mp.dps = 40
    for p in range(0, 12, 2):
        a = attnbound.taylor_coefficients(radius, p)
        worst = max(
            float(abs(mpmath.exp(radius * mpmath.mpf(float(u)))
                      - sum(mpmath.mpf(float(c)) * mpmath.mpf(float(u)) ** j for j, c in enumerate(a))))
            for u in np.linspace(-1, 1, 401)
        )
        assert worst <= attnbound.taylor_remainder(radius, p)


@settings(max_examples=30, deadline=None)
@given(
    n_q=st.integers(1, 30), n_k=st.integers(1, 30), d=st.integers(1, 5), d_v=st.integers(1, 4),
    radius=st.floats(0.05, 3.0), method=st.sampled_from(["polynomial", "taylor"]),
    level=st.integers(0, 3), seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["softmax", "l2"]),
)
def test_measured_error_within_certificate_random(n_q, n_k, d, d_v, radius, method, level, seed, kind):
    g = torch.Generator().manual_seed(seed)
    scale = 1 / math.sqrt(d)
    q, k, v = scaled_inputs(g, (2, n_q), (2, n_k), d, d_v, radius, scale)
    eps = [1e-1, 1e-3, 1e-5, 1e-8][level]
    try:
        out, cert = attnbound.attention(q, k, v, method=method, eps=eps, kind=kind, return_certificate=True)
    except ValueError as exc:  # no degree reaches eps at this radius, or the chosen one's rounding on this
        # input misses it (a degree taken on its approximation term alone): either way the call must say so
        assert "cannot be certified" in str(exc) or "rounding bound on this input" in str(exc), str(exc)
        return
    err = measured(out, q, k, v, scale, kind)
    assert err <= cert.output_error_bound <= eps


@pytest.mark.parametrize("method,param", METHODS)
@pytest.mark.parametrize("is_causal", [False, True])
def test_certificate_holds_on_adversarial_inputs(method, param, is_causal, rng):
    d, n = 6, 48
    scale = 1 / d
    u = torch.randn(d, generator=rng, dtype=torch.float64)
    u = u / u.norm()
    B = 1.2
    # aligned vectors at the norm bound: every score equals ±R, the worst case of the remainder
    aligned_q = (B * math.sqrt(d) * u).expand(n, d).clone()
    aligned_k = aligned_q.clone()
    aligned_k[::2] *= -1
    # peaked: each query has one aligned key, the others point elsewhere
    peaked_q = torch.randn(n, d, generator=rng, dtype=torch.float64)
    peaked_q = peaked_q / peaked_q.norm(dim=-1, keepdim=True) * B * math.sqrt(d)
    peaked_k = -peaked_q.roll(1, 0)
    peaked_k[::5] = peaked_q[::5]
    # tiny and large norms mixed
    mixed_q = torch.randn(n, d, generator=rng, dtype=torch.float64) * torch.logspace(-4, 0, n, dtype=torch.float64)[:, None]
    mixed_k = torch.randn(n, d, generator=rng, dtype=torch.float64) * torch.logspace(0, -4, n, dtype=torch.float64)[:, None]
    v = torch.randn(n, 3, generator=rng, dtype=torch.float64) * 5
    for q, k in ((aligned_q, aligned_k), (peaked_q, peaked_k), (mixed_q, mixed_k)):
        for deg in ([4, 6, 10] if method == "taylor" else [3, 5, 9]):
            try:
                out, cert = attnbound.attention(q, k, v, method=method, scale=scale, is_causal=is_causal,
                                                return_certificate=True, **{param: deg})
            except ValueError as exc:
                assert "η" in str(exc)
                continue
            err = measured(out, q, k, v, scale, is_causal=is_causal)
            assert err <= cert.output_error_bound, (deg, err, cert)


def test_declared_bound_radius_and_violation(rng):
    d = 4
    q = torch.rand(20, d, generator=rng, dtype=torch.float64) * 2 - 1
    k = torch.rand(20, d, generator=rng, dtype=torch.float64) * 2 - 1
    v = torch.randn(20, 2, generator=rng, dtype=torch.float64)
    out, cert = attnbound.attention(q, k, v, scale=1 / d, method="polynomial", eps=1e-6, bound=1.0,
                                    return_certificate=True)
    assert cert.radius_source == "bound" and cert.radius == pytest.approx(1.0)
    assert measured(out, q, k, v, 1 / d) <= cert.output_error_bound <= 1e-6
    with pytest.raises(ValueError, match="above the declared bound"):
        attnbound.attention(q * 1.5 + 0.6, k, v, method="polynomial", eps=1e-3, bound=1.0)


@pytest.mark.parametrize("method,param", METHODS)
def test_eps_gives_the_minimal_degree(method, param, rng):
    q, k, v = scaled_inputs(rng, (3, 40), (3, 50), 4, 3, 1.5, 0.5)
    for eps in (1e-2, 1e-4, 1e-6):
        out, cert = attnbound.attention(q, k, v, scale=0.5, method=method, eps=eps, return_certificate=True)
        assert measured(out, q, k, v, 0.5) <= cert.output_error_bound <= eps
        step = 2 if method == "taylor" else 1
        if cert.degree >= step:
            try:
                _, lower = attnbound.attention(q, k, v, scale=0.5, method=method, return_certificate=True,
                                               **{param: cert.degree - step})
                assert lower.output_error_bound > eps
            except ValueError as exc:
                assert "η" in str(exc)


def test_odd_taylor_order_is_refused_with_reason(rng):
    q, k, v = scaled_inputs(rng, (5,), (5,), 3, 2, 0.5, 0.5)
    with pytest.raises(ValueError, match="must be even.*negative"):
        attnbound.taylor_attention(q, k, v, order=3)


def test_uncertifiable_radius_is_refused(rng):
    q, k, v = scaled_inputs(rng, (5,), (5,), 3, 2, 30.0, 1.0)
    with pytest.raises(ValueError, match="η"):
        attnbound.polynomial_attention(q, k, v, degree=2, scale=1.0)
    with pytest.raises(ValueError, match="cannot be certified"):
        attnbound.taylor_attention(q, k, v, eps=1e-3, scale=1.0)


def test_memory_budget_is_enforced_before_allocating(rng):
    q, k, v = scaled_inputs(rng, (64,), (64,), 16, 4, 1.0, 0.25)
    with pytest.raises(ValueError, match=r"memory_budget.*rank r=.*MiB"):
        attnbound.polynomial_attention(q, k, v, degree=6, memory_budget=1 << 20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("method,block", [("dense", None), ("blockwise", 7)])
@pytest.mark.parametrize("radius", [0.5, 8.0, 60.0])
def test_exact_certificate_bounds_the_rounding_error(rng, dtype, method, block, radius):
    s = 1 / math.sqrt(6)
    q, k, v = scaled_inputs(rng, (3, 40), (3, 50), 6, 4, radius, s)
    q[0, :] = k[0, 0]  # aligned at the norm bound: one very peaked row block
    out, cert = attnbound.attention(q.to(dtype), k.to(dtype), v.to(dtype), method=method, block_size=block,
                                    scale=s, return_certificate=True)
    ref = reference_softmax(q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double(), s)
    err = float((out.double() - ref).abs().max())
    assert cert.method == "exact" and err <= cert.output_error_bound
    assert cert.output_error_bound < {torch.float64: 1e-9, torch.float32: 1e-1, torch.bfloat16: math.inf}[dtype]


def test_float32_inputs_are_certified_for_the_returned_tensor(rng):
    q, k, v = scaled_inputs(rng, (2, 200), (2, 300), 8, 8, 1.0, 1 / math.sqrt(8), dtype=torch.float32)
    out, cert = attnbound.attention(q, k, v, method="polynomial", eps=1e-5, return_certificate=True)
    assert out.dtype == torch.float32
    assert measured(out, q, k, v, 1 / math.sqrt(8)) <= cert.output_error_bound <= 1e-5


@pytest.mark.parametrize("method,param,deg", [("polynomial", "degree", 3), ("taylor", "order", 2)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_gradcheck(method, param, deg, is_causal, rng):
    q, k, v = (torch.randn(6, 2, generator=rng, dtype=torch.float64) * 0.4 for _ in range(3))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    # a declared bound fixes R and the normalisation, so the map is one smooth polynomial-feature
    # function; with a data radius, R is treated as a constant (stop-gradient) by design
    bound = float(torch.cat([q, k]).detach().abs().max()) * 1.01
    assert torch.autograd.gradcheck(
        lambda a, b, c: attnbound.attention(a, b, c, method=method, is_causal=is_causal, bound=bound, scale=0.1,
                                            **{param: deg}), (q, k, v))


def test_gradients_close_to_exact_gradients(rng):
    q, k, v = (torch.randn(20, 3, generator=rng, dtype=torch.float64) * 0.5 for _ in range(3))
    grads = []
    for method, kw in (("exact", {}), ("polynomial", {"eps": 1e-8})):
        a, b, c = (x.clone().requires_grad_() for x in (q, k, v))
        attnbound.attention(a, b, c, method=method, **kw).square().sum().backward()
        grads.append(torch.cat([a.grad, b.grad, c.grad]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_plan_picks_exact_when_features_cost_more_and_polynomial_when_n_is_large():
    small = attnbound.plan(64, 64, 64, 64, 4.0, 1e-4)
    assert small.choice.method == "exact"
    big = attnbound.plan(1 << 17, 1 << 17, 8, 8, 1.0, 1e-3)
    assert big.choice.method in ("polynomial", "taylor") and big.choice.certified
    # every certified candidate listed is really within eps, and the choice is the cheapest of them
    ok = [c for c in big.candidates if c.certified and c.fits_memory]
    assert big.choice.seconds == min(c.seconds for c in ok)
    assert all(c.error_bound <= 1e-3 for c in ok)


def test_auto_follows_the_plan(rng):
    q, k, v = scaled_inputs(rng, (1, 4096), (1, 4096), 4, 4, 1.0, 0.5, dtype=torch.float32)
    out, cert = attnbound.attention(q, k, v, scale=0.5, method="auto", eps=1e-3, return_certificate=True)
    p = attnbound.plan(4096, 4096, 4, 4, cert.radius or 1.0, 1e-3, value_range=cert.value_range or 2.0,
                       max_abs_value=cert.max_abs_value or 1.0)
    assert cert.method == p.choice.method
    idx = torch.randperm(4096, generator=rng)[:256]
    ref = reference_softmax(q[:, idx], k, v, 0.5)
    assert float((out[:, idx].double() - ref).abs().max()) <= max(cert.output_error_bound, 1e-6)


def test_auto_runs_exact_in_float64_when_float32_rounding_cannot_meet_eps(rng):
    # peaked inputs (R = 30): no polynomial is certified, so auto runs exact; float32's worst-case
    # rounding bound is above eps = 2e-7, so it must compute in float64 and still meet eps
    s = 1 / math.sqrt(8)
    q, k, _ = scaled_inputs(rng, (1, 3000), (1, 3000), 8, 4, 30.0, s, dtype=torch.float32)
    v = torch.rand(1, 3000, 4, generator=rng) * 2 - 1
    _, c32 = attnbound.attention(q, k, v, method="exact", return_certificate=True)
    assert c32.output_error_bound > 2e-7
    out, cert = attnbound.attention(q, k, v, method="auto", eps=2e-7, return_certificate=True)
    assert cert.method == "exact" and out.dtype == torch.float32
    assert cert.output_error_bound <= 2e-7
    ref = reference_softmax(q.double(), k.double(), v.double(), s)
    assert float((out.double() - ref).abs().max()) <= cert.output_error_bound
