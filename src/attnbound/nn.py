"""Multi-head attention and a pre-norm transformer whose attention is any attnbound method.

:class:`Attention` is a drop-in for ``torch.nn.MultiheadAttention(batch_first=True)``: the same
constructor arguments, parameters and state dict (``in_proj_weight``/``in_proj_bias``, or
``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when ``kdim``/``vdim`` differ from
``embed_dim``; ``bias_k``/``bias_v``; ``out_proj.*``), the same ``forward`` signature and mask
conventions, and an ``(output, None)`` return: attention weights are never formed, so none are
returned. All heads of a call go through one :func:`attnbound.attention` call, whose certificate
is kept in ``last_certificate``.

Cost per call with E = embed_dim, H heads of dim d_h = E/H, n_q queries and n_k keys: the
projections, Θ(n_q·E² + n_k·E·(kdim + vdim)) operations, plus the attention method per head
(exact: Θ(n_q·n_k·d_h); polynomial/Taylor of degree g: Θ((n_q + n_k)·C(d_h+g, g)·d_h)). Seed 002
(Saha, Xu, Ye, Yu) shows that the L·H heads of a transformer cannot share work in general:
L·H·n^{2−o(1)} time overall (conditional on SETH, worst case).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .api import attention
from .certificate import Certificate

_EXACT = ("exact", "dense", "blockwise")


def _keep_or_additive(mask: torch.Tensor | None, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """An MHA-convention mask (bool: True = masked out; float: added to the logits) in attnbound's
    convention: bool True = takes part, or an additive float mask. Float masks holding only 0 and −inf
    become bool masks (so key padding given as floats still reaches the approximate methods)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return ~mask
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be bool (True = masked out) or floating (added to the logits), got {mask.dtype}")
    if bool(((mask == 0) | torch.isneginf(mask)).all()):
        return mask == 0
    return mask.to(dtype)


def _combine(a: torch.Tensor | None, b: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if a is None or b is None:
        return a if b is None else b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b

    def additive(m):
        if m.dtype != torch.bool:
            return m
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, float("-inf"))

    return additive(a) + additive(b)


def _is_causal_keep(keep: torch.Tensor, n_q: int, n_k: int) -> bool:
    if keep.dtype != torch.bool or keep.shape[-2:] != (n_q, n_k):
        return False
    tril = torch.ones(n_q, n_k, dtype=torch.bool, device=keep.device).tril()
    return bool((keep == tril).all())


def _key_padding_keep(key_padding_mask, B: int, S: int, dtype: torch.dtype, unbatched: bool) -> torch.Tensor | None:
    """Mask translation, step 1: ``key_padding_mask`` (already batched) in attnbound's convention,
    shape-checked against (B, S) and viewed as (B, 1, 1, S); None when not given."""
    kpm = _keep_or_additive(key_padding_mask, "key_padding_mask", dtype)
    if kpm is None:
        return None
    if kpm.shape != (B, S):
        want = f"({S},)" if unbatched else f"(batch, S) = ({B}, {S})"
        raise ValueError(f"key_padding_mask must have shape {want}, got {tuple(key_padding_mask.shape)}")
    return kpm.view(B, 1, 1, S)


