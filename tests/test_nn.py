import pytest
import torch

import attnbound
from attnbound.hardness import gap_hamming_instance, ov_instance, ov_to_attention, pack_transformer, solve_gap_hamming, solve_ov
from attnbound.nn import Attention, Transformer


import warnings

F64 = torch.float64
B, L, E, H = 2, 11, 16, 4  # L crosses the blockwise method's 4-key blocks below


def _pair(rng, **mha_kw):
    """A torch MHA and our Attention with the same weights (float64)."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True, **mha_kw).double().eval()
    ours = Attention(E, H, **mha_kw).double().eval()
    ours.load_state_dict(mha.state_dict())
    return mha, ours


def _masks(form, rng, s=L):
    """(forward kwargs) for one MHA mask form; every query keeps at least one key."""
    if form == "none":
        return {}
    if form == "key_padding_bool":
        kpm = torch.zeros(B, s, dtype=torch.bool)
        kpm[0, -3:] = True
        kpm[1, :2] = True
        return {"key_padding_mask": kpm}
    if form == "key_padding_float":
        kpm = torch.zeros(B, s, dtype=F64)
        kpm[0, -3:] = float("-inf")
        kpm[1, :2] = -2.5  # a soft penalty, not a pad: additive
        return {"key_padding_mask": kpm}
    if form == "bool_2d":
        m = torch.rand(L, s, generator=rng) < 0.4
        m[:, 3] = False
        return {"attn_mask": m}
    if form == "bool_3d_and_padding":
        m = torch.rand(B * H, L, s, generator=rng) < 0.4
        m[..., 4] = False
        kpm = torch.zeros(B, s, dtype=torch.bool)
        kpm[1, -2:] = True
        return {"attn_mask": m, "key_padding_mask": kpm}
    if form == "float_2d":
        return {"attn_mask": torch.randn(L, s, generator=rng, dtype=F64)}
    if form == "float_3d":
        return {"attn_mask": torch.randn(B * H, L, s, generator=rng, dtype=F64)}
    if form == "causal_bool":
        return {"attn_mask": torch.ones(L, L, dtype=torch.bool).triu(1), "is_causal": True}
    if form == "causal_float":
        return {"attn_mask": torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=F64), "is_causal": True}
    if form == "causal_and_padding":
        kpm = torch.zeros(B, L, dtype=torch.bool)
        kpm[0, 5:] = True
        return {"attn_mask": torch.ones(L, L, dtype=torch.bool).triu(1), "is_causal": True, "key_padding_mask": kpm}
    raise AssertionError(form)


MASK_FORMS = ["none", "key_padding_bool", "key_padding_float", "bool_2d", "bool_3d_and_padding", "float_2d",
              "float_3d", "causal_bool", "causal_float", "causal_and_padding"]


@pytest.mark.parametrize("form", MASK_FORMS)
@pytest.mark.parametrize("method", ["exact", "blockwise"])
def test_self_attention_matches_torch_mha_on_every_mask_form(form, method, rng):
    mha, ours = _pair(rng)
    x = torch.randn(B, L, E, generator=rng, dtype=F64)
    kw = _masks(form, rng)
    ref, _ = mha(x, x, x, need_weights=False, **kw)
    out, weights = ours(x, x, x, need_weights=False, method=method, block_size=4, **kw)
    assert weights is None and out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-12, rtol=0), float((out - ref).abs().max())
    assert ours.last_certificate.method == "exact"


@pytest.mark.parametrize("form", ["none", "key_padding_bool", "float_2d", "bool_3d_and_padding"])
def test_cross_attention_with_kdim_vdim_bias_kv_zero_attn_matches_torch(form, rng):
    s = 13
    mha, ours = _pair(rng, kdim=5, vdim=3, add_bias_kv=True, add_zero_attn=True)
    assert set(ours.state_dict()) == set(mha.state_dict())
    x = torch.randn(B, L, E, generator=rng, dtype=F64)
    key = torch.randn(B, s, 5, generator=rng, dtype=F64)
    value = torch.randn(B, s, 3, generator=rng, dtype=F64)
    kw = _masks(form, rng, s=s)
    ref, _ = mha(x, key, value, need_weights=False, **kw)
    out, _ = ours(x, key, value, need_weights=False, **kw)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("layout", ["batch_first", "seq_first", "unbatched"])
def test_layouts_match_torch(layout, rng):
    torch.manual_seed(3)
    first = layout != "seq_first"
    mha = torch.nn.MultiheadAttention(E, H, batch_first=first).double()
    ours = Attention(E, H, batch_first=first).double()
    ours.load_state_dict(mha.state_dict())
    shape = {"batch_first": (B, L, E), "seq_first": (L, B, E), "unbatched": (L, E)}[layout]
    x = torch.randn(*shape, generator=rng, dtype=F64)
    kpm = torch.zeros(L, dtype=torch.bool) if layout == "unbatched" else torch.zeros(B, L, dtype=torch.bool)
    kpm[..., -2:] = True
    ref, _ = mha(x, x, x, key_padding_mask=kpm, need_weights=False)
    out, _ = ours(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-12, rtol=0)


def _identity_out_proj(m):
    with torch.no_grad():
        m.out_proj.weight.copy_(torch.eye(E, dtype=F64))
        m.out_proj.bias.zero_()


@pytest.mark.parametrize("form", ["none", "key_padding_bool", "causal_bool", "causal_float", "causal_and_padding",
                                  "padding_like_2d", "cross"])
def test_approximate_method_error_lies_within_the_certificate(form, rng):
    """With out_proj = identity the module's output is the attention output the certificate bounds."""
    mha, ours = _pair(rng)
    _identity_out_proj(mha)
    _identity_out_proj(ours)
    x = torch.randn(B, L, E, generator=rng, dtype=F64) * 0.5
    key = value = x
    if form == "cross":
        key = value = torch.randn(B, 19, E, generator=rng, dtype=F64) * 0.5
        kw = {}
    elif form == "padding_like_2d":  # an (L, S) bool mask whose rows are equal: a key mask in disguise
        m = torch.zeros(L, L, dtype=torch.bool)
        m[:, [2, 7]] = True
        kw = {"attn_mask": m}
    else:
        kw = _masks(form, rng)
    ref, _ = mha(x, key, value, need_weights=False, **kw)
    out, _ = ours(x, key, value, need_weights=False, method="polynomial", eps=1e-5, **kw)
    cert = ours.last_certificate
    assert cert.method == "polynomial" and cert.output_error_bound <= 1e-5
    err = float((out - ref).detach().abs().max())
    assert 0 < err <= cert.output_error_bound


