"""The contract: every returned tensor is finite, of the documented shape and dtype, and within its
certificate of the exact attention of the inputs as given (long-double reference, tests/reference.py);
with eps the bound meets eps or the call raises. One regression test per finding of the audit."""

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnbound
from attnbound.certificate import exact_certificate, feature_certificate
from attnbound.engines.features import CAUSAL_TILE, feature_attention
from attnbound.planner import plan
from reference import dense_feature_reference, long_double_attention, max_error

F64 = torch.float64


def check_contract(out, cert, q, k, v, *, scale=None, kind="softmax", is_causal=False, attn_mask=None, eps=None):
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    assert out.shape == (*batch, q.shape[-2], v.shape[-1])
    assert out.dtype == q.dtype
    assert bool(torch.isfinite(out).all())
    s = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    ref = long_double_attention(q, k, v, scale=s, kind=kind, is_causal=is_causal, attn_mask=attn_mask)
    err = max_error(out, ref)
    assert err <= cert.output_error_bound, (err, cert)
    if eps is not None:
        assert cert.output_error_bound <= eps
    if not math.isfinite(cert.output_error_bound):
        assert not cert.certified
    return err


# ---------------------------------------------------------------- finding 1: ℓ2 + causal / key padding
@pytest.mark.parametrize("method", ["taylor", "polynomial", "auto"])
@pytest.mark.parametrize("masking", ["causal", "padding", "both"])
def test_l2_feature_rows_do_not_vanish_because_of_keys_they_cannot_see(method, masking):
    gen = torch.Generator().manual_seed(1)
    n, d = 80, 4
    q = torch.randn(n, d, generator=gen, dtype=F64) * 1e-3
    k = torch.randn(n, d, generator=gen, dtype=F64)
    k = k / k.norm(dim=-1, keepdim=True) * 40.0  # ‖k‖² = 1600: exp(−s·1600) underflows next to a zero key
    k[-5:] = 0.0  # the smallest-norm keys come last: early causal rows cannot see them
    v = torch.randn(n, 3, generator=gen, dtype=F64)
    mask = None
    if masking in ("padding", "both"):
        mask = torch.ones(1, n, dtype=torch.bool)
        mask[0, -5:] = False  # ...and padding hides them from everyone
    causal = masking in ("causal", "both")
    out, cert = attnbound.attention(q, k, v, kind="l2", scale=1.0, is_causal=causal, attn_mask=mask, method=method,
                                    eps=1e-6, return_certificate=True)
    assert cert.method != "exact" or method == "auto"
    check_contract(out, cert, q, k, v, scale=1.0, kind="l2", is_causal=causal, attn_mask=mask, eps=1e-6)


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


# ---------------------------------------------------------------- finding 3: (…, 1, n_k) masks in blockwise exact
@pytest.mark.parametrize("n_q", [1, 63, 64, 65, 130])
@pytest.mark.parametrize("mask_dtype", [torch.bool, F64])
def test_blockwise_broadcasts_a_size_one_query_dim(n_q, mask_dtype):
    gen = torch.Generator().manual_seed(n_q)
    q = torch.randn(2, n_q, 4, generator=gen, dtype=F64)
    k, v = torch.randn(2, 70, 4, generator=gen, dtype=F64), torch.randn(2, 70, 3, generator=gen, dtype=F64)
    keep = torch.rand(2, 1, 70, generator=gen) > 0.3
    mask = keep if mask_dtype == torch.bool else torch.where(keep, 0.0, -5.0).to(F64)
    for method in ("blockwise", "exact", "dense"):
        out, cert = attnbound.attention(q, k, v, attn_mask=mask, method=method, block_size=64,
                                        return_certificate=True)
        check_contract(out, cert, q, k, v, attn_mask=mask)


# ---------------------------------------------------------------- finding 4: +inf and overflowing additive masks
def test_plus_inf_in_a_mask_is_refused():
    q = torch.randn(4, 3)
    mask = torch.zeros(4, 4)
    mask[1, 2] = math.inf
    with pytest.raises(ValueError, match=r"attn_mask contains \+inf"):
        attnbound.attention(q, q, q, attn_mask=mask)


