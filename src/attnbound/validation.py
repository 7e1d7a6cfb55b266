"""Input validation shared by every attention method.

Every public entry point calls :func:`check_qkv` before it allocates anything larger than its
inputs, so bad input fails early with a ``TypeError``/``ValueError`` that names the argument.
"""

from __future__ import annotations

import math

import torch

KINDS = ("softmax", "l2")
EXACT_METHODS = ("exact", "dense", "blockwise")
FEATURE_METHODS = ("taylor", "polynomial", "relative")  # the approximation families (attnbound.families)
APPROX_METHODS = FEATURE_METHODS + ("auto",)
METHODS = EXACT_METHODS + APPROX_METHODS


def check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (..., n, d) with at least 2 dims, got {tuple(x.shape)}")


def check_finite(name: str, x: torch.Tensor) -> None:
    # one reduction and no n×d temporary: NaN propagates through aminmax, ±inf shows in min or max
    if x.numel() and not all(math.isfinite(float(e)) for e in torch.aminmax(x.detach())):
        raise ValueError(f"{name} contains NaN or Inf")


def broadcast_shapes(*shapes) -> torch.Size:
    """torch.broadcast_shapes, without its Python-level work in the common case of equal shapes."""
    first = tuple(shapes[0])
    if all(tuple(s) == first for s in shapes[1:]):
        return torch.Size(first)
    return torch.broadcast_shapes(*shapes)


def check_qkv(q, k, v, *, is_causal: bool = False, finite: bool = True) -> torch.Size:
    """Validate q (..., n_q, d), k (..., n_k, d), v (..., n_k, d_v); return the broadcast batch shape.
    ``finite=False`` leaves the NaN/Inf check to the caller's statistics pass
    (:func:`attnbound.stats.input_stats` with ``check_finite=True``), which sees it at no extra pass."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the feature dim d, got q d={q.shape[-1]} and k d={k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must share the key length n_k, got k n_k={k.shape[-2]} and v n_k={v.shape[-2]}")
    if k.shape[-2] == 0:
        raise ValueError("k and v must hold at least one key (n_k = 0)")
    if q.shape[-1] == 0:
        raise ValueError("q and k must have feature dim d >= 1")
    try:
        batch = broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError as exc:
        raise ValueError(
            f"leading (batch) dims of q {tuple(q.shape[:-2])}, k {tuple(k.shape[:-2])} and "
            f"v {tuple(v.shape[:-2])} do not broadcast"
        ) from exc
    if is_causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"is_causal=True needs as many queries as keys (n_q == n_k), got n_q={q.shape[-2]} and n_k={k.shape[-2]}"
        )
    if finite:
        for name, x in (("q", q), ("k", k), ("v", v)):
            check_finite(name, x)
    return batch


def resolve_scale(scale, d: int) -> float:
    """``None`` means 1/sqrt(d) (torch SDPA's default)."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a positive float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be positive and finite, got {scale}")
    return scale


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}")
    return value


def check_positive_int(name: str, value, *, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_eps(eps, *, required: bool = False, name: str = "eps") -> float | None:
    if eps is None:
        if required:
            raise ValueError("eps is required for this method: give the largest acceptable max-abs output error")
        return None
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{name} must be a positive finite float, got {eps!r}")
    return float(eps)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 are computed in float32; float32/float64 in themselves."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_mask(attn_mask, q: torch.Tensor, k: torch.Tensor) -> None:
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True = take part) or floating (additive), got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask must be on q's device {q.device}, got {attn_mask.device}")
    target = (*torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]), q.shape[-2], k.shape[-2])
    try:
        shape = torch.broadcast_shapes(attn_mask.shape, target)
    except RuntimeError as exc:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {target}") from exc
    if tuple(shape) != tuple(target):
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} would enlarge the output's batch dims "
                         f"{tuple(target[:-2])} to {tuple(shape[:-2])}; broadcast q, k, v to those dims instead")
    if attn_mask.is_floating_point():
        if bool(torch.isnan(attn_mask).any()):
            raise ValueError("attn_mask contains NaN (use -inf to exclude a key)")
        if bool((attn_mask == math.inf).any()):
            raise ValueError("attn_mask contains +inf: a key with weight +inf has no finite attention "
                             "(use -inf to exclude a key, finite values to favour one)")


def check_bound(bound) -> float | None:
    """A declared entry bound B: None or a positive finite real (not a bool)."""
    if bound is None:
        return None
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound <= 0:
        raise ValueError(f"bound must be a positive finite float, got {bound!r}")
    return float(bound)


def check_empty(q: torch.Tensor, v: torch.Tensor, batch) -> bool:
    """True when the output (..., n_q, d_v) has no entries (empty batch, n_q = 0 or d_v = 0)."""
    return math.prod(batch) == 0 or q.shape[-2] == 0 or v.shape[-1] == 0