def test_module_is_causal_applies_the_causal_mask(rng):
    mha, ours = _pair(rng)
    ours.is_causal = True
    x = torch.randn(B, L, E, generator=rng, dtype=F64)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    ref, _ = mha(x, x, x, attn_mask=causal, need_weights=False)
    assert torch.allclose(ours(x, x, x, need_weights=False)[0], ref, atol=1e-12, rtol=0)
    # is_causal without the mask is accepted (torch insists on both)
    ours.is_causal = False
    assert torch.allclose(ours(x, x, x, need_weights=False, is_causal=True)[0], ref, atol=1e-12, rtol=0)


def test_general_masks_need_an_exact_method(rng):
    _, ours = _pair(rng)
    x = torch.randn(B, L, E, generator=rng, dtype=F64) * 0.3
    kw = _masks("bool_2d", rng)
    with pytest.raises(ValueError, match="attn_mask"):
        ours(x, x, x, need_weights=False, method="polynomial", eps=1e-3, **kw)
    ours(x, x, x, need_weights=False, method="auto", eps=1e-3, **kw)
    assert ours.last_certificate.method == "exact"


def test_wrong_causal_hint_raises(rng):
    _, ours = _pair(rng)
    x = torch.randn(B, L, E, generator=rng, dtype=F64)
    with pytest.raises(ValueError, match="is_causal=True is a hint"):
        ours(x, x, x, attn_mask=torch.ones(L, L, dtype=torch.bool).triu(2), is_causal=True, need_weights=False)


def test_need_weights_returns_none_and_warns_once(rng):
    _, ours = _pair(rng)
    x = torch.randn(B, L, E, generator=rng, dtype=F64)
    with pytest.warns(UserWarning, match="never forms attention weights"):
        out, w = ours(x, x, x)
    assert w is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(x, x, x)  # once per module
        Attention(E, H).double()(x, x, x, need_weights=False)


