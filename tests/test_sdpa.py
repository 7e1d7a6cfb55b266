"""Exact attention through torch SDPA (attnbound.engines.sdpa): same function as the project's kernels, the
any-order rounding certificate (known answers, measured error vs a long-double reference on
adversarial inputs), and the exponential accuracy the certificate assumes of SDPA."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnbound
from attnbound.certificate import underflow_unit, unit_roundoff
from attnbound.engines.reference import blockwise_attention, dense_attention
from attnbound.engines.sdpa import SDPA_EXP_ULPS, sdpa_attention, sdpa_candidate, sdpa_certificate
from attnbound.stats import shift_mask
from reference import long_double_attention, max_error

SHAPES = [((2, 3), (2, 3)), ((3,), (2, 1, 1)), ((), ()), ((2, 2, 3), (1, 3))]


def _mask(kind, rng, kb, n_q, n_k, dtype):
    if kind == "bool":
        m = torch.rand(n_q, n_k, generator=rng) > 0.5
        m[3] = False  # a row that sees no key
        return m
    if kind == "keypad":
        return torch.rand(*kb, 1, n_k, generator=rng) > 0.3
    if kind == "float":
        m = torch.randn(2, 1, n_q, n_k, generator=rng, dtype=dtype) * 3
        m[..., 2, :] = -math.inf
        return m
    return None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["softmax", "l2"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [None, "bool", "keypad", "float"])
def test_sdpa_computes_the_dense_function(dtype, kind, causal, mask, rng):
    """Every branch (ℓ2 feature column, causal merged into a mask, folded and broadcast batch dims,
    padded head dims, dead rows) against the project's dense kernel."""
    n, tol = 37, (2e-6 if dtype == torch.float32 else 1e-13)
    for qb, kb in SHAPES:
        q = torch.randn(*qb, n, 5, generator=rng, dtype=dtype)
        k = torch.randn(*kb, n, 5, generator=rng, dtype=dtype)
        v = torch.randn(*kb, n, 4, generator=rng, dtype=dtype)
        m = _mask(mask, rng, kb, n, n, dtype)
        if mask == "float" and len(qb) < 2:
            m = m[0]
        if m is not None and m.is_floating_point():
            m = shift_mask(m, dtype)
        out = sdpa_attention(q, k, v, scale=0.4, kind=kind, is_causal=causal, attn_mask=m)
        ref = dense_attention(q, k, v, scale=0.4, kind=kind, is_causal=causal, attn_mask=m)
        assert out.shape == ref.shape and out.dtype == dtype
        assert torch.isfinite(out).all()
        assert float((out - ref).abs().max()) <= tol, (qb, kb)
        if mask == "bool":
            assert float(out[..., 3, :].abs().max()) == 0.0


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_q, n_k, d, d_v", [(1, 1, 1, 1), (33, 513, 3, 7), (300, 300, 8, 2), (257, 1025, 16, 16)])
def test_sdpa_matches_blockwise_across_kernel_blocks(n_q, n_k, d, d_v, causal, rng):
    """Lengths crossing SDPA's query (32/64/256) and key (512) tiles, d ≠ d_v, in float64."""
    if causal and n_q != n_k:
        pytest.skip("causal needs n_q == n_k")
    q, k = (torch.randn(2, n, d, generator=rng, dtype=torch.float64) for n in (n_q, n_k))
    v = torch.randn(2, n_k, d_v, generator=rng, dtype=torch.float64)
    for kind in ("softmax", "l2"):
        out = sdpa_attention(q, k, v, scale=0.3, kind=kind, is_causal=causal)
        ref = blockwise_attention(q, k, v, scale=0.3, kind=kind, is_causal=causal, block_size=100)
        assert float((out - ref).abs().max()) <= 1e-13


def test_l2_key_shift_identity_against_the_direct_formula(rng):
    """ℓ2 as SDPA with scale 2s and the key bias −s‖k‖², against exp(−s‖q − k‖²) in long double."""
    q = torch.randn(2, 40, 6, generator=rng, dtype=torch.float64) * 2
    k = torch.randn(2, 50, 6, generator=rng, dtype=torch.float64) * 2 + 1
    v = torch.randn(2, 50, 3, generator=rng, dtype=torch.float64)
    out = sdpa_attention(q, k, v, scale=0.7, kind="l2")
    assert max_error(out, long_double_attention(q, k, v, scale=0.7, kind="l2")) <= 1e-12