@pytest.mark.parametrize("method", ["dense", "blockwise"])
def test_float64_mask_that_overflows_float32_gives_the_exact_answer(method):
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(6, 8, 3, generator=gen) for _ in range(3))
    mask = torch.randn(8, 8, generator=gen, dtype=F64)
    mask[2] -= 1e300  # a whole row far below float32's range: the row shift keeps it exact
    mask[3, :4] = -1e300  # some keys of a row far below the others
    mask[4] = -1e30  # a finite row of "masked" values as many libraries write them
    out, cert = attnbound.attention(q, k, v, attn_mask=mask, method=method, block_size=3, return_certificate=True)
    check_contract(out, cert, q, k, v, attn_mask=mask)
    assert cert.certified


# ---------------------------------------------------------------- finding 5: overflow of values, scale, keys
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("method", ["dense", "blockwise", "polynomial"])
def test_values_near_the_dtype_maximum_stay_finite(dtype, method):
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(40, 4, generator=gen, dtype=dtype) * 0.3 for _ in range(2))
    for top in (0.45, 0.9):  # a value range of 0.9·max is representable; at 1.8·max the bound says inf
        v = torch.sign(torch.randn(40, 2, generator=gen, dtype=dtype)) * torch.finfo(dtype).max * top
        kw = {"eps": 1e-6 * float(v.abs().max())} if method == "polynomial" and top < 0.5 else {}
        if method == "polynomial" and not kw:
            kw = {"degree": 8}
        out, cert = attnbound.attention(q, k, v, method=method, block_size=16, return_certificate=True, **kw)
        check_contract(out, cert, q, k, v)
        if dtype == F64:  # float32 ranges fit in a Python float
            assert cert.certified == (top < 0.5)


@pytest.mark.parametrize("method", ["exact", "dense", "blockwise", "auto"])
def test_huge_scale_or_keys_give_the_exact_answer_or_a_clear_error(method):
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(12, 4, generator=gen) for _ in range(3))
    kw = {"eps": 1e-3} if method == "auto" else {}
    for scale, kk in ((1e36, k), (None, k * 1e37)):
        if kw:  # logits of 1e37 have no finite rounding bound: eps cannot be certified, and auto says so
            with pytest.raises(ValueError, match="eps"):
                attnbound.attention(q, kk, v, scale=scale, method=method, **kw)
            continue
        out, cert = attnbound.attention(q, kk, v, scale=scale, method=method, return_certificate=True)
        check_contract(out, cert, q, kk, v, scale=scale)
    with pytest.raises(ValueError, match="scale"):
        attnbound.attention(q.double(), k.double() * 1e300, v.double(), scale=1e10, method=method, **kw)


def test_output_bound_has_no_nan_when_values_are_constant():
    c = feature_certificate(method="polynomial", kind="softmax", degree=2, rank=6, radius=800.0, radius_source="data",
                            eta=math.inf, delta=math.inf, coeff_abs_sum=math.inf, n_k=4, d=2, value_range=0.0,
                            max_abs_value=0.0, out_dtype=torch.float32)
    assert c.output_error_bound == math.inf and not c.certified


# ---------------------------------------------------------------- finding 6: auto never returns bound > eps
@pytest.mark.parametrize("dtype, eps, word", [(torch.bfloat16, 1e-3, "bfloat16 output cannot carry"),
                                              (torch.float16, 1e-4, "float16 output cannot carry"),
                                              (torch.float32, 1e-10, "float32 output cannot carry")])
@pytest.mark.parametrize("method", ["auto", "exact"])
def test_eps_below_the_output_dtype_rounding_raises_and_says_why(dtype, eps, word, method):
    q, k, v = (torch.randn(8, 4).to(dtype) for _ in range(3))
    with pytest.raises(ValueError, match=word):
        attnbound.attention(q, k, v, method=method, eps=eps)


def test_a_huge_key_hidden_by_the_mask_does_not_break_auto():
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 50, 8, generator=gen) * 0.3 for _ in range(3))
    k[:, -1] = 1e3
    pad = torch.ones(2, 1, 50, dtype=torch.bool)
    pad[:, :, -1] = False
    out, cert = attnbound.attention(q, k, v, attn_mask=pad, method="auto", eps=1e-3, return_certificate=True)
    check_contract(out, cert, q, k, v, attn_mask=pad, eps=1e-3)


@pytest.mark.parametrize("method, kw", [("polynomial", {"degree": 2}), ("taylor", {"order": 2})])
def test_fixed_degree_with_eps_raises_when_its_bound_misses(method, kw):
    q, k, v = (torch.randn(10, 4, dtype=F64) * 0.3 for _ in range(3))
    with pytest.raises(ValueError, match="eps"):
        attnbound.attention(q, k, v, method=method, eps=1e-12, **kw)
    out, cert = attnbound.attention(q, k, v, method=method, return_certificate=True, **kw)  # without eps it runs
    check_contract(out, cert, q, k, v)


