"""attnbound.pipeline: the contract of attention() as a whole (validate → statistics → tries → execute).
Every returned tensor is finite, of the documented shape and dtype, and within its certificate of the
exact attention of the inputs as given (long-double reference, tests/reference.py); with eps the bound
meets eps or the call raises."""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnbound
from attnbound.planner import plan
from contract import check_contract

F64 = torch.float64


# ---------------------------------------------------------------- validate: refusals that name the argument
def test_plus_inf_in_a_mask_is_refused():
    q = torch.randn(4, 3)
    mask = torch.zeros(4, 4)
    mask[1, 2] = math.inf
    with pytest.raises(ValueError, match=r"attn_mask contains \+inf"):
        attnbound.attention(q, q, q, attn_mask=mask)


def test_bound_must_be_a_positive_real():
    q = torch.randn(4, 3)
    for bad in (0.0, -1.0, True, math.nan, math.inf):
        with pytest.raises(ValueError, match="bound"):
            attnbound.attention(q, q, q, method="polynomial", eps=1e-2, bound=bad)


def test_bad_masks_and_dtypes_raise_clear_errors():
    q = torch.randn(4, 3)
    for mask in (torch.zeros(4), torch.tensor(True), torch.tensor(0.0)):  # a 1-D or 0-d mask is one row for all
        out, cert = attnbound.attention(q, q, q, attn_mask=mask, return_certificate=True)
        check_contract(out, cert, q, q, q, attn_mask=mask.reshape(1, -1) if mask.dim() else mask.reshape(1, 1))
    if hasattr(torch, "float8_e4m3fn"):
        with pytest.raises(TypeError, match="floating dtype"):
            attnbound.attention(q.to(torch.float8_e4m3fn), q.to(torch.float8_e4m3fn), q.to(torch.float8_e4m3fn))
    with pytest.raises(TypeError, match="attn_mask"):
        attnbound.attention(q[None], q[None], q[None], attn_mask=[[True]], enable_gqa=True)


def test_an_expanded_float_mask_is_refused_before_its_copies():
    q = torch.randn(1, 6000, 2)
    m = torch.zeros(1, 1).expand(6000, 6000)
    with pytest.raises(ValueError, match="memory_budget"):
        attnbound.attention(q, q, q, attn_mask=m, memory_budget=1 << 20)


def test_dense_respects_the_memory_budget_and_mask_cannot_grow_the_batch():
    q = torch.randn(1, 4096, 4)
    with pytest.raises(ValueError, match="memory_budget"):
        attnbound.attention(q, q, q, method="dense", memory_budget=1 << 20)
    out = attnbound.attention(q, q, q, method="exact", memory_budget=64 << 20)  # exact goes blockwise instead
    assert out.shape == q.shape
    small = torch.randn(4, 3)
    with pytest.raises(ValueError, match="attn_mask"):
        attnbound.attention(small, small, small, attn_mask=torch.ones(7, 1, 4, 4, dtype=torch.bool))


@pytest.mark.parametrize("method", ["exact", "dense", "blockwise", "taylor", "polynomial", "auto"])
@pytest.mark.parametrize("shape", [("n_q", (0, 3), (5, 3), (5, 2)), ("batch", (0, 4, 3), (0, 5, 3), (0, 5, 2)),
                                   ("d_v", (4, 3), (5, 3), (5, 0))])
def test_empty_outputs_are_consistent(method, shape):
    _, sq, sk, sv = shape
    q, k, v = torch.randn(sq), torch.randn(sk), torch.randn(sv)
    out, cert = attnbound.attention(q, k, v, method=method, eps=1e-3, return_certificate=True)
    assert out.shape == (*torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]), sq[-2], sv[-1])
    assert out.dtype == q.dtype and cert.output_error_bound == 0.0


# ---------------------------------------------------------------- statistics: keys no row can see
def test_a_huge_key_hidden_by_the_mask_does_not_break_auto():
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 50, 8, generator=gen) * 0.3 for _ in range(3))
    k[:, -1] = 1e3
    pad = torch.ones(2, 1, 50, dtype=torch.bool)
    pad[:, :, -1] = False
    out, cert = attnbound.attention(q, k, v, attn_mask=pad, method="auto", eps=1e-3, return_certificate=True)
    check_contract(out, cert, q, k, v, attn_mask=pad, eps=1e-3)


