"""attnbound.families: the approximation families of exp behind method="taylor"/"polynomial"/"relative" —
the degrees each allows, its relative error η on [−R, R] (sound against an mpmath evaluation, and a
Taylor value worked out by hand), the smallest certified degree, the certificate a fixed degree carries,
and the scaling of q and k into the polynomial's variable."""

import math

import mpmath
import numpy as np
import pytest
import torch

import attnbound
from attnbound.families import (FAMILIES, MAX_FEATURE_RADIUS, certified_degree, choose_certificate,
                                degree_certificate, family, fixed_degree, polynomial_setup)
from contract import check_contract

F64 = torch.float64
NAMES = sorted(FAMILIES)
COMMON = dict(d=4, n_k=256, value_range=2.0, max_abs_value=1.0, out_dtype=F64)


# ---------------------------------------------------------------- the interface: names, degrees, refusals
def test_family_names_and_unknown_family():
    assert set(FAMILIES) == {"taylor", "polynomial", "relative"}
    for name in FAMILIES:
        assert family(name) is FAMILIES[name] and family(name).name == name
    with pytest.raises(ValueError, match=r"unknown approximation family 'chebyshev'.*'taylor'.*'polynomial'"):
        family("chebyshev")


def test_degrees_step_through_what_each_family_allows():
    assert list(FAMILIES["taylor"].degrees()) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert FAMILIES["taylor"].degree_name == "order"
    for name in ("polynomial", "relative"):
        assert list(FAMILIES[name].degrees()) == list(range(41))
        assert FAMILIES[name].degree_name == "degree"
    for fam in FAMILIES.values():
        for g in fam.degrees():
            assert fam.check_degree(g) == g


def test_fixed_degree_reads_order_for_taylor_and_degree_otherwise():
    assert fixed_degree("taylor", 3, 4) == 4
    assert fixed_degree("polynomial", 3, 4) == 3
    assert fixed_degree("relative", 5, None) == 5
    assert fixed_degree("taylor", 5, None) is None


@pytest.mark.parametrize("odd", [1, 3, 19])
def test_check_degree_refuses_odd_taylor_orders_naming_order(odd):
    with pytest.raises(ValueError, match=rf"^order must be even, got {odd}:.*use order={odd + 1} or order={odd - 1}"):
        FAMILIES["taylor"].check_degree(odd)
    assert FAMILIES["polynomial"].check_degree(odd) == odd  # odd degrees are fine for the other families
    assert FAMILIES["relative"].check_degree(odd) == odd


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [-1, -2, "cap+1", "cap+2", 2.0, True, None, "4"])
def test_check_degree_refuses_out_of_range_or_non_int_naming_the_argument(name, bad):
    fam = FAMILIES[name]
    if isinstance(bad, str) and bad.startswith("cap"):
        bad = fam.max_degree + int(bad[-1])
    word = "order" if name == "taylor" else "degree"
    with pytest.raises(ValueError, match=rf"^{word} must be an int in 0\.\.{fam.max_degree}, got {bad!r}"):
        fam.check_degree(bad)


# ---------------------------------------------------------------- η: edges, a known answer, soundness
@pytest.mark.parametrize("name", NAMES)
def test_eta_is_zero_at_radius_zero_and_the_polynomial_is_one(name):
    fam = FAMILIES[name]
    for g in (0, 2, 6):
        assert fam.eta(0.0, g) == 0.0
        assert list(fam.coefficients(0.0, g)) == [1.0] + [0.0] * g


@pytest.mark.parametrize("name", NAMES)
def test_eta_is_inf_beyond_the_feature_radius_and_never_finite_for_nan(name):
    fam = FAMILIES[name]
    for radius in (MAX_FEATURE_RADIUS * (1 + 1e-12), 701.0, 1e6, math.inf):
        assert fam.eta(radius, 4) == math.inf, radius
    try:
        eta = fam.eta(math.nan, 4)
    except ValueError as exc:  # the relative family refuses a NaN radius outright
        assert "radius" in str(exc)
    else:
        assert eta == math.inf


def test_taylor_eta_known_answer():
    # T_2 at R = 1/2: Lagrange bound e^R·R^3/3! plus the coefficient rounding 2^-52·Σ|a_j|·e^R, a_j = R^j/j!
    e_half = 1.6487212707001282  # e^0.5
    tail = e_half * 0.125 / 6.0  # = 0.0343483598062527
    rounding = 2.0**-52 * (1.0 + 0.5 + 0.125) * e_half
    assert FAMILIES["taylor"].eta(0.5, 2) == pytest.approx(tail + rounding, rel=1e-12, abs=0)
    assert FAMILIES["taylor"].eta(0.5, 2) == pytest.approx(0.0343483598062527, rel=1e-12, abs=0)
    # at a tiny radius the rounding term dominates: R = 2^-20, T_2
    r = 2.0**-20
    e_r = 1.0000009536747712  # e^(2^-20)
    expected = e_r * r**3 / 6.0 + 2.0**-52 * (1.0 + r + r * r / 2.0) * e_r
    assert FAMILIES["taylor"].eta(r, 2) == pytest.approx(expected, rel=1e-12, abs=0)
    assert list(FAMILIES["taylor"].coefficients(0.5, 2)) == [1.0, 0.5, 0.125]


