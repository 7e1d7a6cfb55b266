"""The call statistics (attnbound.stats) against exact rational arithmetic.

Every certificate rests on these scalars: a norm below the real one, or a max |x| / value extreme
that misses an entry, makes a bound false. The references below use Python's exact rationals and
integer square roots, so they cannot share a rounding with the code under test.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from attnbound import stats


def _exact_root(row, up: bool) -> Fraction:
    """√(Σ x²) as a rational, rounded up (or down) at a relative 1e-30: exact squares, integer square root."""
    sq = sum(Fraction(float(x)) ** 2 for x in row)
    if sq == 0:
        return Fraction(0)
    a, b, m = sq.numerator, sq.denominator, 10**30
    root = math.isqrt(a * b * m * m)  # √(a/b) = √(a·b)/b, scaled by m so the integer root carries 30 digits
    return Fraction(root + (1 if up else 0), b * m)


def _exact_norm_upper(row) -> Fraction:
    return _exact_root(row, True)


def _exact_norm_lower(row) -> Fraction:
    return _exact_root(row, False)


def _rows(dtype):
    g = torch.Generator().manual_seed(1)
    d = 37
    base = torch.randn(12, d, generator=g, dtype=torch.float64)
    rows = [
        base[0],
        base[1] * 1e-10,                    # at the float32 path's lower edge
        base[2] * 1e-12,                    # below it: float64 path
        base[3] * 3e14 / base[3].norm(),    # just under the upper edge
        base[4] * 1e16,                     # above it
        torch.zeros(d, dtype=torch.float64),  # an exact zero row
        torch.cat([torch.tensor([1e-5]), torch.full((d - 1,), 1e-25)]).double(),  # squares below float32's normals
        torch.cat([torch.tensor([3e-10]), torch.full((d - 1,), 1e-21)]).double(),  # the lost squares near the edge
        torch.full((d,), 1.0).double(),
        base[5] * 1e-30,
    ]
    x = torch.stack(rows)
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_row_norms_bound_the_real_norm_from_above_and_tightly(dtype):
    x = _rows(dtype)
    got = stats.row_norms(x)
    assert got.dtype == torch.float64
    for i in range(x.shape[0]):
        hi = _exact_norm_upper(x[i].tolist())
        lo = _exact_norm_lower(x[i].tolist())
        g = Fraction(float(got[i]))
        assert g >= lo, (dtype, i, float(got[i]), float(lo))
        if hi == 0:
            assert g == 0
            continue
        # at least the real norm, and not loose by more than float32-level rounding (or float64's)
        assert g >= hi * (1 - Fraction(1, 10**25)), (dtype, i)
        assert g <= hi * (1 + Fraction(1, 10**4)), (dtype, i, float(got[i]), float(hi))


def test_row_norms_of_batched_float32_rows_match_float64_exactly_enough():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 200, 64, generator=g)
    got = stats.row_norms(x)
    ref = torch.linalg.vector_norm(x.double(), dim=-1)
    assert (got >= ref).all()
    assert ((got - ref) / ref).max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_abs_max_and_value_extremes_see_every_entry(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 50, 7, generator=g).to(dtype)
    x[1, 2, 17, 3] = -40.0  # the largest |x| is a negative entry
    assert stats._abs_max(x) == 40.0
    rows = stats._abs_max_rows(x)
    assert rows.dtype == torch.float64
    assert torch.equal(rows, x.double().abs().amax(-1))
    hi, lo = stats.value_extremes(x)
    assert torch.equal(hi, x.double().amax(-2)) and torch.equal(lo, x.double().amin(-2))
    keys = torch.ones(2, 3, 50, dtype=torch.bool)
    keys[1, 2, 17] = False  # the extreme key takes part with no query: it leaves the statistics
    hi_m, lo_m = stats.value_extremes(x, keys)
    assert float(lo_m[1, 2, 3]) > -40.0
    assert torch.equal(hi_m[0], hi[0])
    assert stats._abs_max(x[..., :0]) == 0.0
    assert stats._abs_max_rows(x[..., :0]).shape == x.shape[:-1]
    hi0, lo0 = stats.value_extremes(x[..., :0, :])
    assert torch.isneginf(hi0).all() and torch.isposinf(lo0).all()


def test_input_stats_of_a_masked_key_ignore_it_and_see_the_rest():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=g) for _ in range(3))
    k[0, 1, 5] = 1e6
    v[0, 1, 5] = -1e6
    mask = torch.ones(30, 30, dtype=torch.bool)
    mask[:, 5] = False
    st = stats.input_stats(q, k, v, attn_mask=mask)
    keep = torch.arange(30) != 5
    assert st.k_norm >= float(k[..., keep, :].double().norm(dim=-1).max())
    assert st.k_norm < 1e3
    assert st.max_abs_value == float(v[..., keep, :].abs().max())
    assert st.q_abs == float(q.abs().max())
    full = stats.input_stats(q, k, v)
    assert full.k_norm >= 1e6 and full.max_abs_value == 1e6 and full.k_abs == 1e6


@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 31, 32, 33, 1000, 1027])
@pytest.mark.parametrize("c", [1, 3, 8, 16, 33, 64])
def test_column_extremes_fold_every_row(n, c):
    """The folded column reduction against a plain one, at lengths that leave every remainder."""
    g = torch.Generator().manual_seed(n * 100 + c)
    x = torch.randn(2, n, c, generator=g)
    for op in (torch.amax, torch.amin):
        want = op(x, dim=-2)
        assert torch.equal(stats._column_reduce(x, op), want)
        # the extreme planted in the last (remainder) row and in the first row is found
        for row in (0, n - 1):
            y = x.clone()
            y[1, row, c - 1] = 50.0 if op is torch.amax else -50.0
            assert float(stats._column_reduce(y, op)[1, c - 1]) == float(y[1, row, c - 1])


@pytest.mark.parametrize("method", ["exact", "auto", "relative", "polynomial", "blockwise", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_leaves_its_inputs_untouched(method, dtype):
    """The call works in place only on its own temporaries: q, k, v and the mask are bit-for-bit the same after."""
    import attnbound

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 70, 4, generator=g, dtype=dtype) * 0.3 for _ in range(3))
    v = v * 1000.0  # max|v| ≠ 1: the values are scaled by a power of two inside
    mask = torch.rand(70, generator=g) > 0.2  # a key-padding mask: every method takes it
    mask[0] = True
    before = [x.clone() for x in (q, k, v, mask)]
    kw = {} if method in ("exact", "blockwise", "dense") else {"eps": 1e-2 * 1000.0}
    for m in (None, mask):
        for heavy in ((0, 2) if method in ("relative", "polynomial") else (0,)):
            extra = {"heavy": heavy} if heavy else {}
            out = attnbound.attention(q, k, v, method=method, attn_mask=m, **kw, **extra)
            assert out.shape == (2, 70, 4)
    for x, y in zip((q, k, v, mask), before):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_centred_norms_bound_the_engine_rows_from_above(dtype):
    """centred_norms against exact rationals of the float64 centred rows the engine builds (x.double() − c):
    offsets far above the spread (the cancellation centring exists for), rows equal to the centre, rows
    a few ulps from it, and differences below float32's normals."""
    from attnbound.centring import centred_norms

    g = torch.Generator().manual_seed(6)
    d = 16
    base = torch.randn(d, generator=g, dtype=torch.float64) * 300.0
    rows = [base + torch.randn(d, generator=g, dtype=torch.float64) * s for s in (1e-3, 1.0, 10.0)]
    x = torch.stack(rows + [base, base * (1 + 2.0**-20), torch.full((d,), 1e-39, dtype=torch.float64),
                            torch.randn(d, generator=g, dtype=torch.float64) * 1e-30]).to(dtype)
    c = x.double().mean(-2, keepdim=True)
    got = centred_norms(x, c)
    engine = x.double() - c  # what the feature engine centres with
    for i in range(x.shape[0]):
        exact = _exact_norm_upper(engine[i].tolist())
        assert Fraction(float(got[i])) >= exact * (1 - Fraction(1, 10**25)), (dtype, i, float(got[i]), float(exact))
        # and tight: within float32-level rounding of the row's own size plus the centre's
        slack = Fraction(1, 10**5) * (_exact_norm_upper(x[i].double().tolist()) + _exact_norm_upper(c[0].tolist()) + 1)
        assert Fraction(float(got[i])) <= exact + slack, (dtype, i)


