"""attnbound.engines.registry: each engine's record says what it takes and, when it declines a call, why;
choose() takes the fastest engine with no reason against it, attention() records the engine that ran
(Certificate.engine), and plan() shows each candidate's engine and the faster ones it passed over."""

import pytest
import torch

import attnbound
from attnbound.engines import registry
from attnbound.engines.registry import ENGINES, EXACT_ORDER, FEATURE_ORDER, Request, choose

F64 = torch.float64
PLAIN = Request("features", "cpu", F64)  # what the fused kernels take: float64 CPU, no grad, no causal weights


# ---------------------------------------------------------------- the records
def test_the_records_and_their_order():
    assert EXACT_ORDER == ("flash", "sdpa", "dense", "blockwise") and FEATURE_ORDER == ("fused", "torch")
    assert {n: e.computes for n, e in ENGINES.items()} == {"flash": "exact", "sdpa": "exact", "dense": "exact", "blockwise": "exact",
                                                            "fused": "features", "torch": "features"}
    assert ENGINES["fused"].not_supported_reasons(PLAIN) == []
    assert choose(PLAIN) == ("fused", {})


@pytest.mark.parametrize("change, word", [({"dtype": torch.float32}, "dtype float32"),
                                          ({"dtype": torch.float16}, "dtype float16"),
                                          ({"device": "cuda"}, "device cuda"),
                                          ({"causal": True, "mask": "key weights"}, "key weights mask with is_causal")])
def test_fused_declines_with_a_reason_that_names_it_and_torch_takes_it(change, word):
    req = Request(**{**PLAIN.__dict__, **change})
    why = ENGINES["fused"].not_supported_reasons(req)
    assert len(why) == 1 and word in why[0], why
    assert ENGINES["torch"].not_supported_reasons(req) == []
    assert choose(req) == ("torch", {"fused": why})


def test_fused_takes_gradients_through_its_fused_backward():
    req = Request(**{**PLAIN.__dict__, "requires_grad": True})
    assert ENGINES["fused"].autograd and ENGINES["fused"].not_supported_reasons(req) == []
    assert choose(req) == ("fused", {})


def test_fused_takes_key_weights_without_causal_and_padding_with_it():
    for req in (Request("features", "cpu", F64, "key weights"), Request("features", "cpu", F64, "0/1 key weights"),
                Request("features", "cpu", F64, "0/1 key weights", causal=True),
                Request("features", "cpu", F64, "none", causal=True)):
        assert ENGINES["fused"].not_supported_reasons(req) == [], req


def test_every_reason_is_listed_and_a_general_mask_is_declined_by_every_feature_engine():
    req = Request("features", "cuda", torch.float32, "key weights", causal=True, requires_grad=True)
    why = ENGINES["fused"].not_supported_reasons(req)
    assert len(why) == 3 and "float32" in why[0] and "cuda" in why[1] and "is_causal" in why[2], why
    assert "requires_grad (no backward)" in ENGINES["flash"].not_supported_reasons(req) or ENGINES["flash"].autograd
    bool_mask = Request("features", "cpu", F64, "bool")
    for name in FEATURE_ORDER:
        assert ENGINES[name].not_supported_reasons(bool_mask) == ["bool mask"]
    with pytest.raises(ValueError, match="no engine takes this call: fused: bool mask; torch: bool mask"):
        choose(bool_mask)
    assert ENGINES["sdpa"].not_supported_reasons(PLAIN) == ["computes exact, not features"]


def test_fused_declines_when_its_runtime_is_unavailable(monkeypatch):
    from attnbound.engines import fused

    monkeypatch.setattr(fused, "numba", None)
    monkeypatch.setattr(fused, "_NUMBA_ERROR", "numba is not importable (ImportError: planted)")
    assert ENGINES["fused"].not_supported_reasons(PLAIN) == ["numba is not importable (ImportError: planted)"]
    assert choose(PLAIN) == ("torch", {"fused": ["numba is not importable (ImportError: planted)"]})


# ---------------------------------------------------------------- choose() for exact requests
def test_choose_exact_takes_sdpa_on_cpu_and_dense_elsewhere_with_the_reason():
    assert choose(Request("exact", "cpu", torch.float32)) == ("flash", {})
    assert choose(Request("exact", "cpu", torch.float32, "bool", causal=True, requires_grad=True)) == ("flash", {})
    name, passed = choose(Request("exact", "cpu", F64, "float", causal=True, requires_grad=True))
    assert name == "sdpa" and passed == {"flash": ["dtype float64 (takes float32)"]}
    name, passed = choose(Request("exact", "cuda", torch.float32))
    assert name == "dense" and passed == {"flash": ["device cuda (runs on cpu)"], "sdpa": ["device cuda (runs on cpu)"]}
    name, passed = choose(Request("exact", "cpu", torch.float16))  # asked for float32/float64 compute only
    assert name == "dense" and list(passed) == ["flash", "sdpa"] and "dtype float16" in passed["sdpa"][0]
    assert choose(Request("exact", "cuda", torch.float32), ("blockwise",)) == ("blockwise", {})