@pytest.mark.parametrize("name, radius, degree", [("taylor", 1.0, 6), ("taylor", 2.0, 10), ("polynomial", 1.0, 5),
                                                  ("polynomial", 4.0, 10), ("relative", 1.0, 5),
                                                  ("relative", 3.0, 8)])
def test_eta_bounds_the_relative_error_of_its_own_coefficients_and_is_tight(name, radius, degree):
    fam = FAMILIES[name]
    a, eta = fam.coefficients(radius, degree), fam.eta(radius, degree)
    assert len(a) == degree + 1 and 0.0 < eta < 1.0
    worst = mpmath.mpf(0)
    with mpmath.workdps(30):
        coeffs = [mpmath.mpf(float(c)) for c in a[::-1]]
        for x in np.linspace(-radius, radius, 2001):
            p = mpmath.polyval(coeffs, mpmath.mpf(float(x)) / radius)
            worst = max(worst, abs(p / mpmath.exp(mpmath.mpf(float(x))) - 1))
    assert float(worst) <= eta <= 2.0 * float(worst), (float(worst), eta)
    # the absolute error δ is the relative one times at most e^R
    assert fam.absolute_error(radius, degree) <= eta * math.exp(radius) * (1 + 1e-12) + 1e-15


# ---------------------------------------------------------------- the smallest certified degree
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("radius, eps", [(0.5, 1e-3), (0.5, 1e-6), (2.0, 1e-3), (2.0, 1e-6)])
@pytest.mark.parametrize("rounding", [True, False])
def test_certified_degree_is_the_smallest_that_meets_eps(name, radius, eps, rounding):
    fam = FAMILIES[name]
    c = certified_degree(name, radius, eps, rounding=rounding, **COMMON)
    assert c is not None and c.degree > 0 and c.degree % fam.step == 0
    term = (lambda x: x.output_error_bound) if rounding else (lambda x: x.approximation_bound)
    assert c.eta < 1.0 and term(c) <= eps and c.method == name and c.radius == radius
    assert c == degree_certificate(name, radius, c.degree, eps=eps, **COMMON)
    below = degree_certificate(name, radius, c.degree - fam.step, eps=eps, **COMMON)
    assert not (below.eta < 1.0 and term(below) <= eps), (c.degree, below)


@pytest.mark.parametrize("name", NAMES)
def test_certified_degree_is_none_when_no_degree_meets_eps(name):
    assert certified_degree(name, 1.0, 1e-300, **COMMON) is None  # below float64's rounding floor
    assert certified_degree(name, 30.0, 1e-3, **COMMON) is None  # beyond every family's reach at its cap
    assert certified_degree(name, 1.0, 1e-3, **COMMON) is not None


@pytest.mark.parametrize("name", NAMES)
def test_posterior_rounding_asks_half_of_eps_of_the_approximation_term(name):
    c = certified_degree(name, 2.0, 1e-4, rounding="posterior", **COMMON)
    assert c == certified_degree(name, 2.0, 5e-5, rounding=False, **COMMON)
    assert c.approximation_bound <= 5e-5


# ---------------------------------------------------------------- choose_certificate: eps or a fixed degree
@pytest.mark.parametrize("name", NAMES)
def test_choose_certificate_with_eps_picks_the_certified_degree(name):
    c = choose_certificate(name, 2.0, eps=1e-4, degree=None, **COMMON)
    assert c.degree == certified_degree(name, 2.0, 1e-4, **COMMON).degree and c.output_error_bound <= 1e-4
    with pytest.raises(ValueError, match=rf"method='{name}' needs eps .* or (order|degree)"):
        choose_certificate(name, 2.0, eps=None, degree=None, **COMMON)
    with pytest.raises(ValueError, match="cannot be certified"):
        choose_certificate(name, 2.0, eps=1e-300, degree=None, **COMMON)
    with pytest.raises(ValueError, match="radius R = 701 is beyond"):
        choose_certificate(name, 701.0, eps=1e-3, degree=None, **COMMON)