ADVERSARIAL = [
    # (kind, causal, mask, scale, q/k size): logits up to ~±60, masks with wide spans, dead rows
    ("softmax", False, None, 1.0, 2.5),
    ("softmax", True, None, 1.0, 2.5),
    ("softmax", False, "float", 0.5, 2.0),
    ("softmax", True, "bool", 1.0, 2.5),
    ("l2", False, None, 0.8, 2.0),
    ("l2", True, "keypad", 0.8, 2.0),
    ("softmax", False, "far", 1.0, 1.0),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("kind, causal, mask, scale, size", ADVERSARIAL)
def test_exact_error_within_the_sdpa_bound_on_adversarial_inputs(dtype, kind, causal, mask, scale, size, rng):
    n, d = 70, 6
    q = (torch.randn(2, n, d, generator=rng, dtype=torch.float64) * size).to(dtype)
    k = (torch.randn(2, n, d, generator=rng, dtype=torch.float64) * size).to(dtype)
    # values far off centre and of mixed size: the sums term (max|v|) and the weight term (range) both count
    v = (torch.randn(2, n, 3, generator=rng, dtype=torch.float64) * 3 + 10).to(dtype)
    m = None
    if mask == "bool":
        m = torch.rand(n, n, generator=rng) > 0.4
        m[5] = False
    elif mask == "keypad":
        m = torch.rand(2, 1, n, generator=rng) > 0.3
    elif mask == "float":
        m = (torch.randn(2, n, n, generator=rng, dtype=torch.float64) * 30 - 1e4).to(dtype)
    elif mask == "far":  # entries far below the row best: charged as a mass, not per weight
        m = torch.zeros(n, n, dtype=dtype)
        m[:, ::3] = -1e4 if dtype != torch.float16 else -6e4
    out, cert = attnbound.attention(q, k, v, scale=scale, kind=kind, is_causal=causal, attn_mask=m,
                                    return_certificate=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    err = max_error(out, long_double_attention(q, k, v, scale=scale, kind=kind, is_causal=causal, attn_mask=m))
    assert cert.method == "exact" and math.isfinite(cert.output_error_bound)
    assert err <= cert.output_error_bound, (err, cert)
    if mask == "bool":
        assert float(out[..., 5, :].abs().max()) == 0.0


def test_exact_dispatches_to_sdpa_and_carries_its_certificate(rng):
    # float64 inputs: SDPA (the flash engine takes float32 compute only)
    q, k, v = (torch.randn(1, 3, 200, 8, generator=rng, dtype=torch.float64) for _ in range(3))
    out, cert = attnbound.attention(q, k, v, return_certificate=True)
    st = attnbound.stats.input_stats(q, k, v)
    s = 1 / math.sqrt(8)
    want = sdpa_candidate(kind="softmax", logit_bound=st.logit_bound(s, "softmax"), mask_span=0.0, d=8, n_k=200,
                          value_range=st.value_range, max_abs_value=st.max_abs_value, out_dtype=torch.float64,
                          eps=None, scale=s)
    assert cert == want
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v).clamp(-st.max_abs_value, st.max_abs_value))
    # blockwise keeps the project's kernel and its own (blocked) certificate
    _, cb = attnbound.attention(q, k, v, method="blockwise", return_certificate=True)
    assert cb.output_error_bound < cert.output_error_bound


def test_eps_beyond_float32_moves_sdpa_to_float64(rng):
    q, k, v = (torch.randn(300, 8, generator=rng) for _ in range(3))
    out32, c32 = attnbound.attention(q, k, v, return_certificate=True)
    eps = c32.output_error_bound / 100
    out, cert = attnbound.attention(q, k, v, eps=eps, return_certificate=True)
    assert c32.compute_dtype == "float32" and cert.compute_dtype == "float64"
    assert cert.output_error_bound <= eps and out.dtype == torch.float32
    err = max_error(out, long_double_attention(q, k, v, scale=1 / math.sqrt(8)))
    assert err <= cert.output_error_bound


