"""attnbound.certificate: the feature and exact certificates on answers worked out by hand, and the terms
the audits found missing (ℓ2 key-norm rounding, subnormal outputs and products, constant values)."""

import math

import pytest
import torch

import attnbound
from attnbound.certificate import exact_certificate, feature_certificate
from contract import check_contract
from contract import check_mp as _check_mp

F64 = torch.float64


# ---------------------------------------------------------------- certificates on answers worked out by hand
def test_feature_certificate_known_answer():
    # η = 0.5, range 3: approximation term η/(1−η)·range = 3 exactly
    c = feature_certificate(method="polynomial", kind="softmax", degree=1, rank=3, radius=0.0, radius_source="data",
                            eta=0.5, delta=0.5, coeff_abs_sum=1.0, n_k=10, d=2, value_range=3.0, max_abs_value=2.0,
                            out_dtype=F64)
    assert c.approximation_bound == 3.0
    u = 2.0**-53
    eta_fp = 21 * u / (1 - 21 * u) * 1.0 * 1.0  # γ_N, N = r + n_k + d + 2g + 4
    rounding = (2 * eta_fp / (1 - 0.5 - eta_fp) + 4 * u + 2.0**-1000 + u) * 2.0 + 2.0**-1022 * u
    assert c.rounding_bound == pytest.approx(rounding, rel=1e-12)
    assert c.output_error_bound == pytest.approx(3.0 + rounding, rel=1e-15)
    # the ℓ2 key-weight factor: (1 + η)(1 + η_w) − 1 with η_w = exp(2γ_{d+2}·L + 6u) − 1
    cw = feature_certificate(method="polynomial", kind="l2", degree=1, rank=3, radius=0.0, radius_source="data",
                             eta=0.0, delta=0.0, coeff_abs_sum=1.0, n_k=10, d=2, value_range=1.0, max_abs_value=1.0,
                             out_dtype=F64, key_log_weight=1e6)
    g = 4 * u / (1 - 4 * u)
    assert cw.eta == pytest.approx(math.expm1(2 * g * 1e6 + 6 * u), rel=1e-9)


def test_exact_certificate_known_answer():
    u = 2.0**-24
    L, d, n, blocks, block = 3.0, 4, 100, 4, 32
    c = exact_certificate(kind="softmax", logit_bound=L, d=d, n_k=n, blocks=blocks, block=block, value_range=2.0,
                          max_abs_value=1.5, compute_dtype=torch.float32, out_dtype=torch.float16, mask_span=5.0)
    g3 = (d + 3) * u / (1 - (d + 3) * u)
    eta = math.expm1(2 * g3 * (2 * L + 5.0) + 2 * u + 3 * u * blocks)
    gm = (block + blocks) * u / (1 - (block + blocks) * u)
    tiny32 = 2.0**-126
    # one subnormal step of the float16 output, and of float32 for each product, rescale and the division
    expected = eta / (1 - eta) * 2.0 + (2 * gm / (1 - gm) + 2 * u + 2.0**-11) * 1.5 + 2 * n * tiny32 * 1.5 \
        + 2.0**-14 * 2.0**-10 + (n + blocks + 2) * tiny32 * 2.0**-23
    assert c.output_error_bound == pytest.approx(expected, rel=1e-12)
    # a mask spanning far more than the cut is charged as a mass: 4e^{-40}·max|v|
    far = exact_certificate(kind="softmax", logit_bound=L, d=d, n_k=n, blocks=1, value_range=2.0, max_abs_value=1.5,
                            compute_dtype=F64, out_dtype=F64, mask_span=1e30)
    cut = 2 * (2 * L + 1 + math.log(n) + 40)
    u64 = 2.0**-53
    eta64 = math.expm1(2 * ((d + 3) * u64 / (1 - (d + 3) * u64)) * (2 * L + cut) + 2 * u64 + 3 * u64)
    assert far.output_error_bound >= 4 * math.exp(-40) * 1.5 + eta64 / (1 - eta64) * 2.0


