"""``generate()`` with a constant-size certified decoding state per layer instead of a KV cache.

::

    from attnbound.integrations.hf_decoding import register_decoding
    backend = register_decoding("attnbound-decoding", method="auto", eps=1e-3)
    model.set_attn_implementation("attnbound-decoding")
    cache = backend.cache(bound=0.5, value_bound=4.0)     # declared bounds: see DecodingState
    model.generate(**batch, past_key_values=cache)
    backend.log.records                                  # the last steps' certificates (log.keep of them)

:class:`DecodingCache` is a transformers ``Cache`` whose layers hold one
:class:`attnbound.decoding.DecodingState` each (batch shape ``(batch, kv_heads, 1)``: query heads of a
group broadcast against their key/value head, never copied). Its ``update`` hands the new keys and
values to the attention function registered by :func:`register_decoding`, which answers the new
queries with :meth:`DecodingState.step` (causal among the new tokens, every earlier token through
the state): a KV cache while it is smaller than the state, then the O(r·d_v) state. Every call
appends one :class:`~attnbound.integrations.huggingface.HeadRecord` per query head with the step's
certificate (one certificate covers every head of the layer: its value range is the largest).
The certificate bounds each step's attention output against exact attention over the keys and
values this layer has been given; how earlier steps' errors moved those keys is not covered.

The radius is declared up front (``bound``, ``norms`` or ``radius``, as for ``DecodingState``) and
a query or key that breaks it raises ``ValueError``. Unpadded batches only: an attention mask
that hides a key raises (the state cannot drop a key once added). Calls made without this cache
(no ``past_key_values``, or another cache) go to the ordinary backend of
:mod:`attnbound.integrations.huggingface`. Beam search reorders each layer's state per sequence
(:meth:`attnbound.DecodingState.reorder`); cropping is not supported.
"""

from __future__ import annotations

import torch

from .. import validation as val
from ..decoding import DecodingState
from ..eager import eager_only
from .huggingface import DEFAULT_KEEP, CertificateLog, HeadRecord, make_attention_function

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("attnbound's Hugging Face decoding cache needs transformers>=5: "
                      "pip install 'attnbound[hf]'") from err


class DecodingLayer(CacheLayerMixin):
    """One layer's :class:`DecodingState` (made at the layer's first attention call, which knows the scale)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, options: dict | None = None):
        super().__init__()
        self.options = dict(options or {})
        self.state: DecodingState | None = None
        self.pending = None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending is not None:
            raise RuntimeError("DecodingCache: new keys arrived before the previous ones were attended to; "
                               "use the attention implementation returned by register_decoding")
        self.pending = (key_states, value_states)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.state.n if self.state is not None else 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.pending = None, None

    def reorder_cache(self, beam_idx) -> None:
        """Beam search: keep sequences ``beam_idx`` (the state and any pending keys are indexed per sequence)."""
        if self.state is not None:
            self.state.reorder(beam_idx)
        if self.pending is not None:
            self.pending = tuple(x.index_select(0, beam_idx.to(x.device)) for x in self.pending)

    def offload(self):  # the state is small: nothing to offload
        return None

    def prefetch(self):
        return None


class DecodingCache(Cache):
    """A ``Cache`` of :class:`DecodingLayer` s; ``state_options`` go to every layer's DecodingState."""

    def __init__(self, backend: DecodingBackend, **state_options):
        super().__init__(layers=[])
        self.backend = backend
        self.state_options = state_options

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(DecodingLayer(self.state_options))
        self.backend.active = self
        return self.layers[layer_idx].update(key_states, value_states)

    @property
    def nbytes(self) -> int:
        """Bytes held by every layer's state or cache."""
        return sum(layer.state.nbytes for layer in self.layers if layer.state is not None)


def _unmasked(mask, t: int) -> bool:
    """Whether an attention mask hides nothing beyond causality among the t new tokens."""
    if mask is None:
        return True
    keep = mask if mask.dtype == torch.bool else mask == 0
    if keep.shape[-2] == 1 or t == 1:
        return bool(keep.all())
    new = keep[..., -t:]
    tril = torch.ones(t, t, dtype=torch.bool, device=keep.device).tril()
    return bool(keep[..., :-t].all()) and bool((new == tril).all())


