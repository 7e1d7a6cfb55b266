"""The contract check shared by the test files: every returned tensor is finite, of the documented shape
and dtype, and within its certificate of the exact attention of the inputs as given (the long-double
reference of tests/reference.py, or mpmath where logits form by cancellation or underflow); with eps the
bound meets eps."""

import math

import numpy as np
import torch

from reference import long_double_attention, max_error


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


def check_mp(out, cert, q, k, v, scale, **kw):
    from reference import mpmath_attention

    assert bool(torch.isfinite(out).all())
    err = float(np.abs(out.detach().double().numpy() - mpmath_attention(q, k, v, scale, **kw)).max())
    assert err <= cert.output_error_bound, (err, cert)
