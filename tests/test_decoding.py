"""DecodingState: token-by-token and chunked decoding against a dense float64 causal reference, across the
KV-cache → state switch, with every certificate holding; declarations enforced; constant memory."""

import math

import pytest
import torch

from attnbound import attention
from attnbound.decoding import DecodingState
from attnbound.engines.monomials import feature_rank

from conftest import reference_softmax


def _seq(rng, n, d, d_v, batch=(2,), bound=1.0, vscale=1.0):
    q = (torch.rand(*batch, n, d, generator=rng) * 2 - 1) * bound
    k = (torch.rand(*batch, n, d, generator=rng) * 2 - 1) * bound
    v = torch.randn(*batch, n, d_v, generator=rng) * vscale
    return q, k, v


def _switch_point(st, d, d_v):
    return math.ceil(st.rank * (d_v + 1) / (d + d_v))


@pytest.mark.parametrize("method", ["polynomial", "taylor", "relative", "auto"])
def test_token_by_token_matches_causal_reference_across_the_switch(rng, method):
    d, d_v, n = 3, 2, 120
    q, k, v = _seq(rng, n, d, d_v)
    ref = reference_softmax(q, k, v, 1.0 / d, is_causal=True)
    st = DecodingState(d, d_v, scale=1.0 / d, bound=1.0, eps=1e-3, method=method, batch_shape=(2,))
    modes = []
    for i in range(n):
        out, cert = st.step(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1])
        assert out.shape == (2, 1, d_v) and out.dtype == torch.float32
        err = (out.double() - ref[:, i:i + 1]).abs().max().item()
        assert err <= cert.output_error_bound <= 1e-3, (i, err, cert)
        modes.append((st.mode, cert.method))
        if st.mode == "state":
            assert cert.radius == pytest.approx(1.0) and cert.radius_source == "bound"
            assert cert.method in ("polynomial", "taylor", "relative") and cert.rank == feature_rank(d, cert.degree)
    switch = _switch_point(st, d, d_v)
    assert modes[switch - 2] == ("cache", "exact") and modes[switch - 1][0] == "state"
    assert all(m == ("state", modes[-1][1]) for m in modes[switch - 1:])
    if method != "auto":
        assert modes[-1][1] == method


def test_chunked_feeding_matches_the_reference_with_a_switch_inside_a_chunk(rng):
    d, d_v, n = 2, 3, 200
    q, k, v = _seq(rng, n, d, d_v, batch=(2, 3))
    ref = reference_softmax(q, k, v, 0.5, is_causal=True)
    st = DecodingState(d, d_v, scale=0.5, bound=1.0, eps=1e-4, method="polynomial", batch_shape=(2, 3),
                       dtype=torch.float32)
    i = 0
    seen_modes = set()
    for t in [5, 1, 9, 70, 1, 64, 50]:  # the 70-token chunk crosses the switch; 64, 50 cross engine tiles
        out, cert = st.step(q[..., i:i + t, :], k[..., i:i + t, :], v[..., i:i + t, :])
        err = (out.double() - ref[..., i:i + t, :]).abs().max().item()
        assert err <= cert.output_error_bound <= 1e-4, (i, t, err, cert)
        seen_modes.add((st.mode, cert.method))
        i += t
    assert i == n and seen_modes == {("cache", "exact"), ("state", "polynomial")}


def test_append_then_query_sees_every_key_and_queries_broadcast(rng):
    d, d_v = 2, 2
    q, k, v = (x.double() for x in _seq(rng, 60, d, d_v, batch=(2, 3)))
    st = DecodingState(d, d_v, norms=(1.5, 2.0), eps=1e-3, method="polynomial", batch_shape=(2, 3), dtype=torch.float64)
    for j0, j1 in [(0, 4), (4, 5), (5, 60)]:
        st.append(k[..., j0:j1, :], v[..., j0:j1, :])
        qq = q[:1, :, :7]  # leading dims (1, 3) broadcast to (2, 3)
        out, cert = st.query(qq)
        ref = reference_softmax(qq, k[..., :j1, :], v[..., :j1, :], d**-0.5)
        assert out.shape == (2, 3, 7, d_v)
        assert (out - ref).abs().max().item() <= cert.output_error_bound
    assert st.mode == "state" and cert.method == "polynomial"
    assert cert.radius == pytest.approx(d**-0.5 * 1.5 * 2.0)


def test_exact_method_keeps_a_cache_and_certifies_rounding(rng):
    d, d_v = 4, 4
    q, k, v = _seq(rng, 50, d, d_v)
    ref = reference_softmax(q, k, v, d**-0.5, is_causal=True)
    st = DecodingState(d, d_v, method="exact", batch_shape=(2,))
    for i in range(0, 50, 7):
        out, cert = st.step(q[:, i:i + 7], k[:, i:i + 7], v[:, i:i + 7])
        assert cert.method == "exact" and (out.double() - ref[:, i:i + 7]).abs().max().item() <= cert.output_error_bound
    assert st.mode == "cache" and st.rank is None


