"""Grouped-query attention (enable_gqa=True) against torch SDPA's and the long-double reference."""

import pytest
import torch
import torch.nn.functional as F

import attnbound
from reference import long_double_attention, max_error

F64 = torch.float64


@pytest.mark.parametrize("method", ["exact", "dense", "blockwise", "polynomial", "auto"])
@pytest.mark.parametrize("masking", ["none", "padding", "causal", "per_head"])
@pytest.mark.parametrize("groups", [(4, 2), (6, 1), (3, 3)])
def test_gqa_matches_sdpa_and_its_certificate(method, masking, groups):
    h_q, h_kv = groups
    gen = torch.Generator().manual_seed(h_q * 10 + h_kv)
    n = 70
    q = torch.randn(2, h_q, n, 8, generator=gen, dtype=F64) * 0.4
    k, v = (torch.randn(2, h_kv, n, 8, generator=gen, dtype=F64) * 0.4 for _ in range(2))
    mask, causal = None, masking == "causal"
    if masking == "padding":
        mask = torch.rand(2, 1, 1, n, generator=gen) > 0.2
    elif masking == "per_head":
        if method == "polynomial":
            pytest.skip("approximate methods take key-padding masks only")
        mask = torch.rand(2, h_q, n, n, generator=gen) > 0.2
        mask[..., 0] = True
    kw = {"eps": 1e-6} if method in ("polynomial", "auto") else {}
    out, cert = attnbound.attention(q, k, v, attn_mask=mask, is_causal=causal, method=method, block_size=32,
                                    enable_gqa=True, return_certificate=True, **kw)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) <= cert.output_error_bound + 1e-12
    # against the long-double reference with k, v repeated per head
    rep = h_q // h_kv
    exact = long_double_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), scale=8**-0.5,
                                  is_causal=causal, attn_mask=mask)
    assert max_error(out, exact) <= cert.output_error_bound


def test_gqa_rejects_heads_that_do_not_divide():
    q, k = torch.randn(1, 4, 5, 3), torch.randn(1, 3, 5, 3)
    with pytest.raises(ValueError, match="divide"):
        attnbound.attention(q, k, k, enable_gqa=True)
    with pytest.raises(ValueError, match="head dim"):
        attnbound.attention(torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3), enable_gqa=True)
