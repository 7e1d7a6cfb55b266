"""Multi-head attention and a pre-norm transformer whose attention is any attnbound method.

:class:`Attention` is shaped like ``torch.nn.MultiheadAttention(batch_first=True)`` — same
parameter names (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``),
so ``load_state_dict(mha.state_dict())`` works — and calls :func:`attnbound.attention` for all
heads at once. Cost per layer: 4·n·E² for the projections plus the attention method's cost per
head (exact: n²·E; polynomial: n·C(d_h+g, g)·d_h per head). Seed 002 (Saha, Xu, Ye, Yu) shows
the L·H heads of a transformer cannot share work in general: L·H·n^{2−o(1)} time overall.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .api import attention
from .certificate import Certificate


class Attention(nn.Module):
    """Multi-head self-attention (batch-first) with a pluggable attnbound method.

    Args:
        embed_dim: E. num_heads: H (must divide E); head dim E/H.
        method, eps, bound, is_causal: passed to :func:`attnbound.attention` (per call
            overridable in :meth:`forward`).
        bias: learnable input/output projection biases.

    After each forward, ``last_certificate`` holds the call's certificate (one certificate for
    all heads: its radius is the max over heads, so it bounds every head).
    """

    def __init__(self, embed_dim: int, num_heads: int, *, method: str = "exact", eps: float | None = None,
                 bound: float | None = None, is_causal: bool = False, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if embed_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide embed_dim={embed_dim}")
        fk = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.method, self.eps, self.bound, self.is_causal = method, eps, bound, is_causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **fk))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim, **fk)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        nn.init.xavier_uniform_(self.in_proj_weight)
        if bias:
            nn.init.zeros_(self.out_proj.bias)
        self.last_certificate: Certificate | None = None

    def forward(self, x: torch.Tensor, *, method: str | None = None, attn_mask: torch.Tensor | None = None,
                **attention_kwargs) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (batch, n, embed_dim={self.embed_dim}), got {shape}")
        b, n, _ = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = (t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, -1))
        m = method or self.method
        kw = {"is_causal": self.is_causal, "attn_mask": attn_mask}
        if m not in ("exact", "dense", "blockwise"):
            kw |= {"eps": self.eps, "bound": self.bound}
        kw |= attention_kwargs
        out, cert = attention(q, k, v, method=m, return_certificate=True, **kw)
        self.last_certificate = cert
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.embed_dim))


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
        x = x + self.attn(self.norm1(x), method=method, **attention_kwargs)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """L pre-norm blocks of H-head attention + MLP; the attention method is switchable per call.

    ``norm=False`` drops the LayerNorms (the hard-instance packing needs the raw residual stream).
    ``last_certificates`` lists each layer's certificate after a forward.
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
        for blk in self.blocks:
            x = blk(x, method=method, **attention_kwargs)
        return x

    @property
    def last_certificates(self) -> list[Certificate | None]:
        return [blk.attn.last_certificate for blk in self.blocks]
