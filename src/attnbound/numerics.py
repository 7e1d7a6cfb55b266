"""Exact scalings and the final cast: the few numerical steps every engine's caller shares.

* :func:`times_pow2` — x·2^e by two multiplications by powers of two: exact (no rounding) while the
  result stays normal, and with a gradient (``torch.ldexp`` has none).
* :func:`scale_values` — values scaled by 2^−e (e the exponent of max|v|) when Σ_j p_j·v_j could
  overflow the compute dtype; exact, undone on the output by :func:`times_pow2`.
* :func:`normalised` — x·a in float64 for the feature engine (a = 1/max‖x‖ or 1/(√d·B)): one rounding
  per entry, which the feature certificate charges.
* :func:`finish` — the cast to the output dtype, clamped to [−max|v|, max|v|], where every exact
  output lies (an average of the values), so the clamp never moves an output away from the exact one.
"""

from __future__ import annotations

import math

import torch

from .certificate import CertificateMiss


def times_pow2(x: torch.Tensor, e: int, *, fresh: bool = False) -> torch.Tensor:
    """x·2^e by two exact multiplications (2^e alone may not be a float; torch.ldexp has no gradient);
    in place when ``fresh`` says x is this call's own temporary (never an input)."""
    if e == 0:
        return x
    half = e // 2
    if fresh:
        return x.mul_(2.0**half).mul_(2.0 ** (e - half))
    return x * (2.0**half) * (2.0 ** (e - half))


def scale_values(v: torch.Tensor, max_abs_value: float, n_k: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """(v in ``dtype``, e) with v scaled by 2^−e when n_k·max|v| could overflow ``dtype`` (else e = 0):
    the output is then scaled back by :func:`times_pow2` (out, e)."""
    vs = v.to(dtype)
    if max_abs_value * n_k * 4.0 > float(torch.finfo(dtype).max):
        e = math.frexp(max_abs_value)[1]
        return times_pow2(vs, -e), e
    return vs, 0


def unit_values(v: torch.Tensor, max_abs_value: float) -> tuple[torch.Tensor, int]:
    """(a float64 copy of v scaled by 2^−e, e) with e the exponent of max|v|, so every |entry| ≤ 1 (exact, unless
    an entry falls below 2^-1074·2^e); the feature engines' values. Undo with :func:`times_pow2` (out, e)."""
    e = math.frexp(max_abs_value)[1] if max_abs_value > 0 else 0
    return times_pow2(v.to(torch.float64, copy=True), -e, fresh=True), e


def normalised(x: torch.Tensor, a: float) -> torch.Tensor:
    """x·a in float64 (a = 1/max‖x‖ or 1/(√d·B)); a norm so small that its inverse leaves float64 is refused.
    One rounding per entry (the float64 copy is exact); the product is taken in place on that fresh copy."""
    if not math.isfinite(a):
        raise CertificateMiss("q/k: a norm below 1/max(float64) cannot be normalised for the feature engine; "
                              "use method='exact'")
    return x.to(torch.float64, copy=True).mul_(a)


def _dense(x: torch.Tensor) -> bool:
    """x fills its storage exactly (a permutation of a dense buffer, as a kernel's transposed output): no entry
    is shared, so it can be written in place."""
    return x.storage_offset() == 0 and x.untyped_storage().nbytes() == x.numel() * x.element_size() \
        and all(st > 0 for st, sz in zip(x.stride(), x.shape) if sz > 1)


def finish(out: torch.Tensor, max_abs_value: float, dtype: torch.dtype, *, fresh: bool = False) -> torch.Tensor:
    """Cast to the output dtype, inside [−max|v|, max|v|] where every exact output lies; in place when
    ``fresh`` says ``out`` is this call's own result (never an input) and autograd does not record it."""
    if fresh and not out.requires_grad and (out.is_contiguous() or _dense(out)):
        return out.clamp_(-max_abs_value, max_abs_value).to(dtype)
    if out.requires_grad:
        # the clamp moves values only, never gradients: the backward is the derivative of the computation itself
        # (a clamp's derivative would zero dv wherever rounding put an output past max|v|, e.g. all values equal)
        out = out + (out.detach().clamp(-max_abs_value, max_abs_value) - out.detach())
        return out.to(dtype)
    return out.clamp(-max_abs_value, max_abs_value).to(dtype)