def test_centred_norms_charge_the_rounding_of_the_centre():
    """A row equal to fl32(c) centres to exactly 0 in float32, yet lies ‖fl32(c) − c‖ > 0 from c: the bound must
    still cover it (a float32 centring that forgets the centre's own rounding returns ~0 here)."""
    from attnbound.centring import centred_norms

    g = torch.Generator().manual_seed(7)
    c = torch.randn(1, 32, generator=g, dtype=torch.float64) * 3.0
    x = torch.cat([c.float(), (c * 1.5).float(), torch.zeros(1, 32)])
    got = centred_norms(x, c)
    engine = x.double() - c
    for i in range(x.shape[0]):
        exact = _exact_norm_upper(engine[i].tolist())
        assert exact > 0
        assert Fraction(float(got[i])) >= exact * (1 - Fraction(1, 10**25)), (i, float(got[i]), float(exact))


def test_row_norms_of_infinite_rows_are_inf_and_centring_beyond_float32_falls_back():
    """A row holding ±inf has norm inf (not NaN); float32 rows whose centred differences overflow float32
    are centred in float64, so the centred radius stays finite and the call certifies (it once raised
    'radius must be >= 0, got nan')."""
    import attnbound
    from attnbound.centring import centred_norms

    got = stats.row_norms(torch.tensor([[math.inf, 1.0], [1.0, -math.inf], [3.0, 4.0]], dtype=torch.float64))
    assert torch.isposinf(got[:2]).all() and abs(float(got[2]) - 5.0) < 1e-12
    q = torch.tensor([[3e38], [-3e38], [-3e38]] * 4, dtype=torch.float32)  # centre −1e38: differences 4e38
    c = q.double().mean(-2, keepdim=True)
    n = centred_norms(q, c)
    assert torch.isfinite(n).all() and float(n.max()) >= 4e38
    k = torch.randn(12, 1, generator=torch.Generator().manual_seed(0))
    v = torch.randn(12, 2, generator=torch.Generator().manual_seed(1))
    for method in ("relative", "auto"):
        out, cert = attnbound.attention(q, k, v, scale=1e-39, method=method, eps=1e-3, centre=True,
                                        return_certificate=True)
        assert torch.isfinite(out).all() and cert.output_error_bound <= 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_row_norms_each_row_on_its_own_path(dtype, monkeypatch):
    """Every row of ``_rows`` alone, so rows inside [1e-10, 1e15] are bounded by the float32 reduction itself
    (checked to be the path taken) and the others by the float64 one; and a mixed batch gives each row the
    same value as alone (only the out-of-range rows take the float64 path)."""
    x = _rows(dtype)
    calls = []
    real = torch.linalg.vector_norm
    monkeypatch.setattr(torch.linalg, "vector_norm", lambda *a, **kw: calls.append(kw.get("dtype")) or real(*a, **kw))
    alone = []
    for i in range(x.shape[0]):
        calls.clear()
        got = stats.row_norms(x[i:i + 1])
        alone.append(float(got[0]))
        exact = _exact_norm_upper(x[i].tolist())
        assert Fraction(float(got[0])) >= exact * (1 - Fraction(1, 10**25)), (dtype, i)
        n32 = float(real(x[i].float()))
        in_range = 1e-10 <= n32 <= 1e15
        assert (calls == [torch.float32]) == in_range, (dtype, i, calls, n32)
    mixed = stats.row_norms(x)
    assert [float(v) for v in mixed] == alone