def _attn_mask_keep(attn_mask, B: int, H: int, L: int, S: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Mask translation, step 2: ``attn_mask`` in attnbound's convention, shape-checked; (L, S) stays
    (L, S) and (B·H, L, S) becomes (B, H, L, S). None when not given."""
    am = _keep_or_additive(attn_mask, "attn_mask", dtype)
    if am is None or (am.dim() == 2 and am.shape == (L, S)):
        return am
    if am.dim() == 3 and am.shape == (B * H, L, S):
        return am.view(B, H, L, S)
    raise ValueError(f"attn_mask must have shape (L, S) = ({L}, {S}) or (batch·num_heads, L, S) = "
                     f"({B * H}, {L}, {S}), got {tuple(attn_mask.shape)}")


def _resolve_causal(am: torch.Tensor | None, causal: bool, hint: bool, L: int, S: int):
    """Mask translation, step 3: with the causal structure on (``causal``), an ``am`` that is exactly
    the causal mask is dropped (the structure itself is passed on, which every method accepts); any
    other ``am`` is an error when the per-call ``hint`` (torch's ``is_causal``) claimed it causal.
    Returns ``(am, causal)``."""
    if causal and am is not None:
        if _is_causal_keep(am, L, S):
            am = None
        elif hint:
            raise ValueError("is_causal=True is a hint that attn_mask is the causal mask (as in "
                             "torch.nn.MultiheadAttention), but attn_mask is not the causal mask; pass "
                             "is_causal=False to apply attn_mask as given")
    return am, causal


def _attention_mask(kpm: torch.Tensor | None, am: torch.Tensor | None, causal: bool, extra: int, L: int, S: int,
                    dtype: torch.dtype, device) -> tuple[torch.Tensor | None, bool]:
    """Mask translation, step 4: the ``(attn_mask, is_causal)`` pair passed to
    :func:`attnbound.attention`, from the translated masks of steps 1–3 and the ``extra`` keys
    (``bias_k``, ``add_zero_attn``) appended after the S sequence keys, which every query sees.
    An all-True bool mask becomes None; a bool mask whose rows are all equal becomes a key mask
    (..., 1, S + extra)."""
    mask = _combine(kpm, am, dtype)
    if extra:
        if causal:  # the extra keys sit after the sequence: the causal structure is now a mask
            tril = torch.ones(L, S, dtype=torch.bool, device=device).tril()
            mask = _combine(mask, tril, dtype)
            causal = False
        if mask is not None:
            mask = F.pad(mask, (0, extra), value=True if mask.dtype == torch.bool else 0.0)
    if mask is not None and mask.dtype == torch.bool:
        if bool(mask.all()):
            mask = None
        elif mask.shape[-2] > 1 and bool((mask == mask[..., :1, :]).all()):
            mask = mask[..., :1, :]  # padding-like: a key mask (..., 1, S)
    return mask, causal


class Attention(nn.Module):
    """Multi-head attention with a pluggable attnbound method; a drop-in for
    ``torch.nn.MultiheadAttention(embed_dim, num_heads, ..., batch_first=True)``.

    Args:
        embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, device, dtype:
            as in :class:`torch.nn.MultiheadAttention` (same parameters, so
            ``load_state_dict(mha.state_dict())`` works both ways). ``dropout`` acts on attention
            weights, which are never formed: a module with ``dropout > 0`` runs only in eval mode.
        batch_first: layout (batch, seq, feature) when True (the default here, unlike torch's
            MultiheadAttention); (seq, batch, feature) when False.
        method: any :func:`attnbound.attention` method (``"exact"``, ``"polynomial"``, ``"taylor"``,
            ``"auto"``, ...); overridable per call with ``forward(..., method=...)``.
        eps, bound: passed to the approximate methods (the certified max-abs error of the attention
            output before ``out_proj``, and a declared entry bound on the projected q, k).
        is_causal: apply the causal mask on every call (in addition to the per-call arguments).

    After each forward, ``last_certificate`` holds that call's :class:`~attnbound.Certificate`:
    one for all heads (its radius is the max over heads), bounding ‖attention output − exact‖∞
    before the output projection; after it the error is at most that bound times
    ‖W_out‖∞ (the largest absolute row sum of ``out_proj.weight``).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = True, device=None, dtype=None, *,
                 method: str = "exact", eps: float | None = None, bound: float | None = None,
                 is_causal: bool = False):
        super().__init__()
        for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads), ("kdim", kdim), ("vdim", vdim)):
            if val is None and name in ("kdim", "vdim"):
                continue
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if embed_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide embed_dim={embed_dim}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a float in [0, 1], got {dropout!r}")
        fk = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = float(dropout), bool(batch_first), bool(add_zero_attn)
        self.method, self.eps, self.bound, self.is_causal = method, eps, bound, is_causal
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **fk))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **fk))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **fk))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **fk))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **fk))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **fk))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **fk))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()
        self.last_certificate: Certificate | None = None
        self._warned_weights = False

    @property
    def last_gradient_certificate(self):
        """The :class:`~attnbound.GradientCertificate` of the backward through the last forward (None until a
        backward ran): max|dX − dX_exact| for the projected heads X = q, k, v. Through the input projections
        the weight gradients move by at most (Σ over rows of |input|)·that bound per entry."""
        cert = self.last_certificate
        return cert.gradient_certificate if cert is not None else None

    def _reset_parameters(self):
        """torch.nn.MultiheadAttention's initialisation."""
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        for b in (self.bias_k, self.bias_v):
            if b is not None:
                nn.init.xavier_normal_(b)

    def _project(self, query, key, value):
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.split(E)
        if self._qkv_same_embed_dim:
            if query is key and key is value:
                return F.linear(query, self.in_proj_weight, b).chunk(3, -1)
            wq, wk, wv = self.in_proj_weight.split(E)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _batch_first_inputs(self, query, key, value, key_padding_mask):
        """Checks query/key/value (types, then shapes) and brings them, and an unbatched
        ``key_padding_mask``, to the batched (batch, seq, feature) layout.

        Returns ``(query, key, value, key_padding_mask, unbatched)``."""
        for name, x in (("query", query), ("key", key), ("value", value)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        unbatched = query.dim() == 2
        dims = 2 if unbatched else 3
        layout = "(seq, feature)" if unbatched else ("(batch, seq, feature)" if self.batch_first
                                                      else "(seq, batch, feature)")
        for name, x, f in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if x.dim() != dims or x.shape[-1] != f:
                raise ValueError(f"{name} must have shape {layout} with feature = {f}, got {tuple(x.shape)} "
                                 f"(query sets the layout: {query.dim()}-D)")
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None and isinstance(key_padding_mask, torch.Tensor):
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, S = query.shape[0], key.shape[1]
        if key.shape[0] != B or value.shape[0] != B or value.shape[1] != S:
            raise ValueError(f"key and value must share query's batch ({B}) and one length S, got key "
                             f"{tuple(key.shape)} and value {tuple(value.shape)} in layout {layout}")
        return query, key, value, key_padding_mask, unbatched

    def _project_heads(self, query, key, value):
        """The input projections, the ``bias_k``/``bias_v`` key/value, the split into heads
        (B, H, seq, head_dim), and the ``add_zero_attn`` zero key/value."""
        B, H, hd = query.shape[0], self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)
        if self.bias_k is not None:  # one learned extra key/value that every query sees
            k = torch.cat([k, self.bias_k.expand(B, 1, -1)], 1)
            v = torch.cat([v, self.bias_v.expand(B, 1, -1)], 1)
        q, k, v = (t.reshape(B, -1, H, hd).transpose(1, 2) for t in (q, k, v))
        if self.add_zero_attn:  # one zero key/value per head that every query sees
            k = torch.cat([k, k.new_zeros(B, H, 1, hd)], 2)
            v = torch.cat([v, v.new_zeros(B, H, 1, hd)], 2)
        return q, k, v

    def _attend(self, q, k, v, mask, causal: bool, method: str | None, need_weights: bool, attention_kwargs):
        """The one :func:`attnbound.attention` call for all heads (warning once about
        ``need_weights``); its certificate is kept in ``last_certificate``."""
        m = method or self.method
        kw = {"is_causal": causal, "attn_mask": mask}
        if m not in _EXACT:
            kw |= {"eps": self.eps, "bound": self.bound}
        kw |= attention_kwargs
        if need_weights and not self._warned_weights:
            self._warned_weights = True
            # stacklevel: here, forward, Module._call_impl, Module._wrapped_call_impl, the caller
            warnings.warn("attnbound.nn.Attention never forms attention weights and returns None for them; "
                          "pass need_weights=False to silence this warning", UserWarning, stacklevel=5)
        out, cert = attention(q, k, v, method=m, return_certificate=True, **kw)
        self.last_certificate = cert
        return out

    def _merge_heads(self, out, B: int, L: int, unbatched: bool):
        """Heads merged back to (B, L, E), the output projection, and the caller's layout restored."""
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim))
        if unbatched:
            return out.squeeze(0)
        if not self.batch_first:
            return out.transpose(0, 1)
        return out

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False, *, method: str | None = None, **attention_kwargs):
        """Attention of ``query`` over ``key``/``value``, as ``torch.nn.MultiheadAttention.forward``.

        Args:
            query: (B, L, E) (batch_first) or unbatched (L, E).
            key: (B, S, kdim); value: (B, S, vdim) (unbatched: (S, kdim), (S, vdim)).
            key_padding_mask: (B, S) (unbatched: (S,)); bool True = that key is padding and is
                ignored, or float added to the logits.
            need_weights, average_attn_weights: the weights are never formed; ``None`` is returned
                in their place, and ``need_weights=True`` (torch's default) warns once per module.
                Pass ``need_weights=False`` to silence it.
            attn_mask: (L, S) or (B·num_heads, L, S); bool True = that pair is masked out, or
                float added to the logits. Masks whose rows are all equal (padding-like) and
                float masks of 0/−inf only are passed as key-padding masks, which the approximate
                methods accept; other masks need an exact method (``"auto"`` then runs exact).
            is_causal: as in torch, a hint that ``attn_mask`` is the causal mask: it must be
                (else ValueError), and the causal structure is then used directly (which the
                approximate methods accept). Unlike torch, ``attn_mask`` may be omitted.
            method: this call's attnbound method (default: the module's).
            **attention_kwargs: further :func:`attnbound.attention` options (``eps``, ``degree``, ...).

        Returns:
            ``(output, None)``: output (B, L, E) (unbatched: (L, E)). Rows whose keys are all
            masked out are zero before ``out_proj`` (torch returns NaN there).
        """
        if self.dropout > 0 and self.training:
            raise ValueError(f"dropout={self.dropout:g} acts on attention weights, which attnbound never forms; "
                             "construct with dropout=0.0 or call .eval()")
        query, key, value, key_padding_mask, unbatched = self._batch_first_inputs(query, key, value, key_padding_mask)
        (B, L, _), S = query.shape, key.shape[1]
        kpm = _key_padding_keep(key_padding_mask, B, S, query.dtype, unbatched)
        am = _attn_mask_keep(attn_mask, B, self.num_heads, L, S, query.dtype)
        am, causal = _resolve_causal(am, bool(is_causal or self.is_causal), is_causal, L, S)
        q, k, v = self._project_heads(query, key, value)
        mask, causal = _attention_mask(kpm, am, causal, k.shape[2] - S, L, S, q.dtype, q.device)
        out = self._attend(q, k, v, mask, causal, method, need_weights, attention_kwargs)
        return self._merge_heads(out, B, L, unbatched), None