def test_certificate_tracks_the_value_range_of_the_keys_seen(rng):
    d, d_v = 2, 2
    st = DecodingState(d, d_v, bound=1.0, degree=4, method="polynomial", batch_shape=(1,))
    k = torch.rand(1, 40, d, generator=rng) * 2 - 1
    v = torch.zeros(1, 40, d_v)
    v[0, :, 0] = torch.linspace(-1.0, 3.0, 40)  # column 0 spans [-1, 3]; column 1 is constant
    v[0, :, 1] = 7.0
    st.append(k[:, :20], v[:, :20])
    st.append(k[:, 20:], v[:, 20:])
    assert st.mode == "state"
    out, cert = st.query(torch.zeros(1, 1, d))
    assert cert.value_range == pytest.approx(4.0) and cert.max_abs_value == pytest.approx(7.0)
    assert out[0, 0, 1].item() == 7.0  # the constant column is returned exactly (clamped to its range)
    assert cert.output_error_bound >= cert.eta / (1 - cert.eta) * 4.0


def test_a_value_beyond_the_planned_range_raises_at_the_query_unless_declared(rng):
    d, d_v = 2, 1
    k = torch.rand(1, 40, d, generator=rng) * 2 - 1
    v = torch.rand(1, 40, d_v, generator=rng) * 0.01
    st = DecodingState(d, d_v, bound=1.0, eps=1e-3, method="polynomial", batch_shape=(1,))
    st.append(k, v)
    assert st.mode == "state"
    st.append(k[:, :1], v[:, :1] + 50.0)
    with pytest.raises(ValueError, match="value_bound"):
        st.query(torch.zeros(1, 1, d))
    declared = DecodingState(d, d_v, bound=1.0, eps=1e-3, method="polynomial", value_bound=50.0, batch_shape=(1,))
    declared.append(k, v)
    declared.append(k[:, :1], v[:, :1] + 49.99)
    out, cert = declared.query(torch.zeros(1, 1, d))
    assert declared.mode == "state" and cert.output_error_bound <= 1e-3 and cert.value_range == pytest.approx(50.0, rel=1e-3)


def test_keys_and_queries_breaking_the_declaration_raise_and_change_nothing(rng):
    d, d_v = 2, 2
    st = DecodingState(d, d_v, bound=0.5, eps=1e-3, method="polynomial", batch_shape=(1,))
    k = torch.rand(1, 30, d, generator=rng) - 0.5
    v = torch.randn(1, 30, d_v, generator=rng)
    st.append(k, v)
    before = (st.n, st.nbytes, st.query(torch.zeros(1, 1, d))[0])
    bad = k[:, :1].clone()
    bad[0, 0, 1] = 0.5001
    with pytest.raises(ValueError, match="k has an entry of magnitude 0.5001"):
        st.append(bad, v[:, :1])
    with pytest.raises(ValueError, match="q has an entry"):
        st.query(bad)
    with pytest.raises(ValueError, match="k has an entry"):
        st.step(k[:, :1], bad, v[:, :1])
    assert (st.n, st.nbytes) == before[:2] and torch.equal(st.query(torch.zeros(1, 1, d))[0], before[2])
    normed = DecodingState(d, d_v, norms=(1.0, 2.0), eps=1e-3, method="taylor", batch_shape=(1,))
    normed.append(torch.tensor([[[1.2, 1.2]]]), v[:, :1])  # ‖k‖ = 1.70 ≤ 2
    with pytest.raises(ValueError, match="norm"):
        normed.append(torch.tensor([[[1.5, 1.5]]]), v[:, :1])
    with pytest.raises(ValueError, match="norm"):
        normed.query(torch.tensor([[[0.8, 0.8]]]))  # ‖q‖ = 1.13 > 1


def test_state_memory_is_independent_of_the_context_length(rng):
    d, d_v = 2, 2
    st = DecodingState(d, d_v, bound=1.0, degree=6, method="polynomial", batch_shape=(3,), dtype=torch.float64)
    r = feature_rank(d, 6)
    sizes = []
    for _ in range(12):
        k = torch.rand(3, 256, d, generator=rng, dtype=torch.float64) * 2 - 1
        st.append(k, torch.randn(3, 256, d_v, generator=rng, dtype=torch.float64))
        sizes.append(st.nbytes)
    assert st.mode == "state" and st.n == 12 * 256
    assert len(set(sizes)) == 1 and sizes[0] == 3 * r * (d_v + 1) * 8 + 2 * 3 * d_v * 8
    cache = DecodingState(d, d_v, method="exact", batch_shape=(3,), dtype=torch.float64)
    cache.append(k, torch.zeros(3, 256, d_v, dtype=torch.float64))
    cache.append(k, torch.zeros(3, 256, d_v, dtype=torch.float64))
    assert cache.nbytes >= 3 * 512 * (d + d_v) * 8  # the cache grows with n