def test_plan_rates_exact_by_its_real_certificate():
    p = plan(256, 256, 16, 16, 4.0, 1e-6, out_dtype=torch.float32)
    ex = p.candidates[0]
    assert ex.method == "exact" and ex.error_bound > 0 and ex.certificate.compute_dtype == "float64"
    p32 = plan(256, 256, 16, 16, 4.0, 1e-2, out_dtype=torch.float32)
    assert p32.candidates[0].certificate.compute_dtype == "float32"


# ---------------------------------------------------------------- finding 7: radius past ~710
@pytest.mark.parametrize("radius", [709.0, 800.0, 1e6])
def test_plan_picks_exact_at_huge_radius(radius):
    p = plan(64, 64, 4, 4, radius, 1e-2, logit_bound=radius, out_dtype=F64)
    assert p.choice.method == "exact"


def test_auto_at_huge_radius_runs_exact():
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(30, 4, generator=gen, dtype=F64) * 40 for _ in range(3))
    out, cert = attnbound.attention(q, k, v, method="auto", eps=1e-6, return_certificate=True)
    assert cert.method == "exact"
    check_contract(out, cert, q, k, v, eps=1e-6)
    with pytest.raises(ValueError, match="radius"):
        attnbound.attention(q, k, v, method="polynomial", eps=1e-3)


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


# ---------------------------------------------------------------- finding 10: empty inputs
@pytest.mark.parametrize("method", ["exact", "dense", "blockwise", "taylor", "polynomial", "auto"])
@pytest.mark.parametrize("shape", [("n_q", (0, 3), (5, 3), (5, 2)), ("batch", (0, 4, 3), (0, 5, 3), (0, 5, 2)),
                                   ("d_v", (4, 3), (5, 3), (5, 0))])
def test_empty_outputs_are_consistent(method, shape):
    _, sq, sk, sv = shape
    q, k, v = torch.randn(sq), torch.randn(sk), torch.randn(sv)
    out, cert = attnbound.attention(q, k, v, method=method, eps=1e-3, return_certificate=True)
    assert out.shape == (*torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]), sq[-2], sv[-1])
    assert out.dtype == q.dtype and cert.output_error_bound == 0.0


# ---------------------------------------------------------------- finding 11: memory guards
def test_dense_respects_the_memory_budget_and_mask_cannot_grow_the_batch():
    q = torch.randn(1, 4096, 4)
    with pytest.raises(ValueError, match="memory_budget"):
        attnbound.attention(q, q, q, method="dense", memory_budget=1 << 20)
    out = attnbound.attention(q, q, q, method="exact", memory_budget=64 << 20)  # exact goes blockwise instead
    assert out.shape == q.shape
    small = torch.randn(4, 3)
    with pytest.raises(ValueError, match="attn_mask"):
        attnbound.attention(small, small, small, attn_mask=torch.ones(7, 1, 4, 4, dtype=torch.bool))


def test_bound_must_be_a_positive_real():
    q = torch.randn(4, 3)
    for bad in (0.0, -1.0, True, math.nan, math.inf):
        with pytest.raises(ValueError, match="bound"):
            attnbound.attention(q, q, q, method="polynomial", eps=1e-2, bound=bad)


