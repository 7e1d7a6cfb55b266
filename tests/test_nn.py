import pytest
import torch

import attnbound
from attnbound.hardness import gap_hamming_instance, ov_instance, ov_to_attention, pack_transformer, solve_gap_hamming, solve_ov
from attnbound.nn import Attention, Transformer


def test_attention_module_matches_torch_mha(rng):
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    ours = Attention(32, 4)
    ours.load_state_dict(mha.state_dict())
    x = torch.randn(3, 50, 32, generator=rng)
    ref, _ = mha(x, x, x, need_weights=False)
    assert torch.allclose(ours(x), ref, atol=1e-5)
    assert ours.last_certificate.method == "exact"
    causal = torch.ones(50, 50, dtype=torch.bool).triu(1)
    ref_c, _ = mha(x, x, x, attn_mask=causal, need_weights=False)
    ours_c = Attention(32, 4, is_causal=True)
    ours_c.load_state_dict(mha.state_dict())
    assert torch.allclose(ours_c(x), ref_c, atol=1e-5)


def test_attention_module_certificate_bounds_every_head(rng):
    m = Attention(16, 2, method="polynomial", eps=1e-4).double()
    x = torch.randn(2, 40, 16, generator=rng, dtype=torch.float64) * 0.3
    out = m(x)
    cert = m.last_certificate
    assert cert.method == "polynomial" and cert.output_error_bound <= 1e-4
    exact = m(x, method="exact")
    # the certificate bounds the attention output; the output projection scales it by ‖W_O‖∞
    with torch.no_grad():
        assert float((out - exact).abs().max()) <= cert.output_error_bound * float(m.out_proj.weight.abs().sum(1).max())


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="num_heads=3 must divide embed_dim=16"):
        Attention(16, 3)
    with pytest.raises(ValueError, match="embed_dim"):
        Attention(0, 1)
    with pytest.raises(ValueError, match="embed_dim=16"):
        Attention(16, 2)(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="num_layers"):
        Transformer(0, 16, 2)


@pytest.mark.parametrize("method,kw", [("exact", {}), ("polynomial", {"eps": 1e-3}), ("taylor", {"eps": 1e-2})])
def test_transformer_gradients_through_every_method(method, kw, rng):
    model = Transformer(2, 16, 2, method=method, **kw).double()
    x = torch.randn(2, 12, 16, generator=rng, dtype=torch.float64) * 0.2
    model(x).square().sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().max()) > 0 for g in grads)


def test_transformer_method_switch_at_call_time(rng):
    torch.manual_seed(0)  # the weights set the radius; keep it modest
    model = Transformer(2, 16, 4).double()
    x = torch.randn(1, 30, 16, generator=rng, dtype=torch.float64) * 0.1
    a = model(x)
    b = model(x, method="polynomial", eps=1e-6)
    assert torch.allclose(a, b, atol=1e-5)
    assert [c.method for c in model.last_certificates] == ["polynomial", "polynomial"]


@pytest.mark.parametrize("layers,heads", [(1, 1), (2, 3), (4, 2)])
def test_packed_transformer_decides_every_instance(layers, heads):
    insts = [ov_instance(24, 8, planted=bool((i * 7 + layers) % 3 == 0), seed=10 * layers + i)
             for i in range(layers * heads)]
    pk = pack_transformer(insts, layers, heads)
    assert pk.decide() == [solve_ov(i)[0] for i in insts]
    for inst, col in zip(insts, pk.outputs()):
        red = ov_to_attention(inst)
        alone = attnbound.attention(red.q, red.k, red.v, scale=red.scale)
        assert torch.allclose(col, alone, atol=1e-12)


def test_packed_gap_hamming():
    insts = [gap_hamming_instance(16, 32, t=4, gamma=0.5, planted=bool(i % 2), seed=i) for i in range(4)]
    pk = pack_transformer(insts, 2, 2)
    assert pk.decide() == [solve_gap_hamming(i)[0] for i in insts]


def test_pack_errors():
    a = ov_instance(8, 6, planted=True, seed=0)
    b = ov_instance(9, 6, planted=True, seed=0)
    with pytest.raises(ValueError, match="instances must hold num_layers\\*num_heads = 2"):
        pack_transformer([a], 1, 2)
    with pytest.raises(ValueError, match="same size"):
        pack_transformer([a, b], 1, 2)
    with pytest.raises(TypeError, match=r"instances\[0\]"):
        pack_transformer(["x"], 1, 1)
    with pytest.raises(ValueError, match="'l2' reduction"):
        pack_transformer([ov_to_attention(a, kind="l2")], 1, 1)