def test_sdpa_certificate_known_answer():
    # one key, no logits, no mask: η = (1 + 2·20·u)^1 − 1 and the sums term of m = 1 + 1 + 4 roundings
    u = 2.0**-53
    c = sdpa_certificate(kind="softmax", logit_bound=0.0, d=1, n_k=1, value_range=0.0, max_abs_value=1.0,
                         compute_dtype=torch.float64, out_dtype=torch.float64)
    g6 = 6 * u / (1 - 6 * u)
    assert c.eta == pytest.approx(40 * u, rel=1e-9)
    tiny = float(torch.finfo(torch.float64).tiny)
    want = 2 * g6 / (1 - g6) + 3 * u + 12 * 1 * 3 * tiny + underflow_unit(torch.float64)
    assert c.output_error_bound == pytest.approx(want, rel=1e-12)
    # float32, L = 2, T = 3, n_k = 10 any blocking, range 4, max|v| 3, float16 output
    u = 2.0**-24
    c = sdpa_certificate(kind="softmax", logit_bound=2.0, d=4, n_k=10, value_range=4.0, max_abs_value=3.0,
                         compute_dtype=torch.float32, out_dtype=torch.float16, mask_span=3.0)
    lam = (14 * u / (1 - 14 * u)) * (2 + 3) + 3 * u * (2 * 2 + 3) + 10 * math.log1p(40 * u)
    eta = math.expm1(lam)
    g = 24 * u / (1 - 24 * u)
    tiny = float(torch.finfo(torch.float32).tiny)
    want = eta / (1 - eta) * 4 + (2 * g / (1 - g) + 3 * u + 2.0**-11) * 3 + 12 * 10 * 12 * tiny * 3 \
        + underflow_unit(torch.float16)
    assert c.eta == pytest.approx(eta, rel=1e-12)
    assert c.output_error_bound == pytest.approx(want, rel=1e-12)
    # ℓ2: the bias column's sum of squares doubles the dot-product roundings, γ_{2d+10}
    c = sdpa_certificate(kind="l2", logit_bound=2.0, d=4, n_k=10, value_range=4.0, max_abs_value=3.0,
                         compute_dtype=torch.float32, out_dtype=torch.float16, mask_span=3.0)
    lam = (18 * u / (1 - 18 * u)) * (2 + 3) + 3 * u * (2 * 2 + 3) + 10 * math.log1p(40 * u)
    assert c.eta == pytest.approx(math.expm1(lam), rel=1e-12)
    # subnormal products: 4·s'·(d + 2)·tiny·u in the exponent, s' = 2s for ℓ2
    for kind, s_eff in (("softmax", 2.0**120), ("l2", 2.0**121)):
        c = sdpa_certificate(kind=kind, logit_bound=0.0, d=3, n_k=1, value_range=1.0, max_abs_value=1.0,
                             compute_dtype=torch.float32, out_dtype=torch.float32, scale=2.0**120)
        lam = 4 * s_eff * 5 * tiny * u + math.log1p(40 * u)
        assert c.eta == pytest.approx(math.expm1(lam), rel=1e-12)


