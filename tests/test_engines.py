"""attnbound.engines: the exact reference engines (dense, blockwise) at block boundaries, the torch feature
engine against the naive dense reference at every tile and chunk boundary, and its memory estimate
against the measured peak."""

import math
import os

import numpy as np
import pytest
import torch

import attnbound
from attnbound.engines.features import CAUSAL_TILE, feature_attention
from contract import check_contract
from reference import dense_feature_reference

F64 = torch.float64


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


# ---------------------------------------------------------------- the feature engine at every tile and chunk boundary
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


# ---------------------------------------------------------------- the feature engine's memory estimate
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