# ---------------------------------------------------------------- the engine at every tile and chunk boundary
@pytest.mark.parametrize("n", [1, 63, 64, 65, 300, 1025])
@pytest.mark.parametrize("weighted", [False, True])
def test_feature_engine_matches_the_dense_reference_across_tiles_and_chunks(n, weighted):
    gen = torch.Generator().manual_seed(n)
    d, g = 3, 3
    q = torch.randn(2, n, d, generator=gen, dtype=F64)
    k = torch.randn(2, n, d, generator=gen, dtype=F64)
    q, k = q / q.norm(dim=-1).max(), k / k.norm(dim=-1).max()
    v = torch.randn(2, n, 2, generator=gen, dtype=F64)
    coeffs = np.array([1.0, 1.0, 0.5, 1 / 6])
    lw = None
    if weighted:  # ℓ2-like log-weights spanning far more than float64's exponent range, plus masked keys
        lw = -torch.rand(2, n, generator=gen, dtype=F64) * 2000.0
        lw[:, ::7] = -math.inf
    for causal in (False, True):
        ref = dense_feature_reference(q, k, v, coeffs, key_log_weight=lw, is_causal=causal)
        for chunk in (100, 4096):
            out = feature_attention(q, k, v, coeffs=coeffs, key_log_weight=lw, is_causal=causal, chunk=chunk)
            assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12), (causal, chunk)
    assert CAUSAL_TILE == 64  # the lengths above cross it


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
    expected = eta / (1 - eta) * 2.0 + (2 * gm / (1 - gm) + 2 * u + 2.0**-11) * 1.5 + 2 * n * tiny32 * 1.5 \
        + 2.0**-14 * 2.0**-11 + tiny32 * u
    assert c.output_error_bound == pytest.approx(expected, rel=1e-12)
    # a mask spanning far more than the cut is charged as a mass: 4e^{-40}·max|v|
    far = exact_certificate(kind="softmax", logit_bound=L, d=d, n_k=n, blocks=1, value_range=2.0, max_abs_value=1.5,
                            compute_dtype=F64, out_dtype=F64, mask_span=1e30)
    cut = 2 * (2 * L + 1 + math.log(n) + 40)
    u64 = 2.0**-53
    eta64 = math.expm1(2 * ((d + 3) * u64 / (1 - (d + 3) * u64)) * (2 * L + cut) + 2 * u64 + 3 * u64)
    assert far.output_error_bound >= 4 * math.exp(-40) * 1.5 + eta64 / (1 - eta64) * 2.0


def test_certified_is_false_for_infinite_or_nan_bounds():
    c = exact_certificate(kind="softmax", logit_bound=1e300, d=4, n_k=4, blocks=1, value_range=1.0,
                          max_abs_value=1.0, compute_dtype=torch.float32, out_dtype=torch.float32)
    assert c.output_error_bound == math.inf and not c.certified


# ---------------------------------------------------------------- property test over the whole surface
METHODS = ["exact", "dense", "blockwise", "taylor", "polynomial", "auto"]
MASKS = ["none", "padding", "bool", "additive"]
DTYPES = [F64, torch.float32, torch.float16, torch.bfloat16]


SWEEP = int(os.environ.get("ATTNBOUND_SWEEP", "0"))  # e.g. ATTNBOUND_SWEEP=2000: a long random sweep


@settings(max_examples=SWEEP or 80, deadline=None, derandomize=not SWEEP, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["softmax", "l2"]), mask=st.sampled_from(MASKS), causal=st.booleans(),
       dtype=st.sampled_from(DTYPES), method=st.sampled_from(METHODS), n=st.integers(1, 70),
       radius=st.floats(0.05, 3.0), seed=st.integers(0, 2**16), centre=st.sampled_from([None, True, False]),
       heavy=st.sampled_from([None, 0, 1, 3]), offset=st.sampled_from([0.0, 2.0]))
def test_contract_holds_everywhere(kind, mask, causal, dtype, method, n, radius, seed, centre, heavy, offset):
    gen = torch.Generator().manual_seed(seed)
    d = 4
    q, k = (torch.randn(2, n, d, generator=gen, dtype=F64) for _ in range(2))
    c = math.sqrt(radius * math.sqrt(d) / float(q.norm(dim=-1).max() * k.norm(dim=-1).max()))
    q, k = q * c, k * c
    if offset:  # a common offset (centring pays) and one outlier token (a heavy token pays)
        shift = torch.randn(d, generator=gen, dtype=F64) * offset / math.sqrt(d)
        q, k = q + shift, k + shift
        q[:, 0] *= 3.0
        k[:, -1] *= 3.0
    v = torch.randn(2, n, 3, generator=gen, dtype=F64)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    attn_mask = None
    if mask == "padding":
        attn_mask = torch.rand(2, 1, n, generator=gen) > 0.3
    elif mask == "bool":
        attn_mask = torch.rand(n, n, generator=gen) > 0.3
    elif mask == "additive":
        attn_mask = torch.randn(n, n, generator=gen, dtype=F64).to(dtype) * 3
    approx = method in ("taylor", "polynomial")
    general = mask == "additive" or (mask == "bool" and n > 1)  # a (1, 1) bool mask is key padding
    eps = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    kw = {"eps": eps} if approx or method == "auto" else {}
    if approx or method == "auto":
        kw.update(centre=centre, heavy=heavy)
    if approx and general:
        with pytest.raises(ValueError, match="attn_mask"):
            attnbound.attention(q, k, v, kind=kind, is_causal=causal, attn_mask=attn_mask, method=method, **kw)
        return
    try:
        out, cert = attnbound.attention(q, k, v, kind=kind, is_causal=causal, attn_mask=attn_mask, method=method,
                                        block_size=16, return_certificate=True, **kw)
    except ValueError as exc:  # only a stated reason is acceptable, and only when eps cannot be met
        assert "eps" in str(exc) and "eps" in kw, exc
        return
    check_contract(out, cert, q, k, v, kind=kind, is_causal=causal, attn_mask=attn_mask, eps=kw.get("eps"))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to read peak memory")