def test_plain_split_from_the_statistics_rows_equals_a_recomputed_one():
    """splits(..., rows=stats.rows) (the norms input_stats already took, masked keys at 0) picks the same
    heavy tokens and light norms as splits recomputing them, with a key-padding mask hiding the largest key."""
    from attnbound.centring import splits

    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 40, 6, generator=g) for _ in range(3))
    k[1, 7] *= 50.0
    km = torch.ones(2, 40, dtype=torch.bool)
    km[1, 7] = False
    st = stats.input_stats(q, k, v, key_mask=km)
    a = splits(q, k, km, centre=False, heavies=[0, 2, 8], rows=st.rows)
    b = splits(q, k, km, centre=False, heavies=[0, 2, 8])
    for h in (0, 2, 8):
        assert a[h].q_norm == b[h].q_norm and a[h].k_norm == b[h].k_norm
        for x, y in ((a[h].heavy_k, b[h].heavy_k), (a[h].heavy_q, b[h].heavy_q)):
            assert (x is None and y is None) or torch.equal(x, y)
    assert 7 not in b[2].heavy_k[1].tolist()  # the masked key is never heavy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_input_is_refused_before_any_row_is_recomputed(monkeypatch, dtype):
    # the norms see a NaN at no extra pass; the refusal must come before the per-row float64 recomputation
    # (which allocates in proportion to the bad rows)
    import attnbound
    from attnbound import stats

    def boom(x, **kw):
        raise AssertionError("recomputed rows of a NaN input")

    q = torch.randn(2, 300, 8, dtype=dtype)
    q[1, 5:200] = float("nan")
    k, v = torch.randn(2, 40, 8, dtype=dtype), torch.randn(2, 40, 8, dtype=dtype)
    if dtype == torch.float32:  # (float64 rows are recomputed inside _row_norms64, after its own check)
        monkeypatch.setattr(stats, "_row_norms64", boom)
    with pytest.raises(ValueError, match="q contains NaN or Inf"):
        attnbound.attention(q, k, v)
    k[0, 3, 2] = float("inf")
    with pytest.raises(ValueError, match="k contains NaN or Inf"):
        attnbound.attention(torch.randn(2, 300, 8, dtype=dtype), k, v)
