import math

import pytest
import torch
import torch.nn.functional as F

import attnbound
from attnbound.measure import measure_error

from conftest import reference_l2, reference_softmax

F64 = torch.float64


def _qkv(rng, b=2, h=3, n=37, n_k=None, d=8, d_v=5, h_kv=None, scale=1.0):
    n_k = n if n_k is None else n_k
    q = torch.randn(b, h, n, d, generator=rng, dtype=F64) * scale
    k = torch.randn(b, h_kv or h, n_k, d, generator=rng, dtype=F64) * scale
    v = torch.randn(b, h_kv or h, n_k, d_v, generator=rng, dtype=F64)
    return q, k, v


def _plant(exact, rng, size=3e-3):
    """exact + one perturbation of known size at a random entry."""
    out = exact.clone()
    idx = tuple(int(torch.randint(0, s, (1,), generator=rng)) for s in out.shape)
    out[idx] += size
    return out


@pytest.mark.parametrize("case", ["plain", "causal", "bool_mask", "float_mask", "cross", "l2", "scale"])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_planted_error_is_measured_exactly(case, layout, rng):
    """n = 37 crosses the 16-row/16-key tiles of the float64 reference."""
    q, k, v = _qkv(rng, n_k=29 if case == "cross" else None)
    kw, mask, s = {}, None, 1 / math.sqrt(8)
    if case == "causal":
        kw["is_causal"] = True
    elif case == "bool_mask":
        mask = torch.rand(2, 1, 37, 37, generator=rng) < 0.7
        mask[..., 0] = True
        kw["attn_mask"] = mask
    elif case == "float_mask":
        mask = torch.randn(37, 37, generator=rng, dtype=F64)
        kw["attn_mask"] = mask
    elif case == "scale":
        s = 0.37
        kw["scale"] = s
    if case == "l2":
        kw["kind"] = "l2"
        exact = reference_l2(q, k, v, s)
    else:
        exact = reference_softmax(q, k, v, s, is_causal=case == "causal", mask=mask)
    out = _plant(exact, rng)
    args = (out, q, k, v)
    if layout == "bnhd":
        args = tuple(x.transpose(1, 2).contiguous() for x in args)
    err = measure_error(*args, layout=layout, block_size=16, **kw)
    assert err == pytest.approx(3e-3, abs=1e-12)
    args = (exact, q, k, v) if layout == "bhnd" else tuple(x.transpose(1, 2) for x in (exact, q, k, v))
    assert measure_error(*args, layout=layout, block_size=16, **kw) < 1e-13


def test_another_librarys_output_float32(rng):
    """torch SDPA in float32: the measured error equals the error against a dense float64 reference."""
    q, k, v = (x.float() for x in _qkv(rng, n=70))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = reference_softmax(q, k, v, 1 / math.sqrt(8), is_causal=True)
    err = measure_error(out, q, k, v, is_causal=True, block_size=32)
    assert err == pytest.approx(float((out.double() - ref).abs().max()), rel=1e-9)
    assert 0 < err < 1e-5


def test_grouped_query_heads(rng):
    q, k, v = _qkv(rng, h=6, h_kv=2)
    out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert measure_error(out, q, k, v, enable_gqa=True) < 1e-13
    with pytest.raises(ValueError, match="do not broadcast"):
        measure_error(out, q, k, v)


def test_certified_output_lies_within_its_certificate_and_a_coarse_one_does_not(rng):
    q, k, v = _qkv(rng, n=64, scale=0.6)
    out, cert = attnbound.attention(q, k, v, method="polynomial", eps=1e-4, return_certificate=True)
    err = measure_error(out, q, k, v)
    assert 0 < err <= cert.output_error_bound
    coarse = attnbound.attention(q, k, v, method="taylor", order=2, strict=False)
    assert measure_error(coarse, q, k, v) > 100 * err


def test_fully_masked_rows_are_left_out_and_nan_elsewhere_is_inf(rng):
    q, k, v = _qkv(rng, n=20)
    mask = torch.ones(20, 20, dtype=torch.bool)
    mask[3] = False  # row 3 sees no key: no exact value (some libraries give NaN there, others 0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out[..., 3, :] = float("nan")
    assert measure_error(out, q, k, v, attn_mask=mask) < 1e-13
    out[0, 0, 5, 0] = float("nan")
    assert measure_error(out, q, k, v, attn_mask=mask) == math.inf


def test_transposed_layout_is_detected(rng):
    # self-attention in (B, N, H, D) passed as the default (B, H, N, D): shapes fit both layouts
    q, k, v = _qkv(rng, h=4, n=24)
    out = F.scaled_dot_product_attention(q, k, v)
    t = [x.transpose(1, 2) for x in (out, q, k, v)]
    with pytest.raises(ValueError, match="looks transposed.*pass layout='bnhd'"):
        measure_error(*t)
    assert measure_error(*t, layout="bnhd") < 1e-13
    assert attnbound.measure_error(*t, check_layout=False) > 1e-2  # measured as given when asked (public name)
    # only out transposed
    with pytest.raises(ValueError, match=r"out should have shape \(2, 4, 24, 5\)"):
        measure_error(t[0], q, k, v)
    # cross-attention shapes that fit only the other layout
    q, k, v = _qkv(rng, h=4, n=10, n_k=7)
    out = F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="fit layout='bhnd'.*pass layout='bhnd'"):
        measure_error(out, q, k, v, layout="bnhd")


def test_bad_arguments(rng):
    q, k, v = _qkv(rng, n=5)
    out = reference_softmax(q, k, v, 1 / math.sqrt(8))
    with pytest.raises(ValueError, match="unknown layout 'nhd'"):
        measure_error(out, q, k, v, layout="nhd")
    with pytest.raises(ValueError, match="unknown kind"):
        measure_error(out, q, k, v, kind="relu")
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        measure_error(out.numpy(), q, k, v)
    with pytest.raises(TypeError, match="q must have a floating dtype"):
        measure_error(out, q.long(), k, v)
    with pytest.raises(ValueError, match="scale must be positive"):
        measure_error(out, q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="layout='bnhd' needs 4-D"):
        measure_error(out[0], q[0], k[0], v[0], layout="bnhd")
    with pytest.raises(ValueError, match="contains NaN"):
        measure_error(out, q.masked_fill(q > 1, float("nan")), k, v)