@pytest.mark.parametrize("n, g, causal", [(65536, 4, False), (32768, 6, True)])
def test_memory_estimate_covers_the_measured_peak(n, g, causal):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "scripts", "peak_memory.py")
    res = subprocess.run([sys.executable, script, str(n), "8", str(g), "1" if causal else "0"], capture_output=True,
                         text=True, check=True)
    measured, estimate = map(int, res.stdout.split())
    assert measured <= estimate, (measured, estimate)


# ---------------------------------------------------------------- the relative family and the a-posteriori rounding term
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


@pytest.mark.parametrize("radius, target", [(1.0, 5), (2.0, 7), (4.0, 11), (8.0, 17)])
def test_relative_family_meets_the_degree_targets(radius, target):
    from attnbound.families import certified_degree

    kw = dict(d=8, n_k=2**16, value_range=8.0, max_abs_value=4.0)
    c = certified_degree("relative", radius, 1e-3, **kw) or \
        certified_degree("relative", radius, 1e-3, rounding="posterior", **kw)
    cheb = certified_degree("polynomial", radius, 1e-3, **kw) or \
        certified_degree("polynomial", radius, 1e-3, rounding="posterior", **kw)
    assert c.degree <= target and c.degree <= cheb.degree and c.eta < 1.0


def _logits_all_at(value, n, d, dtype=F64):
    """q_i = a·e_1, k_j = b·e_1: every logit s·a·b equals ``value`` (the worst case for the rounding term)."""
    q = torch.zeros(1, n, d, dtype=dtype)
    k = torch.zeros(1, n, d, dtype=dtype)
    q[..., 0] = -1.0 if value < 0 else 1.0
    k[..., 0] = abs(value) * math.sqrt(d)
    return q, k


def test_posterior_rounding_decides_and_auto_falls_back_to_exact():
    n, d, eps = 512, 2, 1e-6
    gen = torch.Generator().manual_seed(11)
    v = torch.sign(torch.randn(1, n, 3, generator=gen, dtype=F64))
    # benign: logits spread around 0, the measured row sums are large: the a-posteriori bound certifies
    q = torch.randn(1, n, d, generator=gen, dtype=F64)
    k = torch.randn(1, n, d, generator=gen, dtype=F64)
    c = math.sqrt(8 * math.sqrt(d) / float(q.norm(dim=-1).max() * k.norm(dim=-1).max()))
    out, cert = attnbound.attention(q * c, k * c, v, method="relative", eps=eps, return_certificate=True)
    check_contract(out, cert, q * c, k * c, v, eps=eps)
    # adversarial: every logit at −R; the row sums are n·e^{−R}: the measured bound misses eps
    qa, ka = _logits_all_at(-8.0, n, d)
    ka[:, ::2, 1] = 1e-3  # the keys differ a little, so the answer is not trivially the mean
    with pytest.raises(ValueError, match="rounding bound on this input"):
        attnbound.attention(qa, ka, v, method="relative", eps=eps)
    # (centring removes the common direction: the radius collapses and the polynomial certifies)
    out, cert = attnbound.attention(qa, ka, v, method="relative", eps=eps, centre=True, return_certificate=True)
    assert "centred" in cert.radius_source and cert.radius < 0.1
    check_contract(out, cert, qa, ka, v, eps=eps)
    from attnbound.planner import DEFAULT_COST_MODEL, CostModel

    slow_exact = CostModel(**{**DEFAULT_COST_MODEL.__dict__, "c_pair": 1.0})  # make the plan take the provisional one
    p = plan(n, n, d, 3, 8.0, eps, value_range=2.0, max_abs_value=1.0, cost_model=slow_exact, out_dtype=F64)
    assert p.choice.provisional
    out, cert = attnbound.attention(qa, ka, v, method="auto", eps=eps, cost_model=slow_exact, centre=False, heavy=0,
                                    return_certificate=True)
    assert cert.method == "exact"
    check_contract(out, cert, qa, ka, v, eps=eps)


