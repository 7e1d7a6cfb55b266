"""The statistics of one attention call, taken once and shared by every certificate (docs/theory.md §3).

A certificate needs a handful of scalars about the inputs, and every one of them must be taken
over what the call actually computes:

* ``q_norm`` = max_i ‖q_i‖₂ and ``k_norm`` = max_j ‖k_j‖₂ over the keys that take part with at
  least one query (a key that every row masks out gets weight 0 and cannot affect the output,
  whatever its size). The data radius is R = s·q_norm·k_norm (ℓ2 attention: 2s·q_norm·k_norm);
  the exact methods' logit bound is s·q_norm·k_norm (ℓ2: s·(q_norm + k_norm)²).
* ``value_range`` = max over batch entries and value columns of (max_j v_jc − min_j v_jc) and
  ``max_abs_value`` = max |v_jc|, over the same keys: every output is a convex combination of
  the values its row sees, so these bound how far any weight error can move it.
* ``mask_span``: for an additive float mask, the largest |b'_ij| of the row-shifted mask
  b' = b − max_j b_ij (see :func:`shift_mask`); the exact certificate charges the rounding of
  the logits of the keys within the span and bounds the weight of keys beyond it.

:func:`input_stats` computes them with a few O(inputs) reductions in the input dtype (norms in
float32 or float64, extremes exactly, no float64 copy of the inputs, no n_q×n_k allocation unless
the mask already is one); :func:`attnbound.distributed` reduces the same quantities across ranks
with one ``all_reduce(MAX)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import validation as val


@dataclass(frozen=True)
class InputStats:
    q_norm: float
    k_norm: float
    q_abs: float | None  # max |q| and max |k| entries; None where not taken (input_stats(entries=False))
    k_abs: float | None
    value_range: float
    max_abs_value: float
    mask_span: float = 0.0
    # the per-row norms behind q_norm and k_norm (k: 0 for keys no row sees), kept so later steps of the same
    # call (centring's plain split) need not recompute them; None where only the scalars are known
    rows: tuple | None = field(default=None, compare=False, repr=False)
    # (hi, lo): per batch entry and value column, the extremes over the keys that take part (±inf where none)
    columns: tuple | None = field(default=None, compare=False, repr=False)
    # max ‖k_j‖ over the keys no row sees (0 when every key takes part): how large a hidden logit can be
    hidden_k_norm: float = field(default=0.0, compare=False)

    def logit_bound(self, scale: float, kind: str) -> float:
        """A bound on |logit| of every computed pair (before any mask)."""
        if kind == "l2":
            return scale * (self.q_norm + self.k_norm) * (self.q_norm + self.k_norm)  # inf, never OverflowError
        return scale * self.q_norm * self.k_norm

    def radius(self, scale: float, kind: str, *, bound: float | None = None, d: int = 1) -> tuple[float, str]:
        """R bounding |x| for x = s_eff⟨q, k⟩ (s_eff = 2s for ℓ2), and whether it came from the data or ``bound``."""
        s_eff = 2.0 * scale if kind == "l2" else scale
        if bound is not None:
            return s_eff * d * float(bound) * float(bound), "bound"
        return s_eff * self.q_norm * self.k_norm, "data"


def row_norms(x: torch.Tensor, *, name: str | None = None) -> torch.Tensor:
    """‖x_i‖₂ of each row as float64, at least the real-number norm of the row.

    Float32 and half inputs are first reduced in float32 (no float64 copy of x). With u = 2^-24 the
    computed norm of a row is within a factor (1 ± γ_{d+2}) of the real one for any summation order,
    up to squares below float32's smallest normal (each lost square is < 2^-126, i.e. a relative
    d·2^-126/‖x‖² < d·2^-59 once ‖x‖ ≥ 1e-10); rounding up by 1 + γ_{d+2} + d·2^-50 covers both, and
    norms in [1e-10, 1e15] keep every square inside float32's range. The rows outside that range (and
    float64 inputs) take :func:`_row_norms64`, only those rows.

    ``name``: first raise ValueError naming x when it holds NaN or Inf (seen in the norms at no extra pass;
    decided before any recomputation allocates)."""
    d = x.shape[-1]
    x = x.detach()
    if x.dtype == torch.float64 or x.numel() == 0:
        return _row_norms64(x, name=name)
    u32 = 2.0**-24
    up32 = 1.0 + (d + 2) * u32 / (1.0 - (d + 2) * u32) + d * 2.0**-50
    fast32 = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)
    out = fast32.double().mul_(up32)
    lo, hi = (float(e) for e in torch.aminmax(fast32))  # one reduction decides (NaN fails both tests)
    if name is not None and not (math.isfinite(lo) and math.isfinite(hi)):  # NaN/Inf entry, or an overflow
        val.check_finite(name, x)
    if not (lo >= 1e-10 and hi <= 1e15):
        ok = (fast32 >= 1e-10) & (fast32 <= 1e15)
        out[~ok] = _row_norms64(x[~ok])
    return out


def _row_norms64(x: torch.Tensor, *, name: str | None = None) -> torch.Tensor:
    """Row norms reduced in float64 and rounded up by (1 + γ_{d+2}), u = 2^-53; rows whose norm leaves about
    [1e-140, 1e140] (squares that could underflow or overflow, exact zeros) are scaled by their largest
    entry first, like BLAS nrm2, and a row holding ±inf has norm inf."""
    d = x.shape[-1]
    up = 1.0 + (d + 2) * 2.0**-53 / (1.0 - (d + 2) * 2.0**-53)
    fast = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64)
    if name is not None and fast.numel() and not all(math.isfinite(float(e)) for e in torch.aminmax(fast)):
        val.check_finite(name, x)
    ok = (fast > 1e-140) & (fast < 1e140)
    out = fast * up
    if fast.numel() == 0 or bool(ok.all()):
        return out
    xb = x[~ok].double()  # (m, d): only the rows that need it
    top = xb.abs().amax(-1, keepdim=True)
    safe = torch.where((top > 0) & torch.isfinite(top), top, torch.ones_like(top))
    scaled = torch.linalg.vector_norm(xb / safe, dim=-1) * safe.squeeze(-1) * up
    out[~ok] = torch.where(torch.isposinf(top.squeeze(-1)), top.squeeze(-1), scaled)
    return out


def key_participation(attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(..., n_k) bool: key j takes part with at least one query row (None: every key does)."""
    if attn_mask is None:
        return None
    taking = attn_mask if attn_mask.dtype == torch.bool else attn_mask > -math.inf
    return taking.any(-2)


