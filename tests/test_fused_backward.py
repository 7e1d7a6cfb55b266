"""The fused backward (engines.fused_backward) against autograd through the torch feature engine, its reference:
full and causal, at the row-walk and causal-tile boundaries, with broadcast batches and masked keys; and its
memory: no n × r activation is saved."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnbound
from attnbound.engines import features, fused_backward as fb, registry
from attnbound.engines.monomials import feature_rank, monomial_weights

T = fb.CAUSAL_TILE


def _case(n, d=3, C=4, g=3, batch=(2,), seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = np.array([1.0, 1.0, 0.5, 1 / 6, 1 / 24][: g + 1])
    w = torch.as_tensor(monomial_weights(a, d))
    q = (torch.randn(*batch, n, d, generator=gen, dtype=torch.float64) * 0.4).requires_grad_()
    k = (torch.randn(*batch, n, d, generator=gen, dtype=torch.float64) * 0.4).requires_grad_()
    vv = torch.randn(*batch, n, C, generator=gen, dtype=torch.float64).requires_grad_()
    grad = torch.randn(*batch, n, C, generator=gen, dtype=torch.float64)
    return q, k, vv, w, grad


def _reference(q, k, vv, w, g, is_causal):
    if is_causal:
        return features.causal_readout(q, k, vv, degree=g, weights=w, chunk=50)
    return features.state_readout(q, features.key_state(k, vv, degree=g, weights=w, chunk=50), degree=g, chunk=50)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("n", [1, fb.ROW_TILE - 1, fb.ROW_TILE, fb.ROW_TILE + 1, 2 * T + 3, 300])
def test_matches_autograd_through_the_reference(is_causal, n):
    g = 3
    q, k, vv, w, grad = _case(n, g=g)
    num = fb.fused_features(q, k, vv, weights=w, degree=g, is_causal=is_causal)
    got = torch.autograd.grad(num, (q, k, vv), grad)
    ref = _reference(q, k, vv, w, g, is_causal)
    want = torch.autograd.grad(ref, (q, k, vv), grad)
    assert torch.allclose(num, ref, rtol=1e-12, atol=1e-12)
    for x, y in zip(got, want):
        assert torch.allclose(x, y, rtol=1e-11, atol=1e-12), float((x - y).abs().max())


@pytest.mark.parametrize("is_causal", [False, True])
def test_empty_sequences(is_causal):
    """n = 0 in a non-empty batch: empty gradients of the inputs' shapes (the reference engine refuses n = 0)."""
    q, k, vv, w, grad = _case(0, g=3)
    got = torch.autograd.grad(fb.fused_features(q, k, vv, weights=w, degree=3, is_causal=is_causal), (q, k, vv), grad)
    assert [x.shape for x in got] == [q.shape, k.shape, vv.shape]


@pytest.mark.parametrize("is_causal", [False, True])
def test_broadcast_batch_and_degree_four(is_causal):
    g = 4
    q, k, vv, w, grad = _case(70, d=2, C=3, g=g, batch=(2, 3))
    k1 = k.detach()[:, :1].clone().requires_grad_()  # keys shared by the 3 heads
    num = fb.fused_features(q, k1, vv, weights=w, degree=g, is_causal=is_causal)
    got = torch.autograd.grad(num, (q, k1, vv), grad)
    want = torch.autograd.grad(_reference(q, k1, vv, w, g, is_causal), (q, k1, vv), grad)
    assert got[1].shape == k1.shape
    for x, y in zip(got, want):
        assert torch.allclose(x, y, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_uses_the_fused_backward_and_agrees_with_the_torch_engine(is_causal, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 150, 4, generator=gen) * 0.4 for _ in range(3))
    pad = torch.ones(2, 1, 150, dtype=torch.bool)
    pad[1, :, 120:] = False
    grads = {}
    for name in ("fused", "torch"):
        if name == "torch":
            monkeypatch.setattr(registry, "FEATURE_ORDER", ("torch",))
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, cert = attnbound.attention(*leaves, method="relative", eps=1e-3, is_causal=is_causal, attn_mask=pad,
                                        return_certificate=True)
        out.square().sum().backward()
        grads[name] = [x.grad for x in leaves]
        assert cert.engine == name
    for x, y in zip(grads["fused"], grads["torch"]):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)


