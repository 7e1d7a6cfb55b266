import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnbound
from conftest import reference_l2, reference_softmax

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def rel_err(out, ref):
    return float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("kind", ["softmax", "l2"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["dense", "blockwise", "exact"])
def test_exact_matches_reference(kind, is_causal, dtype, method, rng):
    shape_q, n = (2, 3), 67
    q = torch.randn(*shape_q, n, 5, generator=rng, dtype=dtype)
    k = torch.randn(*shape_q, n, 5, generator=rng, dtype=dtype)
    v = torch.randn(*shape_q, n, 4, generator=rng, dtype=dtype)
    out = attnbound.attention(q, k, v, kind=kind, is_causal=is_causal, method=method, block_size=16)
    s = 1 / math.sqrt(5)
    ref = (reference_l2 if kind == "l2" else reference_softmax)(q, k, v, s, is_causal)
    assert out.shape == (2, 3, n, 4) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@settings(max_examples=40, deadline=None)
@given(
    n_q=st.integers(1, 40), n_k=st.integers(1, 40), d=st.integers(1, 9), d_v=st.integers(1, 6),
    block=st.integers(1, 50), kind=st.sampled_from(["softmax", "l2"]), seed=st.integers(0, 2**31 - 1),
    scale=st.one_of(st.none(), st.floats(0.01, 3.0)),
)
def test_blockwise_equals_dense_any_block(n_q, n_k, d, d_v, block, kind, seed, scale):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_q, d, generator=g, dtype=torch.float64)
    k = torch.randn(n_k, d, generator=g, dtype=torch.float64)
    v = torch.randn(n_k, d_v, generator=g, dtype=torch.float64)
    a = attnbound.attention(q, k, v, method="dense", kind=kind, scale=scale)
    b = attnbound.attention(q, k, v, method="blockwise", kind=kind, scale=scale, block_size=block)
    s = scale if scale is not None else 1 / math.sqrt(d)
    ref = (reference_l2 if kind == "l2" else reference_softmax)(q, k, v, s)
    assert rel_err(a, ref) < 1e-12 and rel_err(b, ref) < 1e-12


def test_broadcast_batch_dims_like_sdpa(rng):
    q = torch.randn(2, 1, 10, 4, generator=rng)
    k = torch.randn(1, 3, 12, 4, generator=rng)
    v = torch.randn(1, 3, 12, 6, generator=rng)
    out = attnbound.attention(q, k, v, method="blockwise", block_size=5)
    ref = F.scaled_dot_product_attention(q.expand(2, 3, 10, 4), k.expand(2, 3, 12, 4), v.expand(2, 3, 12, 6))
    assert out.shape == (2, 3, 10, 6)
    assert torch.allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("method", ["dense", "blockwise"])
def test_huge_logits_do_not_overflow(method, rng):
    q = torch.randn(20, 8, generator=rng) * 1e3
    k = torch.randn(20, 8, generator=rng) * 1e3
    v = torch.randn(20, 3, generator=rng)
    for kind in ("softmax", "l2"):
        out = attnbound.attention(q, k, v, method=method, kind=kind, block_size=7)
        assert torch.isfinite(out).all()
        ref = (reference_l2 if kind == "l2" else reference_softmax)(q, k, v, 1 / math.sqrt(8))
        # logits of size 1e6: the softmax is one-hot; float32 picks the same key
        assert (out.double() - ref).abs().max() < 1e-4


def test_all_equal_keys_give_mean_of_values(rng):
    q = torch.randn(5, 4, generator=rng, dtype=torch.float64)
    k = torch.randn(1, 4, generator=rng, dtype=torch.float64).expand(9, 4)
    v = torch.randn(9, 2, generator=rng, dtype=torch.float64)
    for method in ("dense", "blockwise"):
        out = attnbound.attention(q, k, v, method=method, block_size=4)
        assert torch.allclose(out, v.mean(0).expand(5, 2), atol=1e-14)


def test_n_equals_one_and_d_equals_one(rng):
    q, k, v = (torch.randn(1, 1, generator=rng, dtype=torch.float64) for _ in range(3))
    for method in ("dense", "blockwise"):
        out = attnbound.attention(q, k, v, method=method, is_causal=True)
        assert torch.allclose(out, v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computed_in_float32(dtype, rng):
    q, k, v = (torch.randn(30, 8, generator=rng).to(dtype) for _ in range(3))
    out = attnbound.attention(q, k, v)
    assert out.dtype == dtype
    ref = reference_softmax(q.float(), k.float(), v.float(), 1 / math.sqrt(8))
    assert (out.double() - ref).abs().max() < 2e-2


def test_gradients_flow_through_exact(rng):
    q, k, v = (torch.randn(6, 3, generator=rng, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for method in ("dense", "blockwise"):
        assert torch.autograd.gradcheck(
            lambda a, b, c: attnbound.attention(a, b, c, method=method, block_size=4, is_causal=True), (q, k, v))