def test_sdpa_certificate_shape():
    common = dict(kind="softmax", logit_bound=5.0, d=64, value_range=2.0, max_abs_value=1.0,
                  out_dtype=torch.float32)
    f32 = [sdpa_certificate(n_k=n, compute_dtype=torch.float32, **common).output_error_bound for n in (2**8, 2**12, 2**16)]
    f64 = [sdpa_certificate(n_k=n, compute_dtype=torch.float64, **common).output_error_bound for n in (2**8, 2**12, 2**16)]
    assert f32[0] < f32[1] < f32[2] and f64[2] < 1e-6 < f32[0]
    # fewer key blocks (a known blocking) can only tighten it; any blocking is the default
    anyb = sdpa_certificate(n_k=4096, compute_dtype=torch.float32, **common)
    assert sdpa_certificate(n_k=4096, key_blocks=8, compute_dtype=torch.float32, **common).output_error_bound \
        < anyb.output_error_bound == sdpa_certificate(n_k=4096, key_blocks=4096, compute_dtype=torch.float32,
                                                      **common).output_error_bound
    # a mask span beyond the cut is charged as a far mass 4e^-40·max|v|, not through the logits
    far = sdpa_certificate(n_k=100, mask_span=1e6, compute_dtype=torch.float64, **common)
    near = sdpa_certificate(n_k=100, mask_span=0.0, compute_dtype=torch.float64, **common)
    assert 4 * math.exp(-40) <= far.output_error_bound - near.output_error_bound < 1e-6
    for bad in (dict(key_blocks=0), dict(key_blocks=101), dict(exp_ulps=-1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sdpa_certificate(n_k=100, compute_dtype=torch.float64, **common, **bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sdpa_exponential_is_as_accurate_as_assumed(dtype):
    """Rows of one query against 32 keys (the kernel's vector path) with logits 0, −t_1, …, −t_31, exact
    as q = 1, k = logit, scale 1, and the identity as values: output j is p_j/D with p_j = exp^(−t_j),
    so output j / output 0 = exp^(−t_j)/exp^(0) up to the two roundings of the final scaling. With
    exp^(0) = 1 (checked: all-zero logits give exactly 1/32), that ratio measures SDPA's exponential
    on [−80, 0]; the certificate assumes it within SDPA_EXP_ULPS ulps (relative 2·ulps·u)."""
    nk, rows = 32, 1000
    t = torch.linspace(0.0, 80.0, rows * (nk - 1), dtype=torch.float64).reshape(rows, nk - 1)
    t = t[torch.randperm(rows, generator=torch.Generator().manual_seed(0))]
    logit = torch.cat([torch.zeros(rows, 1, dtype=torch.float64), -t], 1).to(dtype)
    q = torch.ones(rows, 1, 1, 1, dtype=dtype)
    v = torch.eye(nk, dtype=dtype).expand(rows, 1, nk, nk)
    uniform = F.scaled_dot_product_attention(q, torch.zeros(rows, 1, nk, 1, dtype=dtype), v, scale=1.0)
    assert bool((uniform == 1.0 / nk).all())
    out = F.scaled_dot_product_attention(q, logit.reshape(rows, 1, nk, 1), v, scale=1.0)[:, 0, 0, :].double()
    ratio = (out[:, 1:] / out[:, :1]).numpy().astype(np.longdouble)
    exact = np.exp(logit[:, 1:].double().numpy().astype(np.longdouble))
    rel = float((np.abs(ratio - exact) / exact).max())
    u = unit_roundoff(dtype)
    assert rel <= 2 * SDPA_EXP_ULPS * u + 4 * u, rel / u


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float64])
def test_causal_float_mask_is_shifted_over_the_keys_each_row_sees(mask_dtype, rng):
    """Entries above the diagonal are hidden by causality; were the shift taken over them (1e30 here),
    every visible logit would be swamped by −1e30 in float32 and each row would average its values."""
    n = 40
    q, k, v = (torch.randn(2, n, 4, generator=rng) for _ in range(3))
    m = torch.randn(n, n, generator=rng, dtype=mask_dtype)
    hidden = torch.ones(n, n, dtype=torch.bool).triu(1)
    m_big = m.masked_fill(hidden, 1e30)
    out, cert = attnbound.attention(q, k, v, is_causal=True, attn_mask=m_big, return_certificate=True)
    ref = long_double_attention(q, k, v, scale=0.5, is_causal=True, attn_mask=m.masked_fill(hidden, 0.0))
    assert max_error(out, ref) <= cert.output_error_bound < 1e-2


def test_over_the_memory_budget_sdpa_leaves_it_to_the_blockwise_kernel(rng):
    """is_causal with a mask makes SDPA build the merged n×n mask; under a budget too small for it (and
    for its per-thread tiles) exact runs the project's blockwise kernel, with that kernel's certificate."""
    n = 300
    q, k, v = (torch.randn(n, 8, generator=rng) for _ in range(3))
    m = torch.rand(n, n, generator=rng) > 0.2
    budget = 2 * 2**20
    out, cert = attnbound.attention(q, k, v, is_causal=True, attn_mask=m, memory_budget=budget,
                                    return_certificate=True)
    _, blockwise = attnbound.attention(q, k, v, is_causal=True, attn_mask=m, method="blockwise",
                                       memory_budget=budget, return_certificate=True)
    _, fused = attnbound.attention(q, k, v, is_causal=True, attn_mask=m, return_certificate=True)
    assert cert == blockwise != fused
    ref = long_double_attention(q, k, v, scale=1 / math.sqrt(8), is_causal=True, attn_mask=m)
    assert max_error(out, ref) <= cert.output_error_bound


@pytest.mark.parametrize("kind", ["softmax", "l2"])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_gradients_match_the_dense_kernel(kind, causal, rng):
    n = 45
    base = [torch.randn(2, n, c, generator=rng, dtype=torch.float64) for c in (5, 5, 3)]
    m = torch.rand(n, n, generator=rng) > 0.3
    m[:, 0] = True
    grads = []
    for fn in (sdpa_attention, dense_attention):
        xs = [x.clone().requires_grad_(True) for x in base]
        out = fn(*xs, scale=0.6, kind=kind, is_causal=causal, attn_mask=m)
        (out * torch.linspace(-1, 1, 3, dtype=torch.float64)).sum().backward()
        grads.append([x.grad for x in xs])
    for a, b in zip(*grads):
        assert float((a - b).abs().max()) <= 1e-11
