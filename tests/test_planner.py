"""attnbound.planner: plan() rates every candidate by its real certificate, picks exact where the features
cannot go (huge radius, eps below the output dtype's rounding) and fits the memory budget exact runs in."""

import pytest
import torch

import attnbound
from attnbound.planner import plan
from contract import check_contract

F64 = torch.float64


# ---------------------------------------------------------------- exact is rated by its real certificate
def test_plan_rates_exact_by_its_real_certificate():
    p = plan(256, 256, 16, 16, 4.0, 1e-6, out_dtype=torch.float32)
    ex = p.candidates[0]
    assert ex.method == "exact" and ex.error_bound > 0 and ex.certificate.compute_dtype == "float64"
    p32 = plan(256, 256, 16, 16, 4.0, 1e-2, out_dtype=torch.float32)
    assert p32.candidates[0].certificate.compute_dtype == "float32"


# ---------------------------------------------------------------- finding 6: auto never returns bound > eps
@pytest.mark.parametrize("dtype, eps, word", [(torch.bfloat16, 1e-3, "bfloat16 output cannot carry"),
                                              (torch.float16, 1e-4, "float16 output cannot carry"),
                                              (torch.float32, 1e-10, "float32 output cannot carry")])
@pytest.mark.parametrize("method", ["auto", "exact"])
def test_eps_below_the_output_dtype_rounding_raises_and_says_why(dtype, eps, word, method):
    q, k, v = (torch.randn(8, 4).to(dtype) for _ in range(3))
    with pytest.raises(ValueError, match=word):
        attnbound.attention(q, k, v, method=method, eps=eps)


# ---------------------------------------------------------------- finding 7: radius past ~710
@pytest.mark.parametrize("radius", [709.0, 800.0, 1e6])
def test_plan_picks_exact_at_huge_radius(radius):
    p = plan(64, 64, 4, 4, radius, 1e-2, logit_bound=radius, out_dtype=F64)
    assert p.choice.method == "exact"


def test_auto_at_huge_radius_runs_exact():
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(30, 4, generator=gen, dtype=F64) * 40 for _ in range(3))
    out, cert = attnbound.attention(q, k, v, method="auto", eps=1e-6, return_certificate=True)
    assert cert.method == "exact"
    check_contract(out, cert, q, k, v, eps=1e-6)
    with pytest.raises(ValueError, match="radius"):
        attnbound.attention(q, k, v, method="polynomial", eps=1e-3)


@pytest.mark.parametrize("radius", [683.0, 690.0, 700.0])
def test_radius_near_the_float64_edge_gives_exact_or_a_value_error(radius):
    q = torch.zeros(50, 2, dtype=F64)
    q[:, 0] = 1.0
    v = torch.randn(50, 2, dtype=F64, generator=torch.Generator().manual_seed(16))
    out, cert = attnbound.attention(q, q, v, scale=radius, method="auto", eps=1e-3, centre=False, heavy=0,
                                    return_certificate=True)
    assert cert.method == "exact"
    with pytest.raises(ValueError):
        attnbound.attention(q, q, v, scale=radius, method="polynomial", eps=1e-3, centre=False)
    # every query and key is the same vector: centred, the radius is 0 and any method certifies
    out, cert = attnbound.attention(q, q, v, scale=radius, method="polynomial", eps=1e-3, centre=True,
                                    return_certificate=True)
    assert cert.radius == 0.0
    check_contract(out, cert, q, q, v, scale=radius, eps=1e-3)
    plan(2, 2, 2, 1, radius, 1e-3)


# ---------------------------------------------------------------- memory budgets
def test_auto_fits_the_budget_that_exact_runs_in():
    gen = torch.Generator().manual_seed(40)
    q, k, v = (torch.randn(1, 2048, 4, generator=gen, dtype=F64) for _ in range(3))
    attnbound.attention(q, k, v, method="exact", eps=1e-3, memory_budget=8 << 20)
    out, cert = attnbound.attention(q, k, v, method="auto", eps=1e-3, memory_budget=8 << 20, return_certificate=True)
    check_contract(out, cert, q, k, v, eps=1e-3)


def test_auto_runs_exact_on_the_kernel_that_fits_when_sdpa_does_not():
    """SDPA's certificate meets eps but its tiles exceed the budget: exact runs dense, and auto must plan the
    same (it used to refuse, pricing exact as SDPA only)."""
    q, k, v = (torch.randn(1, 400, 8, generator=torch.Generator().manual_seed(0)) * 3 for _ in range(3))
    kw = dict(eps=1e-5, memory_budget=4_000_000, return_certificate=True)
    out_e, cert_e = attnbound.attention(q, k, v, method="exact", **kw)
    out_a, cert_a = attnbound.attention(q, k, v, method="auto", **kw)
    assert cert_e.engine == cert_a.engine == "dense" and cert_a == cert_e and torch.equal(out_a, out_e)