def value_extremes(v: torch.Tensor, keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (batch entry, column) max and min of v (float64) over the keys that take part; ±inf where none does.

    Taken in v's own dtype (a max or min is exact in any dtype) and then widened: no float64 copy of v."""
    vd = v.detach()
    if keys is not None:
        keep = keys.unsqueeze(-1)
        inf = torch.tensor(math.inf, dtype=vd.dtype, device=vd.device)
        return torch.where(keep, vd, -inf).amax(-2).double(), torch.where(keep, vd, inf).amin(-2).double()
    if vd.shape[-2] == 0:
        shape = (*vd.shape[:-2], vd.shape[-1])
        return (torch.full(shape, -math.inf, dtype=torch.float64, device=vd.device),
                torch.full(shape, math.inf, dtype=torch.float64, device=vd.device))
    return _column_reduce(vd, torch.amax).double(), _column_reduce(vd, torch.amin).double()


def _column_reduce(x: torch.Tensor, op) -> torch.Tensor:
    """op (amax or amin) over dim −2 of (..., n, c). A tall, thin x (c < 64) is first folded to rows of
    m·c entries (column j of every fold is column j mod c of x), which torch reduces along dim −2 far
    faster than n rows of c; exact, as any max or min is."""
    n, c = x.shape[-2], x.shape[-1]
    m = 64 // c if c else 0
    if m < 2 or n < 4 * m or not x.is_contiguous():
        return op(x, dim=-2)
    head = n - n % m
    folded = op(x[..., :head, :].reshape(*x.shape[:-2], head // m, m * c), dim=-2)
    red = op(folded.reshape(*x.shape[:-2], m, c), dim=-2)
    if head < n:
        red = op(torch.stack([red, op(x[..., head:, :], dim=-2)]), dim=0)
    return red


def _abs_max_rows(x: torch.Tensor) -> torch.Tensor:
    """max_c |x_ic| of each row in float64, without an |x| copy: max(−min, max), exact in any dtype."""
    if x.shape[-1] == 0:
        return torch.zeros(x.shape[:-1], dtype=torch.float64, device=x.device)
    return torch.maximum(-x.amin(-1).double(), x.amax(-1).double())  # two reductions: faster than aminmax(dim)


def _abs_max(x: torch.Tensor) -> float:
    """max |x| over all entries (0.0 when empty), by one aminmax pass: exact in any dtype."""
    if x.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(x)
    return max(-float(lo), float(hi))


def _max_or_zero(x: torch.Tensor) -> float:
    return float(x.max()) if x.numel() else 0.0


def input_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, check_finite: bool = False,
                entries: bool = True) -> InputStats:
    """The :class:`InputStats` of one call. ``key_mask`` (..., n_k), if given, says which keys take part;
    otherwise it is derived from ``attn_mask`` (a key takes part if some row may see it).

    ``check_finite``: raise ValueError naming q, k or v when it holds NaN or Inf — seen at no extra pass, as a
    NaN or an infinity reaches the row norms of q and k and the column extremes of v (a finite row whose norm
    overflows is then checked entry by entry). ``entries=False`` skips max|q| and max|k| (``q_abs``, ``k_abs``
    are then None): only a declared ``bound`` and the records need them, and each costs one more pass."""
    with torch.no_grad():
        keys = key_mask if key_mask is not None else key_participation(attn_mask)
        qd, kd = q.detach(), k.detach()
        qn = row_norms(qd, name="q" if check_finite else None)
        kn = row_norms(kd, name="k" if check_finite else None)
        ka = None
        if entries:  # only the largest |k| over the keys that take part is used: one aminmax pass without a mask
            ka = _abs_max(kd) if keys is None else _abs_max_rows(kd)
        hidden = 0.0
        if keys is not None:
            keys = keys.expand(*torch.broadcast_shapes(keys.shape, kn.shape))
            hidden = _max_or_zero(torch.where(keys, torch.zeros((), dtype=kn.dtype, device=kn.device), kn))
            kn = torch.where(keys, kn, torch.zeros((), dtype=kn.dtype, device=kn.device))
            if ka is not None:
                ka = torch.where(keys, ka, torch.zeros((), dtype=ka.dtype, device=ka.device))
            if check_finite:  # values of hidden keys leave the extremes below: check them as given
                val.check_finite("v", v)
        hi, lo = value_extremes(v, keys)
        top, bottom = (float(hi.max()), float(lo.min())) if hi.numel() else (0.0, 0.0)
        if keys is None and math.isfinite(top) and math.isfinite(bottom):  # every column seen, all finite
            value_range, max_abs_value = _max_or_zero(hi - lo), max(abs(top), abs(bottom))
        else:
            if check_finite and keys is None:
                val.check_finite("v", v)
            # columns no key takes part in have hi = −inf, lo = +inf: range 0; a range past float64's maximum
            # stays inf
            spread = torch.where(torch.isfinite(hi) & torch.isfinite(lo), hi - lo, torch.zeros_like(hi))
            vmax = torch.maximum(hi.abs(), lo.abs())
            vmax = torch.where(torch.isfinite(vmax), vmax, torch.zeros_like(vmax))
            value_range, max_abs_value = _max_or_zero(spread), _max_or_zero(vmax)
        span = 0.0
        if attn_mask is not None and attn_mask.is_floating_point():
            shifted = shift_mask(attn_mask, torch.float64)
            finite = shifted[torch.isfinite(shifted)]
            span = float(finite.abs().max()) if finite.numel() else 0.0
        return InputStats(
            q_norm=_max_or_zero(qn),
            k_norm=_max_or_zero(kn),
            q_abs=_abs_max(qd) if entries else None,
            k_abs=None if ka is None else (ka if isinstance(ka, float) else _max_or_zero(ka)),
            value_range=value_range,
            max_abs_value=max_abs_value,
            mask_span=span,
            rows=(qn, kn),
            columns=(hi, lo),
            hidden_k_norm=hidden,
        )


def shift_mask(attn_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive mask b shifted by its row maximum, b' = b − max_j b_ij ≤ 0, cast to ``dtype``.

    Softmax is invariant to a per-row constant, so b' gives the same attention as b; but a row whose
    entries are all huge and negative (−1e30, or a float64 entry that overflows the compute dtype)
    would otherwise swamp the logits it is added to. The shift runs in the wider of the two dtypes;
    entries below −max(dtype) become −inf (their weight is below e^{−max(dtype)} of the row's best).
    +inf entries are rejected by validation. Rows with no finite entry stay −inf.
    """
    work = torch.promote_types(attn_mask.dtype, dtype)
    m = attn_mask.to(work)
    top = m.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return (m - top).to(dtype)