@pytest.mark.parametrize("kw", [{}, {"kind": "l2"}, {"method": "auto", "eps": 1e-3}, {"method": "dense"},
                                {"method": "blockwise"}])
def test_a_hidden_key_whose_logit_overflows_is_harmless(kw):
    gen = torch.Generator().manual_seed(14)
    q, k, v = (torch.randn(n, 4, generator=gen) for n in (3, 5, 5))
    v = v[:, :2]
    k[2] = 3e38
    m = torch.zeros(1, 5)
    m[:, 2] = -math.inf
    out, cert = attnbound.attention(q, k, v, attn_mask=m, return_certificate=True, **kw)
    check_contract(out, cert, q, k, v, attn_mask=m, kind=kw.get("kind", "softmax"))


# ---------------------------------------------------------------- tries: a provisional miss falls back to exact
def _logits_all_at(value, n, d, dtype=F64):
    """q_i = a·e_1, k_j = b·e_1: every logit s·a·b equals ``value`` (the worst case for the rounding term)."""
    q = torch.zeros(1, n, d, dtype=dtype)
    k = torch.zeros(1, n, d, dtype=dtype)
    q[..., 0] = -1.0 if value < 0 else 1.0
    k[..., 0] = abs(value) * math.sqrt(d)
    return q, k


def test_posterior_rounding_decides_and_auto_falls_back_to_exact():
    n, d, eps = 512, 2, 1e-6
    gen = torch.Generator().manual_seed(11)
    v = torch.sign(torch.randn(1, n, 3, generator=gen, dtype=F64))
    # benign: logits spread around 0, the measured row sums are large: the a-posteriori bound certifies
    q = torch.randn(1, n, d, generator=gen, dtype=F64)
    k = torch.randn(1, n, d, generator=gen, dtype=F64)
    c = math.sqrt(8 * math.sqrt(d) / float(q.norm(dim=-1).max() * k.norm(dim=-1).max()))
    out, cert = attnbound.attention(q * c, k * c, v, method="relative", eps=eps, return_certificate=True)
    check_contract(out, cert, q * c, k * c, v, eps=eps)
    # adversarial: every logit at −R; the row sums are n·e^{−R}: the measured bound misses eps
    qa, ka = _logits_all_at(-8.0, n, d)
    ka[:, ::2, 1] = 1e-3  # the keys differ a little, so the answer is not trivially the mean
    with pytest.raises(ValueError, match="rounding bound on this input"):
        attnbound.attention(qa, ka, v, method="relative", eps=eps)
    # (centring removes the common direction: the radius collapses and the polynomial certifies)
    out, cert = attnbound.attention(qa, ka, v, method="relative", eps=eps, centre=True, return_certificate=True)
    assert "centred" in cert.radius_source and cert.radius < 0.1
    check_contract(out, cert, qa, ka, v, eps=eps)
    from attnbound.planner import DEFAULT_COST_MODEL, CostModel

    slow_exact = CostModel(**{**DEFAULT_COST_MODEL.__dict__, "c_pair": 1.0})  # make the plan take the provisional one
    p = plan(n, n, d, 3, 8.0, eps, value_range=2.0, max_abs_value=1.0, cost_model=slow_exact, out_dtype=F64)
    assert p.choice.provisional
    out, cert = attnbound.attention(qa, ka, v, method="auto", eps=eps, cost_model=slow_exact, centre=False, heavy=0,
                                    return_certificate=True)
    assert cert.method == "exact"
    check_contract(out, cert, qa, ka, v, eps=eps)


# ---------------------------------------------------------------- property test over the whole surface
METHODS = ["exact", "dense", "blockwise", "taylor", "polynomial", "auto"]


MASKS = ["none", "padding", "bool", "additive"]


DTYPES = [F64, torch.float32, torch.float16, torch.bfloat16]


SWEEP = int(os.environ.get("ATTNBOUND_SWEEP", "0"))  # e.g. ATTNBOUND_SWEEP=2000: a long random sweep