def test_saves_no_feature_activation():
    """What autograd keeps for the backward: the inputs and an r × C state, never an (n, r) block."""
    g = 4
    q, k, vv, w, grad = _case(3000, d=4, C=5, g=g, batch=(1,))
    r = feature_rank(4, g)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for causal in (False, True):
            fb.fused_features(q, k, vv, weights=w, degree=g, is_causal=causal)
    assert saved and max(saved) <= 3000 * 5 < 3000 * r


def _np(*xs):
    return [np.ascontiguousarray(x.detach().reshape(-1, *x.shape[-2:]).numpy()) for x in xs]


@pytest.mark.parametrize("segments", [None, 1, 2, 3, 7])
@pytest.mark.parametrize("batch", [1, 3])
def test_causal_segments_agree_with_the_reference(segments, batch):
    """Segments of a sequence run in parallel from the prefix key state and the suffix query state: every cut
    (between tiles, a short last segment; None: as many as the threads take), one sequence or several."""
    g, n = 3, 9 * T + 5
    q, k, vv, w, grad = _case(n, batch=(batch,), seed=segments or 0)
    want = torch.autograd.grad(_reference(q, k, vv, w, g, True), (q, k, vv), grad)
    got = fb.causal_grads(*_np(q, k, vv, grad), w.numpy(), g, segments=segments)
    for x, y in zip(got, want):
        assert np.allclose(x, y.numpy(), rtol=1e-11, atol=1e-12), float(np.abs(x - y.numpy()).max())


def test_causal_backward_refuses_weights_without_a_polynomial():
    q, k, vv, w, grad = _case(10, batch=(1,))
    w = w.clone()
    w[2] += 1.0  # no longer a_|α|·|α|!/α!
    with pytest.raises(ValueError, match="w:"):
        fb.causal_grads(*_np(q, k, vv, grad), w.numpy(), 3)


@pytest.mark.parametrize("is_causal", [False, True])
def test_columns_in_groups(is_causal):
    """More columns than one generated kernel holds: the column groups' gradients add up (the last group padded)."""
    g = 2
    q, k, vv, w, grad = _case(2 * T + 7, d=3, C=fb.fused.MAX_COLUMNS + 3, g=g, batch=(1,))
    num = fb.fused_features(q, k, vv, weights=w, degree=g, is_causal=is_causal)
    got = torch.autograd.grad(num, (q, k, vv), grad)
    want = torch.autograd.grad(_reference(q, k, vv, w, g, is_causal), (q, k, vv), grad)
    for x, y in zip(got, want):
        assert torch.allclose(x, y, rtol=1e-11, atol=1e-12), float((x - y).abs().max())


@pytest.mark.parametrize("wanted", [(0,), (1,), (2,), (0, 2)])
def test_causal_backward_of_some_inputs(wanted):
    """Only some inputs want gradients (dV alone takes the reversed causal readout): each is the reference's."""
    g = 3
    q, k, vv, w, grad = _case(2 * T + 9, batch=(2,), seed=5)
    leaves = [x.detach().requires_grad_(i in wanted) for i, x in enumerate((q, k, vv))]
    got = torch.autograd.grad(fb.fused_features(*leaves, weights=w, degree=g, is_causal=True),
                              [leaves[i] for i in wanted], grad)
    want = torch.autograd.grad(_reference(*leaves, w, g, True), [leaves[i] for i in wanted], grad)
    for x, y in zip(got, want):
        assert torch.allclose(x, y, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("zero", [(0,), (1, 3), (0, 1, 2, 3)])
def test_zero_columns_of_vv(is_causal, zero):
    """Columns of vv that are zero everywhere are skipped in the forward (zero columns of num, nothing to dq, dk):
    the output and all three gradients are still the reference's (dV of a zero column is not zero)."""
    g = 3
    q, k, vv, w, grad = _case(2 * T + 5, batch=(2,), seed=7)
    vv = vv.detach().clone()
    vv[..., list(zero)] = 0.0
    vv.requires_grad_()
    num = fb.fused_features(q, k, vv, weights=w, degree=g, is_causal=is_causal)
    ref = _reference(q, k, vv, w, g, is_causal)
    assert torch.allclose(num, ref, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(num, (q, k, vv), grad)
    want = torch.autograd.grad(ref, (q, k, vv), grad)
    for x, y in zip(got, want):
        assert torch.allclose(x, y, rtol=1e-11, atol=1e-12), float((x - y).abs().max())
