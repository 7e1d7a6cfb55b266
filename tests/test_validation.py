import math

import numpy as np
import pytest
import torch

import attnbound


def qkv(n_q=4, n_k=5, d=3, d_v=2, dtype=torch.float32):
    return torch.randn(n_q, d, dtype=dtype), torch.randn(n_k, d, dtype=dtype), torch.randn(n_k, d_v, dtype=dtype)


@pytest.mark.parametrize("method", ["exact", "dense", "blockwise", "taylor", "polynomial", "auto"])
def test_every_method_validates(method):
    q, k, v = qkv()
    kw = {"eps": 1e-2} if method in ("taylor", "polynomial", "auto") else {}
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        attnbound.attention(np.zeros((4, 3)), k, v, method=method, **kw)
    with pytest.raises(TypeError, match="floating"):
        attnbound.attention(q, k.long(), v, method=method, **kw)
    with pytest.raises(TypeError, match="one dtype"):
        attnbound.attention(q, k.double(), v, method=method, **kw)
    with pytest.raises(ValueError, match="feature dim"):
        attnbound.attention(q, torch.randn(5, 4), v, method=method, **kw)
    with pytest.raises(ValueError, match="n_k"):
        attnbound.attention(q, k, torch.randn(6, 2), method=method, **kw)
    with pytest.raises(ValueError, match="at least one key"):
        attnbound.attention(q, torch.randn(0, 3), torch.randn(0, 2), method=method, **kw)
    for name, idx in (("q", 0), ("k", 1), ("v", 2)):
        for bad in (float("nan"), float("inf")):
            args = list(qkv())
            args[idx][0, 0] = bad
            with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
                attnbound.attention(*args, method=method, **kw)
    with pytest.raises(ValueError, match="n_q == n_k"):
        attnbound.attention(q, k, v, is_causal=True, method=method, **kw)
    with pytest.raises(ValueError, match="do not broadcast"):
        attnbound.attention(torch.randn(2, 4, 3), torch.randn(3, 5, 3), torch.randn(3, 5, 2), method=method, **kw)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        attnbound.attention(*qkv(), scale=scale)


def test_bad_scale_type():
    with pytest.raises(TypeError, match="scale"):
        attnbound.attention(*qkv(), scale="0.5")


def test_unknown_kind_and_method():
    with pytest.raises(ValueError, match="unknown kind 'cosine'"):
        attnbound.attention(*qkv(), kind="cosine")
    with pytest.raises(ValueError, match="unknown method 'fast'"):
        attnbound.attention(*qkv(), method="fast")


def test_bad_block_size_and_eps():
    with pytest.raises(ValueError, match="block_size"):
        attnbound.attention(*qkv(), block_size=0)
    with pytest.raises(ValueError, match="eps"):
        attnbound.attention(*qkv(), method="auto")
    with pytest.raises(ValueError, match="eps"):
        attnbound.attention(*qkv(), method="auto", eps=-1.0)


def test_validation_happens_before_large_allocation():
    # a NaN in a huge-looking problem fails at once, without trying to allocate n×n
    q = torch.zeros(1, 200_000, 2)
    q[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="q contains NaN"):
        attnbound.attention(q, q, q, method="dense")


def test_d_one_and_n_one_are_valid():
    out = attnbound.attention(torch.ones(1, 1), torch.ones(1, 1), torch.full((1, 1), 3.0))
    assert math.isclose(float(out), 3.0)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_sparse_inputs_raise_a_type_error_naming_the_argument(name):
    g = torch.Generator().manual_seed(0)
    t = {n: torch.randn(6, 4, generator=g) for n in ("q", "k", "v")}
    t[name] = t[name].to_sparse()
    with pytest.raises(TypeError, match=f"^{name} must be a dense"):
        attnbound.attention(t["q"], t["k"], t["v"])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(is_causal="no"), TypeError, "is_causal"),
    (dict(method="polynomial", degree=3, strict="no"), TypeError, "strict"),
    (dict(method="auto", eps=1e-3, cost_model="x"), TypeError, "cost_model"),
    (dict(method="taylor", eps=1e-3, degree=4), ValueError, "degree: method='taylor' takes order"),
    (dict(method="polynomial", order=4), ValueError, "order: method='polynomial' takes degree"),
    (dict(method="relative", eps=1e-3, order=4), ValueError, "order: method='relative'"),
    (dict(method="exact", degree=3), ValueError, "degree: fixes"),
    (dict(method="auto", eps=1e-3, order=2), ValueError, "order: fixes"),
    (dict(method="blockwise", centre=True), ValueError, "centre"),
    (dict(method="exact", heavy=2), ValueError, "heavy"),
])
def test_options_that_would_be_ignored_are_refused_naming_them(kwargs, error, match):
    q = torch.randn(8, 4) * 0.1
    with pytest.raises(error, match=match):
        attnbound.attention(q, q, q, **kwargs)


def test_options_that_do_apply_are_accepted():
    q = torch.randn(8, 4, dtype=torch.float64) * 0.1
    attnbound.attention(q, q, q, method="exact", centre=False, heavy=0, strict=True, is_causal=True)
    attnbound.attention(q, q, q, method="taylor", order=4)
    attnbound.attention(q, q, q, method="relative", degree=3, centre=True, heavy=2)