@settings(max_examples=SWEEP or 80, deadline=None, derandomize=not SWEEP, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["softmax", "l2"]), mask=st.sampled_from(MASKS), causal=st.booleans(),
       dtype=st.sampled_from(DTYPES), method=st.sampled_from(METHODS), n=st.integers(1, 70),
       radius=st.floats(0.05, 3.0), seed=st.integers(0, 2**16), centre=st.sampled_from([None, True, False]),
       heavy=st.sampled_from([None, 0, 1, 3]), offset=st.sampled_from([0.0, 2.0]))
def test_contract_holds_everywhere(kind, mask, causal, dtype, method, n, radius, seed, centre, heavy, offset):
    gen = torch.Generator().manual_seed(seed)
    d = 4
    q, k = (torch.randn(2, n, d, generator=gen, dtype=F64) for _ in range(2))
    c = math.sqrt(radius * math.sqrt(d) / float(q.norm(dim=-1).max() * k.norm(dim=-1).max()))
    q, k = q * c, k * c
    if offset:  # a common offset (centring pays) and one outlier token (a heavy token pays)
        shift = torch.randn(d, generator=gen, dtype=F64) * offset / math.sqrt(d)
        q, k = q + shift, k + shift
        q[:, 0] *= 3.0
        k[:, -1] *= 3.0
    v = torch.randn(2, n, 3, generator=gen, dtype=F64)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    attn_mask = None
    if mask == "padding":
        attn_mask = torch.rand(2, 1, n, generator=gen) > 0.3
    elif mask == "bool":
        attn_mask = torch.rand(n, n, generator=gen) > 0.3
    elif mask == "additive":
        attn_mask = torch.randn(n, n, generator=gen, dtype=F64).to(dtype) * 3
    approx = method in ("taylor", "polynomial")
    general = mask == "additive" or (mask == "bool" and n > 1)  # a (1, 1) bool mask is key padding
    eps = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    kw = {"eps": eps} if approx or method == "auto" else {}
    if approx or method == "auto":
        kw.update(centre=centre, heavy=heavy)
    if approx and general:
        with pytest.raises(ValueError, match="attn_mask"):
            attnbound.attention(q, k, v, kind=kind, is_causal=causal, attn_mask=attn_mask, method=method, **kw)
        return
    try:
        out, cert = attnbound.attention(q, k, v, kind=kind, is_causal=causal, attn_mask=attn_mask, method=method,
                                        block_size=16, return_certificate=True, **kw)
    except ValueError as exc:  # only a stated reason is acceptable, and only when eps cannot be met
        assert "eps" in str(exc) and "eps" in kw, exc
        return
    check_contract(out, cert, q, k, v, kind=kind, is_causal=causal, attn_mask=attn_mask, eps=kw.get("eps"))


# ---------------------------------------------------------------- auto's shortcut past the feature plan
def _auto_call(q, k, v, eps, **opts):
    from attnbound import pipeline

    o = pipeline.Options(method="auto", eps=eps, **opts)
    checked = pipeline.validate(q, k, v, None, o)
    return pipeline, pipeline.statistics(q, k, v, checked, o), o


@pytest.mark.parametrize("seed", range(6))
def test_the_radius_floor_is_below_every_variant(seed):
    g = torch.Generator().manual_seed(seed)
    n, d = 60 + 7 * seed, 4 + seed
    q = torch.randn(2, n, d, generator=g, dtype=F64) * (0.2 + seed) + 3.0 * (seed % 2)  # offsets: centring helps
    k = torch.randn(2, n, d, generator=g, dtype=F64) * (0.3 + seed)
    k[0, :5] *= 20.0  # a few heavy keys
    pipeline, call, o = _auto_call(q, k, q, 1e-3)
    floor = pipeline._radius_floor(call, None)
    vs = pipeline.variants(call, None, None, auto=True)
    assert floor is not None and floor > 0.0 and len(vs) >= 1
    assert all(floor <= var.radius for var, _ in vs), (floor, [var.radius for var, _ in vs])
    # with every centring and heavy count forced, too
    for centre in (False, True):
        for heavy in (0, 2, 8):
            (var, _), = pipeline.variants(call, centre, heavy, auto=True)
            assert floor <= var.radius