def test_fully_masked_rows_are_zero_before_out_proj(rng):
    _, ours = _pair(rng)
    _identity_out_proj(ours)
    x = torch.randn(B, L, E, generator=rng, dtype=F64)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1] = True
    out, _ = ours(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert torch.equal(out[1], torch.zeros(L, E, dtype=F64)) and float(out[0].detach().abs().max()) > 0


def test_dropout_runs_only_in_eval(rng):
    torch.manual_seed(1)
    mha = torch.nn.MultiheadAttention(E, H, dropout=0.1, batch_first=True).double().eval()
    ours = Attention(E, H, dropout=0.1).double()
    ours.load_state_dict(mha.state_dict())
    x = torch.randn(B, L, E, generator=rng, dtype=F64)
    with pytest.raises(ValueError, match="dropout=0.1"):
        ours(x, x, x, need_weights=False)
    ours.eval()
    assert torch.allclose(ours(x, x, x, need_weights=False)[0], mha(x, x, x, need_weights=False)[0], atol=1e-12)


def test_state_dict_matches_torch_both_ways():
    for kw in ({}, {"bias": False}, {"kdim": 6, "vdim": 2}, {"add_bias_kv": True}):
        mha = torch.nn.MultiheadAttention(8, 2, batch_first=True, **kw)
        ours = Attention(8, 2, **kw)
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in mha.state_dict().items()}
        mha.load_state_dict(ours.state_dict())


def test_certificate_bounds_every_head(rng):
    m = Attention(16, 2, method="polynomial", eps=1e-4).double()
    x = torch.randn(2, 40, 16, generator=rng, dtype=torch.float64) * 0.3
    out, _ = m(x, x, x, need_weights=False)
    cert = m.last_certificate
    assert cert.method == "polynomial" and cert.output_error_bound <= 1e-4
    exact, _ = m(x, x, x, need_weights=False, method="exact")
    # the certificate bounds the attention output; the output projection scales it by ‖W_O‖∞
    with torch.no_grad():
        assert float((out - exact).abs().max()) <= cert.output_error_bound * float(m.out_proj.weight.abs().sum(1).max())


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="num_heads=3 must divide embed_dim=16"):
        Attention(16, 3)
    with pytest.raises(ValueError, match="embed_dim"):
        Attention(0, 1)
    with pytest.raises(ValueError, match="kdim"):
        Attention(16, 2, kdim=0)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="query must have shape \\(batch, seq, feature\\) with feature = 16"):
        Attention(16, 2)(torch.randn(2, 5, 8), x, x)
    with pytest.raises(ValueError, match="key_padding_mask must have shape \\(batch, S\\) = \\(2, 5\\)"):
        Attention(16, 2)(x, x, x, need_weights=False, key_padding_mask=torch.zeros(5, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must have shape \\(L, S\\) = \\(5, 5\\)"):
        Attention(16, 2)(x, x, x, need_weights=False, attn_mask=torch.zeros(2, 5, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        Attention(16, 2)(x, x, x, need_weights=False, attn_mask=torch.zeros(5, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="missing"):
        Attention(16, 2)(x)
    with pytest.raises(ValueError, match="num_layers"):
        Transformer(0, 16, 2)


@pytest.mark.parametrize("method,kw", [("exact", {}), ("polynomial", {"eps": 1e-3}), ("taylor", {"eps": 1e-2})])
def test_transformer_gradients_through_every_method(method, kw, rng):
    torch.manual_seed(0)  # the initial weights set the radius, hence the Taylor order and its memory: fix them
    model = Transformer(2, 16, 2, method=method, **kw).double()
    with torch.no_grad():  # LayerNorm fixes the input scale: keep the radius small through W_Q, W_K instead
        for blk in model.blocks:
            blk.attn.in_proj_weight.mul_(0.25)
    x = torch.randn(2, 12, 16, generator=rng, dtype=torch.float64) * 0.2
    model(x).square().sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().max()) > 0 for g in grads)
    assert [c.method for c in model.last_certificates] == [method] * 2


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