def test_posterior_rounding_known_answer():
    u = 2.0**-53
    kw = dict(method="relative", kind="softmax", degree=2, rank=6, radius=3.0, radius_source="data", eta=0.0,
              delta=0.0, coeff_abs_sum=20.0, n_k=100, d=2, value_range=1.0, max_abs_value=1.0, out_dtype=F64)
    g = 116 * u / (1 - 116 * u)  # N = r + n_k + d + 2g + 4
    prior = feature_certificate(**kw)
    post = feature_certificate(min_denominator=50.0, **kw)
    e_prior = g * 20.0 * math.exp(3.0)
    err = g * 20.0 * 100
    e_post = err / (50.0 - err)
    assert prior.rounding_bound == pytest.approx((2 * e_prior / (1 - e_prior) + 4 * u + 2.0**-1000 + u) * 1.0
                                                 + 2.0**-1022 * u, rel=1e-12)
    assert post.rounding_bound == pytest.approx((2 * e_post / (1 - e_post) + 4 * u + 2.0**-1000 + u) * 1.0
                                                + 2.0**-1022 * u, rel=1e-12)
    assert feature_certificate(min_denominator=err / 2, **kw).rounding_bound == prior.rounding_bound


def test_certified_is_false_for_infinite_or_nan_bounds():
    c = exact_certificate(kind="softmax", logit_bound=1e300, d=4, n_k=4, blocks=1, value_range=1.0,
                          max_abs_value=1.0, compute_dtype=torch.float32, out_dtype=torch.float32)
    assert c.output_error_bound == math.inf and not c.certified


def test_output_bound_has_no_nan_when_values_are_constant():
    c = feature_certificate(method="polynomial", kind="softmax", degree=2, rank=6, radius=800.0, radius_source="data",
                            eta=math.inf, delta=math.inf, coeff_abs_sum=math.inf, n_k=4, d=2, value_range=0.0,
                            max_abs_value=0.0, out_dtype=torch.float32)
    assert c.output_error_bound == math.inf and not c.certified


# ---------------------------------------------------------------- finding 2: rounding of ‖k‖² in the certificate
def test_l2_key_norm_rounding_is_in_the_certificate():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(20, 3, generator=gen, dtype=F64) * 1e-9
    k = torch.randn(20, 3, generator=gen, dtype=F64) * 3e5
    v = torch.randn(20, 2, generator=gen, dtype=F64)
    out, cert = attnbound.attention(q, k, v, kind="l2", scale=1e-3, method="polynomial", degree=4,
                                    return_certificate=True)
    check_contract(out, cert, q, k, v, scale=1e-3, kind="l2")
    assert cert.eta > 1e-8  # 2γ·s·max‖k‖² ≈ 2·5·1.1e-16·1e-3·(5e5)² is charged


# ---------------------------------------------------------------- finding 8: subnormal outputs
@pytest.mark.parametrize("method", ["dense", "blockwise", "polynomial"])
def test_subnormal_half_precision_outputs_are_covered(method):
    gen = torch.Generator().manual_seed(9)
    q, k = (torch.randn(30, 4, generator=gen) * 0.3 for _ in range(2))
    v = torch.rand(30, 3, generator=gen) * 2e-5  # below float16's smallest normal 6.1e-5
    q, k, v = q.half(), k.half(), v.half()
    kw = {"degree": 6} if method == "polynomial" else {}
    out, cert = attnbound.attention(q, k, v, method=method, block_size=8, return_certificate=True, **kw)
    check_contract(out, cert, q, k, v)


# ---------------------------------------------------------------- second audit: logits formed from subnormal products
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d, s", [(65536, 2.0**127.9), (4096, 2.0**131.9)])  # the scale fits float32, or not
def test_logits_from_subnormal_products_are_charged(dtype, d, s):
    t = 2.0**-149
    a = math.sqrt(0.51 * t)
    q = torch.full((1, d), a)
    k = torch.stack([torch.full((d,), a), torch.full((d,), 0.49 * t / a)])
    v = torch.tensor([[0.0], [1.0]])  # the logits are O(1), but every product q_c·k_c lies in the subnormal range
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    for method in ("exact", "dense", "blockwise"):
        out, cert = attnbound.attention(q, k, v, scale=s, method=method, return_certificate=True)
        _check_mp(out, cert, q, k, v, s)