# ---------------------------------------------------------------- attention() records the engine that ran
def _qkv(n=64, d=8, dtype=torch.float32, seed=0, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(n, d, generator=gen, dtype=F64) * s).to(dtype) for s in (scale, scale, 1.0))


def test_certificate_engine_of_exact_methods():
    q, k, v = _qkv()
    assert attnbound.attention(q, k, v, return_certificate=True)[1].engine == "flash"
    assert attnbound.attention(q, k, v, method="blockwise", return_certificate=True)[1].engine == "blockwise"
    assert attnbound.attention(q, k, v, method="dense", return_certificate=True)[1].engine == "dense"
    # float64, n = 1024: SDPA's any-order bound (~1e-11) misses eps = 2e-12, the dense kernel's (~3e-13) meets it
    q, k, v = _qkv(1024, 8, F64, scale=0.3)
    assert attnbound.attention(q, k, v, return_certificate=True)[1].engine == "sdpa"
    _, cert = attnbound.attention(q, k, v, eps=2e-12, return_certificate=True)
    assert cert.engine == "dense" and cert.output_error_bound <= 2e-12


def test_certificate_engine_of_feature_methods():
    q, k, v = _qkv()
    _, cert = attnbound.attention(q, k, v, method="polynomial", eps=1e-3, return_certificate=True)
    assert cert.engine == "fused"  # float32 inputs: the engine computes on their float64 copies
    q.requires_grad_()  # gradients: the fused kernels with their fused backward
    _, cert = attnbound.attention(q, k, v, method="polynomial", eps=1e-3, return_certificate=True)
    assert cert.engine == "fused"
    q = q.detach()
    with torch.no_grad():  # no graph to record: the fused kernels again
        q.requires_grad_()
        assert attnbound.attention(q, k, v, method="polynomial", eps=1e-3, return_certificate=True)[1].engine \
            == "fused"
    q = q.detach()
    # ℓ2 carries per-key weights: fused without is_causal, torch with it
    kw = dict(kind="l2", method="polynomial", eps=1e-3, centre=False, heavy=0, return_certificate=True)
    assert attnbound.attention(q, k, v, **kw)[1].engine == "fused"
    assert attnbound.attention(q, k, v, is_causal=True, **kw)[1].engine == "torch"


# ---------------------------------------------------------------- plan() shows each candidate's engine
def test_plan_candidates_name_their_engine_and_why_faster_ones_were_passed_over():
    p = attnbound.plan(4096, 4096, 64, 64, 1.0, 1e-3, out_dtype=torch.float32)
    assert all(c.engine for c in p.candidates)
    exact, features = p.candidates[0], p.candidates[1:]
    # float32 output, eps = 1e-3: the flash engine's pinned-order float32 bound meets it, nothing passed over
    assert exact.engine == "flash (2 chunks of 2048)" and exact.rejected == {} and exact.error_bound <= 1e-3
    assert exact.certificate.compute_dtype == "float32"
    assert features and {c.engine for c in features} == {"fused"} and all(c.rejected == {} for c in features)
    # float64 output, eps below SDPA's any-order bound: the dense kernel, with SDPA's reason
    p = attnbound.plan(4096, 4096, 64, 64, 1.0, 1e-11, out_dtype=F64)
    exact = p.candidates[0]
    assert exact.engine in ("dense", "blockwise") and exact.certified
    (why,) = exact.rejected["sdpa"]
    assert "any-order bound" in why and "> eps=1e-11" in why
    assert exact.rejected["flash"][0] == "dtype float64 (takes float32)"
    assert p.choice is exact


def test_plan_passes_over_engines_that_cannot_take_the_device_or_gradients():
    p = attnbound.plan(4096, 4096, 64, 64, 1.0, 1e-3, out_dtype=torch.float32, device="cuda")
    assert p.candidates[0].engine == "dense" and p.candidates[0].rejected == {
        "flash": ["device cuda (runs on cpu)"], "sdpa": ["device cuda (runs on cpu)"]}
    assert all(c.engine == "torch" and c.rejected == {"fused": ["device cuda (runs on cpu)"]}
               for c in p.candidates[1:])
    p = attnbound.plan(4096, 4096, 64, 64, 1.0, 1e-3, out_dtype=torch.float32, requires_grad=True)
    assert p.candidates[0].engine.startswith("flash")
    assert all(c.engine == "fused" and c.rejected == {} for c in p.candidates[1:])