@pytest.mark.parametrize("keep_cache", [True, False])
def test_state_path_agrees_with_attention_at_the_same_degree(rng, keep_cache):
    """With a fixed degree and bound, the state is the engine's own approximation: equal to attention()'s."""
    d, d_v = 3, 2
    q, k, v = (x.double() for x in _seq(rng, 80, d, d_v, batch=(1,), bound=0.8))
    ref = attention(q, k, v, method="polynomial", degree=4, bound=0.8, is_causal=True)
    st = DecodingState(d, d_v, bound=0.8, degree=4, method="polynomial", batch_shape=(1,), dtype=torch.float64,
                       keep_cache=keep_cache)
    out = torch.cat([st.step(q[:, i:i + 9], k[:, i:i + 9], v[:, i:i + 9])[0] for i in range(0, 80, 9)], -2)
    assert st.mode == "state"
    sw = 9 * math.ceil(_switch_point(st, d, d_v) / 9) if keep_cache else 0  # rows answered by the state
    assert (out[:, sw:] - ref[:, sw:]).abs().max().item() <= 1e-12
    if keep_cache:
        assert (out[:, :sw] - ref[:, :sw]).abs().max().item() > 1e-9  # the cached rows were exact, not the state's


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="d must"):
        DecodingState(0, 2, bound=1.0, eps=1e-3)
    with pytest.raises(ValueError, match="method"):
        DecodingState(2, 2, bound=1.0, eps=1e-3, method="fast")
    with pytest.raises(ValueError, match="bound, norms or radius"):
        DecodingState(2, 2, eps=1e-3, method="polynomial")
    with pytest.raises(ValueError, match="only one"):
        DecodingState(2, 2, bound=1.0, radius=1.0, eps=1e-3)
    with pytest.raises(ValueError, match="eps"):
        DecodingState(2, 2, bound=1.0)
    with pytest.raises(ValueError, match="even"):
        DecodingState(2, 2, bound=1.0, degree=3, method="taylor")
    with pytest.raises(ValueError, match="η ≥ 1"):
        DecodingState(2, 2, radius=30.0, degree=2, method="polynomial")
    with pytest.raises(TypeError, match="dtype"):
        DecodingState(2, 2, bound=1.0, eps=1e-3, dtype=torch.int32)
    with pytest.raises(ValueError, match="keep_cache"):
        DecodingState(2, 2, bound=1.0, eps=1e-3, keep_cache=False)
    st = DecodingState(2, 2, bound=1.0, eps=1e-3, batch_shape=(2,))
    with pytest.raises(ValueError, match="no keys"):
        st.query(torch.zeros(2, 1, 2))
    with pytest.raises(ValueError, match="leading dims"):
        st.append(torch.zeros(3, 1, 2), torch.zeros(3, 1, 2))
    with pytest.raises(TypeError, match="dtype"):
        st.append(torch.zeros(2, 1, 2, dtype=torch.float64), torch.zeros(2, 1, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        st.append(torch.full((2, 1, 2), math.nan), torch.zeros(2, 1, 2))
    with pytest.raises(ValueError, match="one query per new key"):
        st.step(torch.zeros(2, 2, 2), torch.zeros(2, 1, 2), torch.zeros(2, 1, 2))
    assert st.n == 0


@pytest.mark.parametrize("d,degree", [(1, 0), (1, 4), (3, 1), (3, 5), (8, 3)])
def test_few_row_features_equal_the_engine_features(rng, d, degree):
    from attnbound.engines.monomials import few_row_features, gather_plan, monomial_features

    x = torch.randn(2, 5, d, generator=rng, dtype=torch.float64)
    got = few_row_features(x, gather_plan(d, degree, x.device))
    assert got.shape == (2, feature_rank(d, degree), 5)
    assert torch.equal(got, monomial_features(x, degree))


@pytest.mark.parametrize("keep_cache", [True, False])
def test_reorder_equals_a_state_built_from_the_reordered_sequences(keep_cache):
    """Beam search reorders sequences: the reordered state must answer as one fed the reordered inputs."""
    g = torch.Generator().manual_seed(5)
    d, d_v, b, n = 4, 3, 3, 40
    k = (torch.rand(b, n, d, generator=g, dtype=torch.float64) - 0.5)
    v = torch.randn(b, n, d_v, generator=g, dtype=torch.float64)
    q = (torch.rand(b, 2, d, generator=g, dtype=torch.float64) - 0.5)
    idx = torch.tensor([2, 2, 0])
    kw = dict(bound=0.5, degree=4, method="polynomial", batch_shape=(b,), dtype=torch.float64, keep_cache=keep_cache)
    a, ref = DecodingState(d, d_v, **kw), DecodingState(d, d_v, **kw)
    a.append(k, v)
    a.reorder(idx)
    ref.append(k[idx], v[idx])
    out, cert = a.query(q)
    out_ref, cert_ref = ref.query(q)
    assert torch.allclose(out, out_ref, rtol=0, atol=1e-14) and cert == cert_ref
    with pytest.raises(ValueError, match="index"):
        a.reorder(torch.tensor([0, 1]))