class Block(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, embed_dim, num_heads, mlp_ratio, norm, attention_kwargs, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(embed_dim, **fk) if norm else nn.Identity()
        self.attn = Attention(embed_dim, num_heads, **attention_kwargs, **fk)
        self.norm2 = nn.LayerNorm(embed_dim, **fk) if norm else nn.Identity()
        hidden = int(mlp_ratio * embed_dim)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden, **fk), nn.GELU(), nn.Linear(hidden, embed_dim, **fk))

    def forward(self, x, method=None, **attention_kwargs):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False, method=method, **attention_kwargs)[0]
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """L pre-norm blocks of H-head attention + MLP; the attention method is switchable per call.

    ``norm=False`` drops the LayerNorms (the hard-instance packing needs the raw residual stream).
    ``forward(x, method=None, **kwargs)`` is self-attention: ``kwargs`` go to every layer's
    :meth:`Attention.forward` (``key_padding_mask``, ``attn_mask`` in torch's conventions, ``eps``, ...).
    ``last_certificates`` lists each layer's certificate after a forward, ``last_gradient_certificates`` each
    layer's gradient certificate after a backward.
    """

    def __init__(self, num_layers: int, embed_dim: int, num_heads: int, *, mlp_ratio: float = 4,
                 method: str = "exact", eps: float | None = None, bound: float | None = None,
                 is_causal: bool = False, norm: bool = True, device=None, dtype=None):
        super().__init__()
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        akw = {"method": method, "eps": eps, "bound": bound, "is_causal": is_causal}
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, norm, akw, device, dtype)
                                    for _ in range(num_layers))
        self.embed_dim = embed_dim

    def forward(self, x: torch.Tensor, method: str | None = None, **attention_kwargs) -> torch.Tensor:
        before = self.last_certificates
        try:
            for blk in self.blocks:
                x = blk(x, method=method, **attention_kwargs)
        except BaseException:  # a refused layer: every layer keeps the previous forward's certificate
            for blk, cert in zip(self.blocks, before):
                blk.attn.last_certificate = cert
            raise
        return x

    @property
    def last_certificates(self) -> list[Certificate | None]:
        return [blk.attn.last_certificate for blk in self.blocks]

    @property
    def last_gradient_certificates(self) -> list:
        """Each layer's :class:`~attnbound.GradientCertificate` of the last backward (None before one)."""
        return [blk.attn.last_gradient_certificate for blk in self.blocks]
