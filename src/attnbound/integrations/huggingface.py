"""Run every attention layer of a Hugging Face transformers model through attnbound.

::

    from attnbound.integrations.huggingface import register
    log = register("attnbound", method="auto", eps=1e-3)
    model = AutoModel.from_pretrained(path, attn_implementation="attnbound")
    model(**batch)
    log.records          # one HeadRecord per (layer, head) and forward call: the last log.keep of them
    log.worst_bound()    # the largest certified ‖out − exact‖∞ of any head, over every call

:func:`register` adds an attention function to transformers' ``AttentionInterface`` (and the
boolean-mask builder to ``AttentionMaskInterface``, so the model hands it SDPA-style masks).
The function follows the interface's contract (transformers ≥ 4.53): it is called as
``fn(module, query, key, value, attention_mask, dropout=..., scaling=..., **kwargs)`` with
tensors ``(batch, heads, n, head_dim)`` and returns ``(output, None)`` with output
``(batch, n_q, heads, head_dim)``, like ``sdpa_attention_forward``.

Exact methods take all heads of a layer in one :func:`attnbound.attention` call (grouped-query heads by
broadcasting), whose certificate covers every head; so does ``auto`` when it is decided, before anything
runs, that no head could take an approximation (``attnbound.pipeline.auto_runs_exact``: a lower bound on
every variant's radius at which every feature run faster than exact misses eps — every head of a model
outside the bounded regime). Otherwise (and with grouped-query heads or a declared ``bound``) ``auto``,
like the fixed approximate methods, makes each head its own call, so each head gets its own radius,
degree and certificate (a model-wide radius would be the largest head's). Boolean masks whose rows
are all equal are passed on as key-padding masks, which the approximate methods accept; a
causal-plus-padding mask becomes ``is_causal`` plus key padding. Any other mask runs exact
under ``method="auto"`` and raises for a fixed approximate method.

Generation: ``model.generate()`` works through the backend with transformers' own KV cache. At
each cached step transformers calls the function with one new query per sequence against every
cached key (``n_q = 1``; the mask is ``None`` or a key-padding mask, e.g. for left-padded batches),
so every step is one certified :func:`attnbound.attention` call per head and appends its records
to the log like any other call. The certificate then bounds that step's attention output against
exact attention over the same cache; it says nothing about how errors of earlier steps moved the
cache itself. For a constant-size certified state instead of the KV cache, see
:mod:`attnbound.integrations.hf_decoding` (a transformers ``Cache`` of
:class:`attnbound.decoding.DecodingState` s, used through ``generate(past_key_values=...)``).

Cost: that of :func:`attnbound.attention` over the layer's heads, plus one O(batch·heads·n·d) pass for
the per-head statistics each record carries (B, R, value range).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

import torch

from .. import validation as val
from ..api import attention, run_call
from ..certificate import Certificate
from ..eager import eager_only
from ..pipeline import Options, auto_runs_exact
from ..stats import key_participation, row_norms

EXACT = val.EXACT_METHODS
OPTION_NAMES = {f.name for f in fields(Options)}


@dataclass(frozen=True)
class HeadRecord:
    """One head of one attention call.

    ``max_entry`` is B = max |entry| of the head's queries and taking-part keys;
    ``radius`` is R = s·max‖q‖·max‖k‖ over the same (the data radius the certificate uses);
    ``n_k`` counts the keys of the longest unpadded sequence in the batch.
    """

    layer: int
    head: int
    n_q: int
    n_k: int
    scale: float
    max_entry: float
    radius: float
    value_range: float
    max_abs_value: float
    certificate: Certificate

    def as_dict(self) -> dict:
        out = asdict(self)
        out["certificate"] = self.certificate.as_dict()
        return out


DEFAULT_KEEP = 4096  # head records a log keeps (the summaries cover every call)


@dataclass
class CertificateLog:
    """What every attention call made through one registered backend certified.

    ``records`` holds the :class:`HeadRecord` s of the last ``keep`` head-calls only (a server or a long
    ``generate()`` must not grow without bound); the summaries — :attr:`head_calls`, :meth:`methods`,
    :meth:`worst_bound`, :attr:`radius_range`, :attr:`max_entry` — cover every call since the last
    :meth:`clear`. Memory: O(keep) records, whatever the number of calls.
    """

    name: str
    method: str
    eps: float | None
    keep: int = DEFAULT_KEEP
    records: list[HeadRecord] = field(default_factory=list)
    head_calls: int = 0
    counts: dict = field(default_factory=dict)
    worst: float = 0.0
    radius_range: tuple[float, float] | None = None  # (smallest, largest) data radius R seen
    max_entry: float = 0.0  # the largest |entry| of any head's queries and keys
    _layers: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 0:
            raise ValueError(f"keep must be a non-negative int, got {self.keep!r}")
        self._trim()

    def _trim(self) -> None:
        if len(self.records) > self.keep:
            del self.records[:len(self.records) - self.keep]

    def add(self, records: list[HeadRecord]) -> None:
        """Record one call's heads (all of them or, when the caller raised, none)."""
        for r in records:
            b = r.certificate.output_error_bound
            self.head_calls += 1
            self.counts[r.certificate.method] = self.counts.get(r.certificate.method, 0) + 1
            self.worst = max(self.worst, b)
            lo, hi = self.radius_range or (r.radius, r.radius)
            self.radius_range = (min(lo, r.radius), max(hi, r.radius))
            self.max_entry = max(self.max_entry, r.max_entry)
        self.records.extend(records)
        self._trim()

    def clear(self) -> None:
        self.records.clear()
        self.head_calls, self.counts, self.worst, self.radius_range, self.max_entry = 0, {}, 0.0, None, 0.0

    def worst_bound(self) -> float:
        """The largest certified output error of any head-call since the last clear (0 when all ran exact
        with a zero bound, or none ran)."""
        return self.worst

    def methods(self) -> dict[str, int]:
        """How many head-calls ran each method since the last clear."""
        return dict(self.counts)

    def layer_of(self, module) -> int:
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int):
            return idx
        return self._layers.setdefault(id(module), len(self._layers))


