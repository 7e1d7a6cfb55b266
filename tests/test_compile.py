"""torch.compile: attnbound's calls are a clean graph break — compiled and eager give the same tensors,
gradients and certificates, for attention(), nn.Attention and Transformer, on the fused-kernel path too."""

import pytest
import torch

import attnbound
from attnbound.nn import Attention, Transformer

F = torch.float64


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(seed=0, n=300, d=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n, d, generator=g, dtype=F) * 0.1 for _ in range(3)]


@pytest.mark.parametrize("method,opts", [("auto", dict(eps=1e-6)), ("relative", dict(eps=1e-6)),
                                         ("exact", {}), ("auto", dict(eps=1e-6, is_causal=True))])
def test_attention_compiles_to_the_same_tensors_and_certificates(method, opts):
    q, k, v = _inputs()

    def f(q, k, v):
        out, cert = attnbound.attention(q * 1.0, k, v, method=method, return_certificate=True, **opts)
        return out * 2.0, cert

    want, want_cert = f(q, k, v)
    got, cert = torch.compile(f, backend="eager", fullgraph=False)(q, k, v)
    assert torch.equal(got, want) and cert == want_cert
    if method == "relative":
        assert cert.engine == "fused"  # the numba path, which dynamo cannot trace, ran


def test_nn_attention_forward_and_backward_compile_like_eager():
    torch.manual_seed(0)
    m = Attention(8, 2, method="auto", eps=1e-6, batch_first=True).double()
    x = torch.randn(2, 40, 8, dtype=F) * 0.1
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_e, _ = m(xe, xe, xe, need_weights=False)
    out_e.square().sum().backward()
    cert_e, grads_e = m.last_certificate, [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    out_c, _ = torch.compile(m, backend="aot_eager")(xc, xc, xc, need_weights=False)
    out_c.square().sum().backward()
    assert torch.allclose(out_c, out_e, rtol=0, atol=1e-15) and m.last_certificate == cert_e
    assert torch.allclose(xc.grad, xe.grad, rtol=0, atol=1e-14)
    for p, g in zip(m.parameters(), grads_e):
        assert torch.allclose(p.grad, g, rtol=0, atol=1e-14)


def test_transformer_forward_and_backward_compile_like_eager():
    torch.manual_seed(1)
    model = Transformer(2, 8, 2, method="relative", eps=1e-6).double()
    x = torch.randn(1, 24, 8, dtype=F) * 0.1
    out_e = model(x)
    out_e.sum().backward()
    certs_e, grads_e = model.last_certificates, [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out_c = torch.compile(model, backend="eager")(x)
    out_c.sum().backward()
    assert torch.allclose(out_c, out_e, rtol=0, atol=1e-15) and model.last_certificates == certs_e
    for p, g in zip(model.parameters(), grads_e):
        assert torch.allclose(p.grad, g, rtol=0, atol=1e-14)


def test_outside_compilation_the_plain_function_runs():
    from attnbound.eager import eager_only

    calls = []

    @eager_only
    def f(x):
        calls.append(torch.compiler.is_compiling())
        return x + 1

    assert f(torch.zeros(1)).item() == 1.0 and calls == [False]
    assert torch.compile(lambda x: f(x) * 2, backend="eager")(torch.zeros(1)).item() == 2.0
    assert calls[-1] is False  # inside compile the call ran eagerly, not traced


def test_dynamo_does_not_trace_into_a_certified_call():
    """One graph break at the call, nothing traced inside it (dynamo tracing into the statistics, the planner
    and the numba dispatch breaks the graph dozens of times and recompiles on every new degree)."""
    q, k, v = _inputs()

    def f(q, k, v):
        return attnbound.attention(q * 1.0, k, v, method="relative", eps=1e-6, is_causal=True) * 2.0

    explained = torch._dynamo.explain(f)(q, k, v)
    assert explained.graph_break_count <= 1, explained.break_reasons