def test_the_shortcut_only_skips_plans_whose_choice_is_exact():
    # Gaussian d = 64 heads: no variant can win, the shortcut runs exact at once, and the full plan agrees
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 1024, 64, generator=g) for _ in range(3))
    pipeline, call, o = _auto_call(q, k, v, 1e-2)
    assert [t.method for t in pipeline.tries(call, o)] == ["exact"]
    vs = pipeline.variants(call, None, None, auto=True)
    st = call.stats
    p = plan(1024, 1024, 64, 64, vs[0][0].radius, 1e-2, batch=4, value_range=st.value_range,
             max_abs_value=st.max_abs_value, out_dtype=torch.float32, logit_bound=st.logit_bound(0.125, "softmax"),
             scale=0.125, variants=[x for x, _ in vs])
    assert p.choice.method == "exact"
    # a bounded, long input must still reach the feature families (the shortcut must say it cannot decide)
    q, k, v = (torch.randn(1, 8192, 4, generator=g, dtype=F64) * 0.3 for _ in range(3))
    pipeline, call, o = _auto_call(q, k, v, 1e-3)
    floor = pipeline._radius_floor(call, None)
    assert floor is not None
    assert not pipeline.features_cannot_win(8192, 8192, 4, 4, floor, 1e-3, False, batch=1, kind="softmax",
                                            value_range=call.stats.value_range,
                                            max_abs_value=call.stats.max_abs_value, out_dtype=F64,
                                            logit_bound=call.stats.logit_bound(0.5, "softmax"), scale=0.5,
                                            mask_span=0.0, memory_budget=call.budget, requires_grad=False)
    _, cert = attnbound.attention(q, k, v, method="auto", eps=1e-3, return_certificate=True)
    assert cert.method != "exact"


def test_the_radius_floor_is_tight_on_rows_along_their_centre():
    # rows c + t·ĉ, t evenly spaced in [−1, 1]: centred, the radius is max|t| = half the spread of the norms,
    # so the floor must use half the spread (a floor of the whole spread would exceed the centred radius)
    n, d = 101, 3
    t = torch.linspace(-1.0, 1.0, n, dtype=F64).unsqueeze(-1)
    c = torch.tensor([3.0, 4.0, 0.0], dtype=F64)
    q = c + t * c / 5.0
    k = 2.0 * c + 2.0 * t * c / 5.0
    pipeline, call, o = _auto_call(q.unsqueeze(0), k.unsqueeze(0), q.unsqueeze(0), 1e-3)
    floor = pipeline._radius_floor(call, None)
    (centred, _), = pipeline.variants(call, True, 8, auto=True)  # the 8 rows of largest |t| set aside
    assert floor <= centred.radius <= 1.25 * floor  # (the floor allows all 8 set aside at one end)


@pytest.mark.parametrize("seed", range(4))
def test_the_radius_floor_with_key_padding_counts_only_the_keys_that_take_part(seed):
    g = torch.Generator().manual_seed(40 + seed)
    # rows along their centre c (|c| = 5): centred, the keys' radius is ~0.2·(1 + seed), far below the spread
    # of their norms once the hidden keys (norm 0) are counted
    c = torch.tensor([3.0, 4.0, 0.0, 0.0, 0.0, 0.0], dtype=F64)
    q = c + torch.rand(3, 50, 1, generator=g, dtype=F64).mul(2).sub(1) * c / 5.0
    k = c + torch.rand(3, 50, 1, generator=g, dtype=F64).mul(2).sub(1) * c * (0.04 * (1 + seed))
    pad = torch.rand(3, 50, generator=g) > 0.3
    pad[2, 10:] = False  # a batch entry with too few keys to count
    k[~pad] = 0.0  # hidden keys: norm 0, which must not widen the spread
    from attnbound import pipeline

    o = pipeline.Options(method="auto", eps=1e-3)
    mask = pad[:, None, :]
    checked = pipeline.validate(q, k, q, mask, o)
    call = pipeline.statistics(q, k, q, checked, o)
    floor = pipeline._radius_floor(call, None)
    assert floor is not None and floor > 0.0
    for centre in (False, True):
        for heavy in (0, 2, 8):
            (var, _), = pipeline.variants(call, centre, heavy, auto=True)
            assert floor <= var.radius, (centre, heavy, floor, var.radius)
