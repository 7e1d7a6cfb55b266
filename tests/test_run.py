"""attnbound.run (with attnbound.numerics): the run stage on one engine — exact runs whose scale, keys,
values or masks approach the dtype's range give the exact answer or a clear error, and feature runs
whose inputs keys are masked (ℓ2, padding) keep every row that sees a key."""

import math

import pytest
import torch

import attnbound
from contract import check_contract
from contract import check_mp as _check_mp

F64 = torch.float64


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


# ---------------------------------------------------------------- finding 4: overflowing additive masks
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


def test_causal_float_mask_is_shifted_over_the_keys_a_row_can_see():
    q = torch.tensor([[1.0, 0], [2, 0], [0, 1]], dtype=F64)
    k = torch.tensor([[1.0, 0], [-1, 0], [0, 1]], dtype=F64)
    v = torch.tensor([[1.0], [-1], [0]], dtype=F64)
    m = torch.zeros(3, 3, dtype=F64)
    m[1] = torch.tensor([-1e30, -1e30, 0])  # row 1's largest entry sits on a key it cannot see
    for kw in ({}, {"method": "auto", "eps": 1e-3}, {"method": "blockwise", "block_size": 2}):
        out, cert = attnbound.attention(q, k, v, scale=1.0, is_causal=True, attn_mask=m, return_certificate=True, **kw)
        _check_mp(out, cert, q, k, v, 1.0, attn_mask=m, is_causal=True)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_beyond_the_dtype_maximum(dtype):
    gen = torch.Generator().manual_seed(13)
    q, k = (torch.randn(3, 4, generator=gen) * 1e-21 for _ in range(2))
    v = torch.randn(5 if False else 3, 2, generator=gen)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    for method in ("exact", "dense", "blockwise"):
        out, cert = attnbound.attention(q, k, v, scale=1e40, method=method, return_certificate=True)
        _check_mp(out, cert, q, k, v, 1e40)


def test_l2_with_keys_whose_square_overflows_raises_a_value_error():
    q = torch.randn(3, 2, dtype=F64)
    k = torch.tensor([[1e200, 1e200], [0.0, 1.0]], dtype=F64)
    v = torch.randn(2, 1, dtype=F64)
    for method in ("exact", "auto", "polynomial"):
        with pytest.raises(ValueError):
            attnbound.attention(q, k, v, kind="l2", method=method, eps=1e-3)


# ---------------------------------------------------------------- second audit: underflow of norms
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