@pytest.mark.parametrize("name", NAMES)
def test_choose_certificate_of_an_uncertifiable_fixed_degree(name):
    radius = 20.0  # η ≥ 1 at degree 2 for every family (the relative table stops at 16: η = inf)
    assert not FAMILIES[name].eta(radius, 2) < 1.0
    with pytest.raises(ValueError, match=rf"cannot certify {name} (order|degree) 2 at radius R=20: .*η = .* ≥ 1"):
        choose_certificate(name, radius, eps=None, degree=2, **COMMON)
    c = choose_certificate(name, radius, eps=None, degree=2, strict=False, **COMMON)
    assert c.degree == 2 and c.output_error_bound == math.inf and not c.certified
    with pytest.raises(ValueError, match="eps"):  # with eps, even strict=False raises: the bound misses it
        choose_certificate(name, radius, eps=1e-3, degree=2, strict=False, **COMMON)
    ok = choose_certificate(name, 0.5, eps=None, degree=4, **COMMON)  # a certifiable fixed degree is kept
    assert ok.degree == 4 and ok.certified and ok.eta < 1.0


def test_choose_certificate_checks_the_fixed_degree():
    with pytest.raises(ValueError, match="order must be even"):
        choose_certificate("taylor", 0.5, eps=None, degree=3, **COMMON)
    with pytest.raises(ValueError, match=r"degree must be an int in 0\.\.40"):
        choose_certificate("polynomial", 0.5, eps=None, degree=41, **COMMON)


@pytest.mark.parametrize("method, kw", [("polynomial", {"degree": 2}), ("taylor", {"order": 2})])
def test_fixed_degree_with_eps_raises_when_its_bound_misses(method, kw):
    q, k, v = (torch.randn(10, 4, dtype=F64) * 0.3 for _ in range(3))
    with pytest.raises(ValueError, match="eps"):
        attnbound.attention(q, k, v, method=method, eps=1e-12, **kw)
    out, cert = attnbound.attention(q, k, v, method=method, return_certificate=True, **kw)  # without eps it runs
    check_contract(out, cert, q, k, v)


@pytest.mark.parametrize("radius, target", [(1.0, 5), (2.0, 7), (4.0, 11), (8.0, 17)])
def test_relative_family_meets_the_degree_targets(radius, target):
    from attnbound.families import certified_degree

    kw = dict(d=8, n_k=2**16, value_range=8.0, max_abs_value=4.0)
    c = certified_degree("relative", radius, 1e-3, **kw) or \
        certified_degree("relative", radius, 1e-3, rounding="posterior", **kw)
    cheb = certified_degree("polynomial", radius, 1e-3, **kw) or \
        certified_degree("polynomial", radius, 1e-3, rounding="posterior", **kw)
    assert c.degree <= target and c.degree <= cheb.degree and c.eta < 1.0


# ---------------------------------------------------------------- polynomial_setup: coefficients and scales
def test_polynomial_setup_scales_by_the_bound_or_the_norms():
    coeffs, aq, ak = polynomial_setup("taylor", 2.0, 4, d=4, bound=None, norms=(2.0, 0.5))
    np.testing.assert_allclose(coeffs, [1.0, 2.0, 2.0, 4.0 / 3.0, 2.0 / 3.0], rtol=1e-15)  # a_j = R^j / j!
    assert (aq, ak) == (0.5, 2.0)
    _, aq, ak = polynomial_setup("taylor", 2.0, 4, d=4, bound=3.0, norms=None)
    assert aq == ak == pytest.approx(1.0 / 6.0, rel=1e-15, abs=0)  # 1/(√d·B)
    _, aq, ak = polynomial_setup("polynomial", 2.0, 4, d=4, bound=None, norms=(0.0, 0.0))
    assert (aq, ak) == (1.0, 1.0)  # zero norms: nothing to scale
    coeffs, _, _ = polynomial_setup("relative", 0.0, 6, d=4, bound=None, norms=(1.0, 1.0))
    assert list(coeffs) == [1.0]  # radius 0: P = 1


@pytest.mark.parametrize("name, degree", [("taylor", 10), ("polynomial", 7), ("relative", 6)])
def test_polynomial_setup_evaluates_exp_within_eta(name, degree):
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(20, 5, generator=gen, dtype=F64) * 0.5, torch.randn(30, 5, generator=gen, dtype=F64) * 0.4
    mq, mk = float(q.norm(dim=-1).max()), float(k.norm(dim=-1).max())
    radius = mq * mk  # scale 1: every logit ⟨q, k⟩ lies in [−R, R] (R ≈ 2.2)
    coeffs, aq, ak = polynomial_setup(name, radius, degree, d=5, bound=None, norms=(mq, mk))
    u = ((q * aq) @ (k * ak).T).numpy()
    assert np.abs(u).max() <= 1.0 + 1e-12
    p = np.polynomial.polynomial.polyval(u, coeffs)
    x = (q @ k.T).numpy()
    eta = FAMILIES[name].eta(radius, degree)
    assert 0.0 < eta < 1e-2
    assert np.abs(p / np.exp(x) - 1.0).max() <= eta + 1e-12