# ---------------------------------------------------------------- a second audit: underflow, huge scales, hidden keys
def _check_mp(out, cert, q, k, v, scale, **kw):
    from reference import mpmath_attention

    assert bool(torch.isfinite(out).all())
    err = float(np.abs(out.detach().double().numpy() - mpmath_attention(q, k, v, scale, **kw)).max())
    assert err <= cert.output_error_bound, (err, cert)


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


def test_norms_do_not_underflow():
    gen = torch.Generator().manual_seed(12)
    a, b = 3e-162, 1.5e-162  # ‖q‖² underflows in float64
    q = torch.tensor([[a, b]], dtype=F64)
    u = q / math.hypot(a, b)
    k = torch.cat([-u, -0.95 * u])
    v = torch.tensor([[1.0], [0.0]], dtype=F64)
    s = 12.0 / math.hypot(a, b)
    for method in ("polynomial", "relative", "auto"):
        try:
            out, cert = attnbound.attention(q, k, v, scale=s, method=method, eps=1e-3, return_certificate=True)
        except ValueError as exc:  # R = 12 may be beyond what eps allows: then a reason, never a wrong answer
            assert method != "auto" and "eps" in str(exc)
            continue
        _check_mp(out, cert, q, k, v, s)
    qq = torch.randn(4, 8, generator=gen, dtype=F64) * 1e-170
    kk = torch.randn(6, 8, generator=gen, dtype=F64) * 1e140
    vv = torch.randn(6, 2, generator=gen, dtype=F64)
    out, cert = attnbound.attention(qq, kk, vv, scale=3e30, method="auto", eps=1e-3, return_certificate=True)
    _check_mp(out, cert, qq, kk, vv, 3e30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_beyond_the_dtype_maximum(dtype):
    gen = torch.Generator().manual_seed(13)
    q, k = (torch.randn(3, 4, generator=gen) * 1e-21 for _ in range(2))
    v = torch.randn(5 if False else 3, 2, generator=gen)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    for method in ("exact", "dense", "blockwise"):
        out, cert = attnbound.attention(q, k, v, scale=1e40, method=method, return_certificate=True)
        _check_mp(out, cert, q, k, v, 1e40)


def test_causal_float_mask_is_shifted_over_the_keys_a_row_can_see():
    q = torch.tensor([[1.0, 0], [2, 0], [0, 1]], dtype=F64)
    k = torch.tensor([[1.0, 0], [-1, 0], [0, 1]], dtype=F64)
    v = torch.tensor([[1.0], [-1], [0]], dtype=F64)
    m = torch.zeros(3, 3, dtype=F64)
    m[1] = torch.tensor([-1e30, -1e30, 0])  # row 1's largest entry sits on a key it cannot see
    for kw in ({}, {"method": "auto", "eps": 1e-3}, {"method": "blockwise", "block_size": 2}):
        out, cert = attnbound.attention(q, k, v, scale=1.0, is_causal=True, attn_mask=m, return_certificate=True, **kw)
        _check_mp(out, cert, q, k, v, 1.0, attn_mask=m, is_causal=True)


@pytest.mark.parametrize("kw", [{}, {"kind": "l2"}, {"method": "auto", "eps": 1e-3}, {"method": "dense"},
                                {"method": "blockwise"}])
def test_a_hidden_key_whose_logit_overflows_is_harmless(kw):
    gen = torch.Generator().manual_seed(14)
    q, k, v = (torch.randn(n, 4, generator=gen) for n in (3, 5, 5))
    v = v[:, :2]
    k[2] = 3e38
    m = torch.zeros(1, 5)
    m[:, 2] = -math.inf
    out, cert = attnbound.attention(q, k, v, attn_mask=m, return_certificate=True, **kw)
    check_contract(out, cert, q, k, v, attn_mask=m, kind=kw.get("kind", "softmax"))


@pytest.mark.parametrize("method", ["polynomial", "taylor", "relative"])
def test_a_padded_huge_key_does_not_reach_the_features(method):
    gen = torch.Generator().manual_seed(15)
    q = torch.randn(3, 4, generator=gen, dtype=F64) * 0.3
    k = torch.randn(5, 4, generator=gen, dtype=F64) * 0.3
    v = torch.randn(5, 2, generator=gen, dtype=F64)
    k[2] = 1e300
    m = torch.ones(1, 5, dtype=torch.bool)
    m[:, 2] = False
    out, cert = attnbound.attention(q, k, v, attn_mask=m, method=method, eps=1e-3, return_certificate=True)
    check_contract(out, cert, q, k, v, attn_mask=m)


@pytest.mark.parametrize("radius", [683.0, 690.0, 700.0])
def test_radius_near_the_float64_edge_gives_exact_or_a_value_error(radius):
    q = torch.zeros(50, 2, dtype=F64)
    q[:, 0] = 1.0
    v = torch.randn(50, 2, dtype=F64, generator=torch.Generator().manual_seed(16))
    out, cert = attnbound.attention(q, q, v, scale=radius, method="auto", eps=1e-3, centre=False, heavy=0,
                                    return_certificate=True)
    assert cert.method == "exact"
    with pytest.raises(ValueError):
        attnbound.attention(q, q, v, scale=radius, method="polynomial", eps=1e-3, centre=False)
    # every query and key is the same vector: centred, the radius is 0 and any method certifies
    out, cert = attnbound.attention(q, q, v, scale=radius, method="polynomial", eps=1e-3, centre=True,
                                    return_certificate=True)
    assert cert.radius == 0.0
    check_contract(out, cert, q, q, v, scale=radius, eps=1e-3)
    plan(2, 2, 2, 1, radius, 1e-3)


def test_bad_masks_and_dtypes_raise_clear_errors():
    q = torch.randn(4, 3)
    for mask in (torch.zeros(4), torch.tensor(True), torch.tensor(0.0)):  # a 1-D or 0-d mask is one row for all
        out, cert = attnbound.attention(q, q, q, attn_mask=mask, return_certificate=True)
        check_contract(out, cert, q, q, q, attn_mask=mask.reshape(1, -1) if mask.dim() else mask.reshape(1, 1))
    if hasattr(torch, "float8_e4m3fn"):
        with pytest.raises(TypeError, match="floating dtype"):
            attnbound.attention(q.to(torch.float8_e4m3fn), q.to(torch.float8_e4m3fn), q.to(torch.float8_e4m3fn))
    with pytest.raises(TypeError, match="attn_mask"):
        attnbound.attention(q[None], q[None], q[None], attn_mask=[[True]], enable_gqa=True)


def test_an_expanded_float_mask_is_refused_before_its_copies():
    q = torch.randn(1, 6000, 2)
    m = torch.zeros(1, 1).expand(6000, 6000)
    with pytest.raises(ValueError, match="memory_budget"):
        attnbound.attention(q, q, q, attn_mask=m, memory_budget=1 << 20)


# ---------------------------------------------------------------- centring and heavy tokens
def _offset_inputs(n, d, seed, offset=3.0, outliers=2):
    gen = torch.Generator().manual_seed(seed)
    shift = torch.randn(d, generator=gen, dtype=F64)
    shift = shift / shift.norm() * offset
    q = torch.randn(2, n, d, generator=gen, dtype=F64) * 0.2 + shift
    k = torch.randn(2, n, d, generator=gen, dtype=F64) * 0.2 + shift
    k[:, :outliers] *= 4.0  # a few large-norm keys and queries
    q[:, -outliers:] *= 4.0
    v = torch.randn(2, n, 3, generator=gen, dtype=F64)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["softmax", "l2"])