def test_subnormal_values_are_charged_per_product():
    """Products p_j·v_j of subnormal values round by an absolute step each (not relatively). Three float32 values of
    a few 2^-149 gave an error of 1.8e-45 against bounds of 0.7e-45 (SDPA) / 1.4e-45 (dense); with 23 keys the error
    (3.8e-45) exceeds any bound that charges the step once per call (2.8e-45)."""
    import mpmath

    mpmath.mp.dps = 60
    t = 2.0**-149
    k23 = [[-1.4339576959609985, 4.889946937561035], [-2.585667848587036, -0.7137735486030579],
           [-2.1423871517181396, 1.5500813722610474], [2.041222095489502, -4.579535484313965],
           [2.524507761001587, 1.3106409311294556], [-1.1041542291641235, -3.0007190704345703],
           [-3.623945474624634, -1.618714690208435], [-1.1570833921432495, -0.023798499256372452],
           [-3.374645709991455, -0.7921921610832214], [-2.537506580352783, 1.1072301864624023],
           [3.3354766368865967, -0.2781592607498169], [2.7998127937316895, 1.7912696599960327],
           [-1.119612455368042, -0.14866676926612854], [-0.1210181936621666, 3.3767292499542236],
           [-1.421170711517334, -0.4180537462234497], [0.5030959844589233, 0.3943183124065399],
           [2.0866973400115967, 0.35776153206825256], [0.7334267497062683, 1.9386502504348755],
           [2.6763811111450195, 0.1623140573501587], [-1.7975794076919556, 1.0779832601547241],
           [0.48053571581840515, 0.5820731520652771], [1.19595205783844, -0.1912682205438614],
           [-3.0576376914978027, -0.025672856718301773]]
    v23 = [39, -21, 34, 15, 40, 40, 10, 35, 29, 11, -22, -5, -5, 35, -21, 19, -22, 3, -5, 39, 24, -27, 20]
    cases = [([[-2.9629621505737305]], [[-0.1503623127937317], [1.2812950611114502], [0.9420686960220337]],
              [28, -30, -12]),
             ([[-0.16831260919570923, 0.7148520350456238]], k23, v23)]
    for qs, ks, vs in cases:
        q, k = torch.tensor(qs), torch.tensor(ks)
        v = torch.tensor([[x * t] for x in vs])
        w = [mpmath.exp(mpmath.fsum(mpmath.mpf(a) * mpmath.mpf(b) for a, b in zip(qs[0], kj))) for kj in ks]
        exact = mpmath.fsum(wj * mpmath.mpf(x * t) for wj, x in zip(w, vs)) / mpmath.fsum(w)
        for method in ("exact", "dense", "blockwise"):
            out, cert = attnbound.attention(q, k, v, scale=1.0, method=method, return_certificate=True)
            assert abs(mpmath.mpf(out.item()) - exact) <= cert.output_error_bound, (method, len(vs))


def test_a_float64_bound_is_never_rounded_to_zero():
    """The exact output 2^-1075 (not a double) comes out as 0 or 2^-1074, an error of exactly 2^-1075: every
    method's bound must be a positive double (2.0**-1075 itself rounds to 0.0, so compare in rationals)."""
    from fractions import Fraction

    q, k = torch.zeros(1, 1, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64)
    v = torch.tensor([[5e-324], [0.0]], dtype=torch.float64)
    for method, kw in [("exact", {}), ("dense", {}), ("blockwise", {}), ("polynomial", {"degree": 2}),
                       ("taylor", {"order": 2}), ("relative", {"degree": 2})]:
        out, cert = attnbound.attention(q, k, v, method=method, return_certificate=True, **kw)
        err = abs(Fraction(float(out)) - Fraction(1, 2**1075))
        assert err <= Fraction(cert.output_error_bound), (method, cert.output_error_bound)