def _as_bool_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """A float mask holding only 0 and very negative values as a bool mask, else None."""
    if mask.dtype == torch.bool:
        return mask
    low = torch.finfo(mask.dtype).min / 2
    taking = mask == 0
    if bool((taking | (mask <= low)).all()):
        return taking
    return None


def split_mask(mask: torch.Tensor | None, n_q: int, n_k: int):
    """Write an attention mask ``(B, 1|H, n_q, n_k)`` as ``(key_padding, is_causal)`` if it is one.

    Returns ``(key_padding (B, 1|H, 1, n_k) or None, is_causal)``, or ``None`` when the mask is
    neither key padding nor causal-plus-key-padding.
    """
    if mask is None:
        return None, False
    bm = _as_bool_mask(mask)
    if bm is None or bm.dim() < 2:
        return None
    if bool((bm == bm[..., :1, :]).all()):
        return bm[..., :1, :], False
    if n_q == n_k:
        keys = bm[..., -1:, :]  # the last query of a causal mask sees every unpadded key
        tril = torch.ones(n_q, n_k, dtype=torch.bool, device=bm.device).tril()
        if bool((bm == (tril & keys)).all()):
            return keys, True
    return None


def _head_stats(query, key, value, key_pad, scale: float) -> list[tuple[float, float, float, float]]:
    """(max_entry, radius, value_range, max_abs_value) of each query head, from one batched pass over each
    tensor: the quantities :func:`attnbound.stats.input_stats` takes of one head's q, k, v (keys masked out
    by ``key_pad`` (B, 1|H_kv, 1, n_k) excluded), with the same rounded-up norms."""
    with torch.no_grad():
        n_heads, n_kv = query.shape[1], key.shape[1]
        if key_pad is not None and key_pad.shape[1] not in (1, n_kv):  # a key mask per query head (GQA)
            idx = torch.arange(n_heads, device=key.device) // (n_heads // n_kv)
            key, value, n_kv = key[:, idx], value[:, idx], n_heads
        keep = None
        if key_pad is not None:
            keep = key_pad[..., 0, -key.shape[-2]:].expand(key.shape[0], n_kv, key.shape[-2])  # (B, H_kv, n_k)
        # reductions one dim at a time, innermost first: torch's multi-dim reductions over (0, 2) are far slower
        qn = row_norms(query).amax(-1).amax(0)  # (H,)
        kn = row_norms(key)
        qd = query.detach()
        q_abs = torch.maximum(-qd.amin(-1).amin(-1).amin(0), qd.amax(-1).amax(-1).amax(0)).double()
        kd, vd = key.detach(), value.detach()
        if keep is not None:
            kn = torch.where(keep, kn, torch.zeros((), dtype=kn.dtype))
            kd = torch.where(keep.unsqueeze(-1), kd, torch.zeros((), dtype=kd.dtype))
            inf = torch.tensor(math.inf, dtype=vd.dtype)
            hi = torch.where(keep.unsqueeze(-1), vd, -inf).amax(-2).double()
            lo = torch.where(keep.unsqueeze(-1), vd, inf).amin(-2).double()
        else:
            hi, lo = vd.amax(-2).double(), vd.amin(-2).double()
        kn = kn.amax(-1).amax(0)
        k_abs = torch.maximum(-kd.amin(-1).amin(-1).amin(0), kd.amax(-1).amax(-1).amax(0)).double()
        return _per_head(qn, kn, q_abs, k_abs, hi, lo, n_heads // n_kv, scale)


def _per_head(qn, kn, q_abs, k_abs, hi, lo, group: int, scale: float) -> list[tuple[float, float, float, float]]:
    """The records' (max_entry, radius, value_range, max_abs_value) per query head from per-head maxima of the
    row norms and entries (q: (H,), k: (H_kv,)) and the value extremes (B, H_kv, d_v) over the keys that take
    part, value ranges taken within each batch entry (±inf extremes: a column no key takes part in, range 0)."""
    seen = torch.isfinite(hi) & torch.isfinite(lo)
    spread = torch.where(seen, hi - lo, torch.zeros_like(hi)).amax(-1).amax(0)
    vmax = torch.where(seen, torch.maximum(hi.abs(), lo.abs()), torch.zeros_like(hi)).amax(-1).amax(0)
    cols = [x.tolist() for x in (qn, kn, q_abs, k_abs, spread, vmax)]
    return [(max(cols[2][h], cols[3][h // group]), scale * cols[0][h] * cols[1][h // group],
             cols[4][h // group], cols[5][h // group]) for h in range(len(cols[0]))]


def _head_stats_of(call, scale: float) -> list[tuple[float, float, float, float]]:
    """:func:`_head_stats` from the statistics one all-heads call already took (q, k, v: (B, H, n, ·), no
    grouped-query heads): its row norms (hidden keys at 0), its value extremes per (batch entry, head, column)
    over the keys that take part, and max|q|, max|k| per head (over the keys that take part)."""
    with torch.no_grad():
        qn, kn = call.stats.rows
        hi, lo = call.stats.columns
        q, k = call.q.detach(), call.k.detach()
        if hi.dim() < 3 or qn.dim() < 3 or kn.dim() < 3:  # a batch that broadcast away the head dim
            return None
        qn, kn = qn.amax(-1).amax(0), kn.amax(-1).amax(0)
        q_abs = torch.maximum(-q.amin(-1).amin(-1).amin(0), q.amax(-1).amax(-1).amax(0)).double()
        k_row = torch.maximum(-k.amin(-1), k.amax(-1))  # (B, H, n_k): max |k_jc| of each key
        keys = call.key_mask if call.key_mask is not None else key_participation(call.attn_mask)
        if keys is not None:  # hidden keys (kept as given when their logits are safe) take no part
            k_row = torch.where(keys.expand(k_row.shape), k_row, torch.zeros((), dtype=k_row.dtype))
        k_abs = k_row.amax(-1).amax(0).double()
        return _per_head(qn, kn, q_abs, k_abs, hi, lo, 1, scale)


def _forward_only(cert: Certificate) -> Certificate:
    """The certificate without its gradient slot: a log keeps thousands of records, and a slot keeps its call's
    tensors alive (gradient certificates are read from :func:`attnbound.attention` or the nn modules)."""
    return replace(cert) if "_gradient_slot" in cert.__dict__ else cert


def make_attention_function(log: CertificateLog, *, method: str = "auto", eps: float | None = 1e-3,
                            **options):
    """The function :func:`register` installs; ``options`` go to :func:`attnbound.attention`."""

    @eager_only
    def attnbound_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                    scaling: float | None = None, is_causal: bool | None = None, **kwargs):
        if dropout:
            raise ValueError(f"dropout={dropout}: the attnbound backend computes attention without dropout; "
                             "call model.eval() (or use attn_implementation='sdpa' for training with dropout)")
        for unsupported in ("softcap", "position_bias", "sliding_window", "s_aux"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(f"{unsupported}: not supported by the attnbound backend")
        n_heads, n_kv = query.shape[1], key.shape[1]
        group = n_heads // n_kv  # grouped-query attention: query head h reads key/value head h // group
        n_q, n_k = query.shape[2], key.shape[2]
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
        causal = causal and n_q > 1 and attention_mask is None
        scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        split = split_mask(attention_mask, n_q, n_k)
        longest = n_k
        if split is None:
            if method not in EXACT + ("auto",):
                raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} is neither key padding nor "
                                 f"causal plus key padding; method={method!r} cannot take it (use 'auto' or 'exact')")
            head_mask, head_causal, key_pad = attention_mask, causal, None
        else:
            key_pad, mask_causal = split
            head_mask, head_causal = key_pad, causal or mask_causal
            if key_pad is not None:
                longest = int(key_pad[..., 0, -n_k:].sum(-1).max())
        common = dict(scale=scale, is_causal=head_causal, method=method, eps=eps, return_certificate=True, **options)
        out = cert = None
        batched = method in EXACT
        if method == "auto" and group == 1 and options.get("bound") is None:  # decided before anything runs
            batched = auto_runs_exact(query, key, value, head_mask,
                                      Options(method="auto", eps=eps, scale=scale, is_causal=head_causal,
                                              **{k: v for k, v in options.items() if k in OPTION_NAMES}),
                                      heads_dim=1)
        stats = None
        if batched:  # all heads in one call: exact methods, and auto where it can only run exact
            exact_opts = {k: v for k, v in options.items() if k in ("block_size", "memory_budget")}
            kw = dict(scale=scale, is_causal=head_causal, method=method if method in EXACT else "exact", eps=eps,
                      **(options if method in EXACT else exact_opts))
            if group > 1:
                out, cert = attention(query, key, value, attn_mask=head_mask, enable_gqa=True,
                                      return_certificate=True, **kw)
            else:  # the call's own statistics give the head records (no second pass)
                out, cert, call = run_call(query, key, value, head_mask, Options(**kw))
                stats = _head_stats_of(call, scale) if call is not None else None
        if out is not None:
            certs = [cert] * n_heads  # one rounding bound covering every head of the call
        else:
            outs, certs = [], []
            for h in range(n_heads):
                m = head_mask
                if m is not None and m.dim() == 4:
                    m = m[:, h if m.shape[1] > 1 else 0]
                o, c = attention(query[:, h], key[:, h // group], value[:, h // group], attn_mask=m, **common)
                outs.append(o)
                certs.append(c)
            out = torch.stack(outs, dim=1)
        if stats is None:
            stats = _head_stats(query, key, value, key_pad, scale)
        layer = log.layer_of(module)  # after every head ran: a refused call numbers no layer
        records = [HeadRecord(layer=layer, head=h, n_q=n_q, n_k=longest, scale=scale, max_entry=b, radius=r,
                              value_range=vr, max_abs_value=mv, certificate=_forward_only(certs[h]))
                   for h, (b, r, vr, mv) in enumerate(stats)]
        out = out.transpose(1, 2).contiguous()
        log.add(records)  # every head computed: commit
        return out, None

    return attnbound_attention_forward


def register(name: str = "attnbound", *, method: str = "auto", eps: float | None = 1e-3, keep: int = DEFAULT_KEEP,
             **options) -> CertificateLog:
    """Register attnbound as the transformers attention implementation ``name``.

    Args:
        name: the ``attn_implementation`` to use in ``from_pretrained`` or
            ``model.set_attn_implementation``. Registering a name again replaces it.
        method, eps, options: as in :func:`attnbound.attention` (``bound``, ``degree``,
            ``order``, ``memory_budget``, ``block_size``, ``cost_model``).
        keep: how many head records the log keeps (the last ones; its summaries cover every call).

    Returns:
        the :class:`CertificateLog` every call through ``name`` appends to.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("attnbound's Hugging Face backend needs transformers>=4.53: "
                          "pip install 'attnbound[hf]'") from err
    if not isinstance(name, str) or not name or name in ("sdpa", "eager") or name.startswith("flash"):
        raise ValueError(f"name must be a new implementation name, got {name!r}")
    val.check_choice("method", method, val.METHODS)
    log = CertificateLog(name=name, method=method, eps=eps, keep=keep)
    AttentionInterface.register(name, make_attention_function(log, method=method, eps=eps, **options))
    AttentionMaskInterface.register(name, sdpa_mask)
    return log