@pytest.mark.parametrize("padded", [False, True])
def test_centring_and_heavy_tokens_shrink_the_radius_and_keep_the_contract(causal, kind, padded):
    n = 150  # crosses a causal tile
    q, k, v = _offset_inputs(n, 4, seed=20 + causal + 2 * padded)
    mask = None
    if padded:
        mask = torch.ones(2, 1, n, dtype=torch.bool)
        mask[0, :, 100:] = False
        mask[1, :, :3] = False  # pads one of the outliers
    kw = dict(kind=kind, scale=0.5, is_causal=causal, attn_mask=mask, method="relative", eps=1e-4,
              return_certificate=True)
    from attnbound.centring import split

    keys = None if mask is None else mask.squeeze(-2)
    radii = {}
    for centre, heavy in ((False, 0), (True, 0), (True, 2)):
        sp = split(q, k, keys, centre=centre, heavy=heavy)
        radii[(centre, heavy)] = sp.q_norm * sp.k_norm
        try:
            out, cert = attnbound.attention(q, k, v, centre=centre, heavy=heavy, **kw)
        except ValueError as exc:  # a radius too large for eps: a reason, never a wrong answer
            assert "eps" in str(exc) and heavy == 0
            continue
        check_contract(out, cert, q, k, v, scale=0.5, kind=kind, is_causal=causal, attn_mask=mask, eps=1e-4)
        s_eff = 1.0 if kind == "l2" else 0.5
        assert cert.radius == pytest.approx(s_eff * radii[(centre, heavy)])
    assert radii[(True, 2)] < radii[(True, 0)] < radii[(False, 0)]


