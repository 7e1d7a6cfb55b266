import pytest
import torch
import torch.nn.functional as F

import attnbound
from conftest import reference_softmax


@pytest.mark.parametrize("method", ["dense", "blockwise"])
def test_bool_and_additive_masks_match_sdpa(method, rng):
    q, k, v = (torch.randn(2, 3, 20, 4, generator=rng, dtype=torch.float64) for _ in range(3))
    bool_mask = torch.rand(2, 1, 20, 20, generator=rng) > 0.3
    bool_mask[..., 0] = True  # every row keeps a key (SDPA gives NaN otherwise)
    add_mask = torch.randn(20, 20, generator=rng, dtype=torch.float64)
    for mask in (bool_mask, add_mask):
        out = attnbound.attention(q, k, v, attn_mask=mask, method=method, block_size=7)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert torch.allclose(out, ref, atol=1e-12)


def test_fully_masked_row_returns_zeros(rng):
    q, k, v = (torch.randn(5, 3, generator=rng, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[2] = False
    for method in ("dense", "blockwise"):
        out = attnbound.attention(q, k, v, attn_mask=mask, method=method, block_size=2)
        assert torch.equal(out[2], torch.zeros(3, dtype=torch.float64))
        assert torch.isfinite(out).all()


def test_key_padding_mask_with_polynomial_is_within_certificate(rng):
    q, k, v = (torch.randn(2, 30, 4, generator=rng, dtype=torch.float64) * 0.5 for _ in range(3))
    pad = torch.ones(2, 1, 30, dtype=torch.bool)
    pad[0, :, 20:] = False
    out, cert = attnbound.attention(q, k, v, attn_mask=pad, method="polynomial", eps=1e-6, return_certificate=True)
    ref = reference_softmax(q, k, v, 0.5, mask=pad)
    assert float((out - ref).abs().max()) <= cert.output_error_bound <= 1e-6


def test_unsupported_mask_with_approximation_is_refused(rng):
    q, k, v = (torch.randn(6, 4, generator=rng) for _ in range(3))
    with pytest.raises(ValueError, match="key-padding"):
        attnbound.attention(q, k, v, attn_mask=torch.ones(6, 6, dtype=torch.bool), method="polynomial", eps=1e-2)
    with pytest.raises(ValueError, match="key-padding"):
        attnbound.attention(q, k, v, attn_mask=torch.zeros(1, 6), method="taylor", eps=1e-2)
    with pytest.raises(ValueError, match="does not broadcast"):
        attnbound.attention(q, k, v, attn_mask=torch.ones(3, 6, dtype=torch.bool))


def test_masked_keys_do_not_count_towards_the_radius(rng):
    # one huge padded key would force R ≈ 50 and no certifiable degree; masked out, it must not count
    q = torch.randn(2, 20, 4, generator=rng, dtype=torch.float64) * 0.4
    k = torch.randn(2, 20, 4, generator=rng, dtype=torch.float64) * 0.4
    v = torch.randn(2, 20, 3, generator=rng, dtype=torch.float64)
    k[:, -1] = 100.0
    keep = torch.ones(2, 1, 20, dtype=torch.bool)
    keep[..., -1] = False
    for method in ("polynomial", "taylor", "auto"):
        out, cert = attnbound.attention(q, k, v, method=method, eps=1e-6, attn_mask=keep, return_certificate=True)
        ref = reference_softmax(q, k[:, :-1], v[:, :-1], 0.5)
        assert (out - ref).abs().max().item() <= max(cert.output_error_bound, 1e-15)
        assert torch.isfinite(out).all()
    _, cert = attnbound.attention(q, k, v, method="polynomial", eps=1e-6, attn_mask=keep, return_certificate=True)
    assert cert.radius < 10.0


def test_auto_with_a_general_mask_runs_exact(rng):
    q, k, v = (torch.randn(1, 12, 4, generator=rng, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(12, 12, generator=rng) > 0.3
    mask[:, 0] = True
    out, cert = attnbound.attention(q, k, v, method="auto", eps=1e-3, attn_mask=mask, return_certificate=True)
    assert cert.method == "exact"
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(out, ref, atol=1e-12)
