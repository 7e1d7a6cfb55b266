"""The fused feature kernels against the pure-torch engine (attnbound.engines.features), at every tile boundary.

Every kernel output is allocated NaN-filled (fused._POISON) so an entry the kernel forgets to write
shows up as NaN. All tests use d_v + 1 = 3 columns so only one set of kernels is compiled.
"""

import numpy as np
import pytest
import torch

from attnbound.engines import features, fused, monomials

C = 3  # columns of [V, 1]: d_v = 2
TILES = (fused.KEY_TILE, fused.QUERY_TILE, fused.CAUSAL_TILE)
LENGTHS = sorted({1, 63, 64, 65, 300, 1025} | {t + e for t in TILES for e in (-1, 0, 1)})


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(fused, "_POISON", True)


def make(n, d, degree, batch=(), seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    q = scale * torch.randn(*batch, n, d, generator=g, dtype=torch.float64)
    k = scale * torch.randn(*batch, n, d, generator=g, dtype=torch.float64)
    vv = features.weighted_values(torch.randn(*batch, n, C - 1, generator=g, dtype=torch.float64))
    coeffs = np.random.default_rng(seed).standard_normal(degree + 1)  # signs mixed on purpose
    w = torch.as_tensor(monomials.monomial_weights(coeffs, d))
    return q, k, vv, w


def close(got, want):
    assert got.shape == want.shape, (got.shape, want.shape)
    assert not torch.isnan(got).any(), "a kernel left an output entry unwritten (NaN poison)"
    scale = float(want.abs().max()) if want.numel() else 1.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= 1e-12 * max(scale, 1.0), f"max error {err:.3e} at scale {scale:.3e}"


def test_poison_fills_nan():
    assert torch.isnan(torch.from_numpy(fused._alloc((3, 2)))).all()


@pytest.mark.parametrize("d,degree", [(1, 4), (3, 0), (3, 1), (2, 6), (5, 3)])
def test_dfs_order_is_the_engine_monomials(d, degree):
    idx, dep, var = monomials.dfs_order(d, degree)
    alpha = monomials.monomial_exponents(d, degree)
    r = monomials.feature_rank(d, degree)
    assert sorted(idx.tolist()) == list(range(1, r))  # every non-constant monomial exactly once
    last = {0: 0}  # degree -> engine index of the latest entry of that degree
    for a, j, i in zip(idx, dep, var):
        parent = alpha[last[j - 1]]
        assert alpha[a].sum() == j and alpha[a][i] == parent[i] + 1
        assert np.array_equal(np.delete(alpha[a], i), np.delete(parent, i))
        assert not alpha[a][i + 1:].any()  # i is the largest variable, so the parent's is ≤ i
        last[j] = a
    items = monomials.dfs_items(d, degree)
    paired = items[items[:, 3] >= 0]
    assert sorted(items[:, 0].tolist() + paired[:, 3].tolist()) == list(range(1, r))
    assert (paired[:, 1] == degree).all()
    for a, _, i, b, i2 in paired:  # the second leaf of a pair is a sibling of the first: same parent
        pa, pb = alpha[a].copy(), alpha[b].copy()
        pa[i] -= 1
        pb[i2] -= 1
        assert np.array_equal(pa, pb)


@pytest.mark.parametrize("n", LENGTHS)
def test_key_state_and_readout_every_boundary(n):
    q, k, vv, w = make(n, 4, 3, batch=(2,), seed=n)
    ref = features.key_state(k, vv, degree=3, weights=w, chunk=100)
    for segments in (None, 3):
        close(fused.key_state(k, vv, degree=3, weights=w, segments=segments), ref)
    close(fused.state_readout(q, ref, degree=3), features.state_readout(q, ref, degree=3, chunk=100))


@pytest.mark.parametrize("n", LENGTHS)
def test_causal_every_boundary(n):
    q, k, vv, w = make(n, 4, 3, seed=n)
    want = features.causal_readout(q, k, vv, degree=3, weights=w, chunk=100)
    for segments in (None, 1, 2, 5):
        close(fused.causal_readout(q, k, vv, degree=3, weights=w, segments=segments), want)
    prev = make(50, 4, 3, seed=n + 1)
    state = features.key_state(prev[1], prev[2], degree=3, weights=w, chunk=100)  # keys before this sequence
    want = features.causal_readout(q, k, vv, degree=3, weights=w, chunk=100, state=state)
    for segments in (None, 3):
        close(fused.causal_readout(q, k, vv, degree=3, weights=w, state=state, segments=segments), want)


@pytest.mark.parametrize("d,degree", [(1, 4), (3, 0), (3, 1), (2, 6), (6, 2)])
def test_dimensions_and_degrees(d, degree):
    n = fused.KEY_TILE + 1
    q, k, vv, w = make(n, d, degree, seed=d * 10 + degree)
    ref = features.key_state(k, vv, degree=degree, weights=w, chunk=64)
    close(fused.key_state(k, vv, degree=degree, weights=w), ref)
    close(fused.state_readout(q, ref, degree=degree), features.state_readout(q, ref, degree=degree, chunk=64))
    close(fused.causal_readout(q, k, vv, degree=degree, weights=w, segments=2),
          features.causal_readout(q, k, vv, degree=degree, weights=w, chunk=64))


def test_every_segment_one_tile():
    n = 5 * fused.CAUSAL_TILE + 3
    q, k, vv, w = make(n, 3, 4, seed=7)
    close(fused.causal_readout(q, k, vv, degree=4, weights=w, segments=6),
          features.causal_readout(q, k, vv, degree=4, weights=w, chunk=96))
    close(fused.key_state(k, vv, degree=4, weights=w, segments=50),
          features.key_state(k, vv, degree=4, weights=w, chunk=96))


def test_batch_broadcasting():
    n, d, degree = 70, 3, 3
    g = torch.Generator().manual_seed(3)
    q = 0.5 * torch.randn(3, n, d, generator=g, dtype=torch.float64)
    k = 0.5 * torch.randn(2, 1, n, d, generator=g, dtype=torch.float64)
    vv = torch.randn(1, 3, n, C, generator=g, dtype=torch.float64)
    w = torch.as_tensor(monomials.monomial_weights(np.array([1.0, -0.5, 0.25, 0.125]), d))
    ref = features.key_state(k, vv, degree=degree, weights=w, chunk=32)
    close(fused.key_state(k, vv, degree=degree, weights=w), ref)
    close(fused.state_readout(q, ref, degree=degree), features.state_readout(q, ref, degree=degree, chunk=32))
    state = ref[:1]  # (1, 3, r, C), broadcast against the (2, 3) batch
    close(fused.causal_readout(q, k, vv, degree=degree, weights=w, state=state),
          features.causal_readout(q, k, vv, degree=degree, weights=w, chunk=32, state=state))


@pytest.mark.parametrize("width", [2 * C - 1, 2 * C])
def test_column_groups(monkeypatch, width):
    monkeypatch.setattr(fused, "MAX_COLUMNS", C)  # two groups of the compiled width C (2C − 1: one zero-padded)
    assert fused._column_groups(width) == (C, [0, C])
    n, d, degree = 200, 3, 3
    q, k, _, w = make(n, d, degree, seed=11)
    vv = torch.randn(n, width, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = features.key_state(k, vv, degree=degree, weights=w, chunk=64)
    close(fused.key_state(k, vv, degree=degree, weights=w), ref)
    close(fused.state_readout(q, ref, degree=degree), features.state_readout(q, ref, degree=degree, chunk=64))
    close(fused.causal_readout(q, k, vv, degree=degree, weights=w),
          features.causal_readout(q, k, vv, degree=degree, weights=w, chunk=64))


def test_weights_of_a_polynomial_and_refusal():
    d, degree = 3, 4
    coeffs = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    got = monomials.polynomial_of_weights(monomials.monomial_weights(coeffs, d), d, degree)
    assert np.array_equal(got, coeffs)
    q, k, vv, _ = make(130, d, degree, seed=5)
    r = monomials.feature_rank(d, degree)
    w = torch.rand(r, generator=torch.Generator().manual_seed(4), dtype=torch.float64)  # no polynomial behind it
    assert monomials.polynomial_of_weights(w.numpy(), d, degree) is None
    # the causal triangle is Horner's rule in ⟨q, k⟩: other weights are the torch engine's (it takes any)
    with pytest.raises(ValueError, match="weights"):
        fused.causal_readout(q, k, vv, degree=degree, weights=w)


def test_empty_inputs():
    q, k, vv, w = make(0, 3, 2)
    r = monomials.feature_rank(3, 2)
    assert torch.equal(fused.key_state(k, vv, degree=2, weights=w), torch.zeros(r, C, dtype=torch.float64))
    assert fused.state_readout(q, torch.ones(r, C, dtype=torch.float64), degree=2).shape == (0, C)
    assert fused.causal_readout(q, k, vv, degree=2, weights=w).shape == (0, C)


def test_available_says_why_not():
    x = torch.zeros(4, 3, dtype=torch.float64)
    assert fused.available(x) == (True, "")
    ok, why = fused.available(x.float())
    assert not ok and "float32" in why
    ok, why = fused.available(x.clone().requires_grad_())
    assert not ok and "requires_grad" in why
    with torch.no_grad():
        assert fused.available(x.clone().requires_grad_())[0]


def test_bad_arguments_name_the_argument():
    q, k, vv, w = make(10, 3, 2)
    with pytest.raises(ValueError, match="weights"):
        fused.key_state(k, vv, degree=2, weights=w[:-1])
    with pytest.raises(ValueError, match="degree"):
        fused.key_state(k, vv, degree=-1, weights=w)
    with pytest.raises(TypeError, match="degree"):
        fused.key_state(k, vv, degree=2.0, weights=w)
    with pytest.raises(ValueError, match="vv"):
        fused.key_state(k, vv[:5], degree=2, weights=w)
    with pytest.raises(ValueError, match="state"):
        fused.state_readout(q, torch.zeros(7, C, dtype=torch.float64), degree=2)
    with pytest.raises(ValueError, match="q"):
        fused.state_readout(q.float(), torch.zeros(10, C, dtype=torch.float64), degree=2)
    with pytest.raises(ValueError, match="k"):
        fused.causal_readout(q, k[:4], vv, degree=2, weights=w)
    with pytest.raises(TypeError, match="vv"):
        fused.key_state(k, vv.numpy(), degree=2, weights=w)


@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, fused.CAUSAL_TILE + 1, 300])
@pytest.mark.parametrize("lead", [0, 1, 70])
def test_causal_zero_one_key_weights_take_the_fused_kernel(monkeypatch, n, lead):
    """Key weights that are only 0 or −inf (key padding, heavy keys) under is_causal run the fused kernel
    with the masked [v, 1] rows zeroed; it must equal the torch engine's running-maximum path, rows before
    the first visible key included (they have no weight at all: zeros, and reference 0)."""
    q, k, vv, w = make(n, 3, 4, batch=(2,), seed=n + lead)
    v = vv[..., :-1]
    coeffs = np.array([1.0, 1.0, 0.5, 1 / 6, 1 / 24])
    g = torch.Generator().manual_seed(n * 7 + lead)
    lw = torch.where(torch.rand(2, n, generator=g) < 0.3, -torch.inf, 0.0).double()
    lw[:, :min(lead, n)] = -torch.inf  # the first `lead` keys count for no row
    calls = []
    real = fused.causal_readout
    monkeypatch.setattr(fused, "causal_readout", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got_num, got_ref = features.feature_attention(q, k, v, coeffs=coeffs, key_log_weight=lw, is_causal=True,
                                                  return_parts=True)
    assert calls, "0/−inf key weights under is_causal should run the fused kernel"
    monkeypatch.setattr(fused, "available", lambda *t: (False, "reference"))
    want_num, want_ref = features.feature_attention(q, k, v, coeffs=coeffs, key_log_weight=lw, is_causal=True,
                                                    return_parts=True)
    close(got_num, want_num)
    assert torch.equal(got_ref.expand(want_ref.shape), want_ref)
    # a weight that is neither 0 nor −inf keeps the reference path
    calls.clear()
    monkeypatch.undo()
    monkeypatch.setattr(fused, "_POISON", True)
    monkeypatch.setattr(fused, "causal_readout", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    lw2 = lw.clone()
    lw2[:, -1] = -0.5 if n > lead else lw2[:, -1]
    features.feature_attention(q, k, v, coeffs=coeffs, key_log_weight=lw2, is_causal=True, return_parts=True)
    assert bool(calls) == bool(((lw2 == 0) | torch.isneginf(lw2)).all())


@pytest.mark.parametrize("d,degree", [(1, 5), (2, 3), (3, 4), (8, 5), (5, 1)])
def test_fused_items_cover_every_monomial_once_and_join_parents_to_first_children(d, degree):
    """The joined item list visits the same monomials as the depth-first order, each once, and a joined
    child is the next monomial of the walk, one degree deeper, on the same variable (its first child)."""
    idx, dep, var = monomials.dfs_order(d, degree)
    items = monomials.fused_items(d, degree)
    seen = [int(x) for row in items for x in (row[0], row[3], row[5], row[7]) if x >= 0]
    assert sorted(seen) == sorted(int(x) for x in idx) and len(seen) == len(idx)
    assert seen == [int(x) for x in idx]  # the walk's order is kept
    pos = {int(a): m for m, a in enumerate(idx)}
    for a, j, i, a2, i2, b, ib, b2, ib2 in items.tolist():
        assert b >= 0 or j == degree  # every interior monomial travels with its first child
        if b >= 0:
            assert a2 < 0 and j < degree
            assert pos[b] == pos[a] + 1 and dep[pos[b]] == j + 1 and var[pos[b]] == ib == i
            if b2 >= 0:
                assert dep[pos[b2]] == degree == j + 1 and var[pos[b2]] == ib2