def test_auto_plans_centring_and_heavy_tokens_and_shows_why():
    q, k, v = _offset_inputs(4096, 8, seed=30, offset=6.0, outliers=2)
    out, cert = attnbound.attention(q, k, v, method="auto", eps=1e-3, return_certificate=True)
    assert cert.method != "exact" and "centred" in cert.radius_source
    from attnbound.planner import Variant

    p = plan(4096, 4096, 8, 3, 30.0, 1e-3, batch=2, variants=[Variant("plain", 30.0), Variant("centred", 1.0, True)])
    assert p.choice.variant == "centred" and {c.variant for c in p.candidates} >= {"plain", "centred"}


def test_heavy_tokens_known_exact_rows():
    # one key far from the others: with heavy=1 it is computed exactly and the rest covers a tiny radius
    gen = torch.Generator().manual_seed(31)
    q = torch.randn(1, 40, 3, generator=gen, dtype=F64) * 0.1
    k = torch.randn(1, 40, 3, generator=gen, dtype=F64) * 0.1
    k[0, 7] = torch.tensor([5.0, 0.0, 0.0], dtype=F64)
    q[0, 11] = torch.tensor([0.0, 5.0, 0.0], dtype=F64)
    v = torch.randn(1, 40, 2, generator=gen, dtype=F64)
    out, cert = attnbound.attention(q, k, v, method="polynomial", degree=3, centre=False, heavy=1,
                                    return_certificate=True)
    assert cert.radius < 0.3
    check_contract(out, cert, q, k, v)
    ref = long_double_attention(q, k, v, scale=3**-0.5)
    assert abs(float(out[0, 11, 0]) - float(ref[0, 11, 0])) < 1e-12  # the heavy query's row is exact


# ---------------------------------------------------------------- a third audit: heavy-only rows, l2 overflow, budgets
@pytest.mark.parametrize("causal", [False, True])
def test_rows_that_see_only_heavy_keys_are_not_lost(causal):
    q = torch.tensor([[-1.0], [5.0], [0.5], [-0.9]], dtype=F64)
    k = torch.tensor([[1000.0], [0.1], [0.2], [0.3]], dtype=F64)
    v = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=F64)
    mask = None if causal else torch.tensor([[True, False, False, False]])
    out, cert = attnbound.attention(q, k, v, scale=1.0, is_causal=causal, attn_mask=mask, method="polynomial",
                                    eps=1e-3, centre=False, heavy=1, return_certificate=True)
    check_contract(out, cert, q, k, v, scale=1.0, is_causal=causal, attn_mask=mask, eps=1e-3)


def test_l2_with_keys_whose_square_overflows_raises_a_value_error():
    q = torch.randn(3, 2, dtype=F64)
    k = torch.tensor([[1e200, 1e200], [0.0, 1.0]], dtype=F64)
    v = torch.randn(2, 1, dtype=F64)
    for method in ("exact", "auto", "polynomial"):
        with pytest.raises(ValueError):
            attnbound.attention(q, k, v, kind="l2", method=method, eps=1e-3)


def test_auto_fits_the_budget_that_exact_runs_in():
    gen = torch.Generator().manual_seed(40)
    q, k, v = (torch.randn(1, 2048, 4, generator=gen, dtype=F64) for _ in range(3))
    attnbound.attention(q, k, v, method="exact", eps=1e-3, memory_budget=8 << 20)
    out, cert = attnbound.attention(q, k, v, method="auto", eps=1e-3, memory_budget=8 << 20, return_certificate=True)
    check_contract(out, cert, q, k, v, eps=1e-3)