class DecodingBackend:
    """What :func:`register_decoding` returns: the log, and :meth:`cache` to make a decoding cache."""

    def __init__(self, name: str, method: str, eps: float | None, options: dict, keep: int = DEFAULT_KEEP):
        self.log = CertificateLog(name=name, method=method, eps=eps, keep=keep)
        self.method, self.eps = method, eps
        self.fallback = make_attention_function(self.log, method=method, eps=eps, **options)
        self.active: DecodingCache | None = None

    def cache(self, **state_options) -> DecodingCache:
        """A fresh :class:`DecodingCache`; ``state_options``: bound/norms/radius, value_bound, degree,
        keep_cache (method and eps are the backend's)."""
        method = "exact" if self.method in val.EXACT_METHODS else self.method
        return DecodingCache(self, method=method, eps=self.eps, **state_options)

    @eager_only
    def __call__(self, module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                 is_causal=None, **kwargs):
        cache, idx = self.active, getattr(module, "layer_idx", None)
        layer = cache.layers[idx] if cache is not None and isinstance(idx, int) and idx < len(cache.layers) else None
        if layer is None or layer.pending is None or layer.pending[0] is not key:
            return self.fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                 is_causal=is_causal, **kwargs)
        try:
            return self._step(layer, module, query, key, value, attention_mask, dropout, scaling)
        finally:  # answered, or refused: either way these keys are done with (refused, they never entered the state)
            layer.pending = None

    def _step(self, layer: DecodingLayer, module, query, key, value, attention_mask, dropout, scaling):
        """One step of one layer: compute with the layer's state, then commit (a refusal changes nothing)."""
        if dropout:
            raise ValueError(f"dropout={dropout}: the attnbound backend computes attention without dropout")
        b, h, t, d = query.shape
        h_kv, d_v = key.shape[1], value.shape[-1]
        if h % h_kv:
            raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({h_kv})")
        if not _unmasked(attention_mask, t):
            raise ValueError("attention_mask: DecodingCache supports unpadded batches only (a key, once in the "
                             "state, cannot be masked out); use the ordinary KV cache for padded batches")
        st = layer.state or DecodingState(d, d_v, scale=scaling, batch_shape=(b, h_kv, 1), dtype=query.dtype,
                                          device=query.device, **layer.options)
        out, cert = st.step(query.reshape(b, h_kv, h // h_kv, t, d), key.unsqueeze(2), value.unsqueeze(2))
        entry = float(max(query.detach().abs().max(), key.detach().abs().max()))
        records = [HeadRecord(layer=self.log.layer_of(module), head=head, n_q=t, n_k=st.n, scale=st.scale,
                              max_entry=entry, radius=cert.radius if cert.radius is not None else (st.radius or 0.0),
                              value_range=cert.value_range, max_abs_value=cert.max_abs_value, certificate=cert)
                   for head in range(h)]
        layer.state = st  # commit: the state (its step is atomic) and the log
        self.log.add(records)
        return out.reshape(b, h, t, d_v).transpose(1, 2).contiguous(), None


def register_decoding(name: str = "attnbound-decoding", *, method: str = "auto", eps: float | None = 1e-3,
                      keep: int = DEFAULT_KEEP, **options) -> DecodingBackend:
    """Register ``name`` as a transformers attention implementation that decodes with :class:`DecodingCache`.

    ``method``/``eps`` are those of the states (and of the ordinary backend used for calls without
    the cache); ``options`` go to the ordinary backend; ``keep``: the head records its log keeps (the last
    ones; the summaries cover every call). Returns the :class:`DecodingBackend`.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if not isinstance(name, str) or not name or name in ("sdpa", "eager") or name.startswith("flash"):
        raise ValueError(f"name must be a new implementation name, got {name!r}")
    val.check_choice("method", method, val.METHODS)
    backend = DecodingBackend(name, method, eps, options, keep)
    AttentionInterface.register(name, backend)
    AttentionMaskInterface.register(name, sdpa_mask)
    return backend
