"""attnbound.centring: centring and heavy tokens shrink the radius the polynomial covers, the planner
takes them when they pay, and the rows computed exactly (heavy queries, rows that see only heavy keys)
keep the contract."""

import pytest
import torch

import attnbound
from attnbound.planner import plan
from contract import check_contract
from reference import long_double_attention

F64 = torch.float64


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

    # at n = 2^14 the linear-time families beat even float32 exact (the flash engine meets eps=1e-3 at d = 8)
    p = plan(16384, 16384, 8, 3, 30.0, 1e-3, batch=2, variants=[Variant("plain", 30.0), Variant("centred", 1.0, True)])
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


# ---------------------------------------------------------------- third audit: rows that see only heavy keys
@pytest.mark.parametrize("causal", [False, True])
def test_rows_that_see_only_heavy_keys_are_not_lost(causal):
    q = torch.tensor([[-1.0], [5.0], [0.5], [-0.9]], dtype=F64)
    k = torch.tensor([[1000.0], [0.1], [0.2], [0.3]], dtype=F64)
    v = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=F64)
    mask = None if causal else torch.tensor([[True, False, False, False]])
    out, cert = attnbound.attention(q, k, v, scale=1.0, is_causal=causal, attn_mask=mask, method="polynomial",
                                    eps=1e-3, centre=False, heavy=1, return_certificate=True)
    check_contract(out, cert, q, k, v, scale=1.0, is_causal=causal, attn_mask=mask, eps=1e-3)
