"""Shared pieces of the reproduction experiments: results, operation counts, timing, fits, verdicts.

Verdicts about *operations* are decided by :func:`count_ops`, which is deterministic: it counts
what the code executes, not how long the machine took. Wall time (:func:`interleaved_min_times`,
:func:`overhead_fit`) is shown beside the counts as an illustration only.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

SCALES = ("test", "small", "medium", "large")

VERDICT_MEANING = {
    "PASS": "the measured quantity agrees with the prediction within the stated tolerance",
    "FAIL": "the data contradict the prediction (the reason says which number is off)",
    "INCONCLUSIVE": "the data cannot decide (too noisy, or dominated by a fixed cost); neither confirmed nor refuted",
    "SKIPPED": "not run (an optional dependency is missing; the reason names it)",
}


@dataclass
class Result:
    name: str
    claim: str
    verdict: str  # PASS / FAIL / INCONCLUSIVE / SKIPPED
    reason: str
    rows: list[dict] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)  # file stem -> matplotlib Figure


# ---------------------------------------------------------------- operation counts

# pointwise-tagged aten ops that only move or convert data: not counted (views and allocations
# carry no pointwise tag and are not counted either)
_DATA_MOVEMENT = {"clone", "copy", "_to_copy", "contiguous", "lift_fresh_copy", "alias_copy", "detach_copy"}
_REDUCTIONS_PER_INPUT = {"sum", "mean", "amax", "amin", "aminmax", "max", "min", "prod", "cumsum", "logsumexp", "norm",
                         "linalg_vector_norm", "_softmax", "_log_softmax", "_softmax_backward_data"}


class _ElementwiseCounter(TorchDispatchMode):
    """Counts arithmetic outside matrix products: one operation per output element of each
    pointwise aten op (tag ``pointwise``; copies excluded), one per input element of each reduction."""

    def __init__(self):
        super().__init__()
        self.pointwise = 0
        self.reduction = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func._overloadpacket
        if packet in flop_registry:  # matrix products: counted by FlopCounterMode
            return out
        name = packet.__name__.rstrip("_")
        if name in _DATA_MOVEMENT:
            return out
        if torch.Tag.pointwise in func.tags:
            first = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(first, torch.Tensor):
                self.pointwise += first.numel()
        elif torch.Tag.reduction in func.tags or name in _REDUCTIONS_PER_INPUT:
            src = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if src is not None:
                self.reduction += src.numel()
        return out


@dataclass(frozen=True)
class OpCount:
    """Operations executed: matmul flops (2 per multiply-add, as FlopCounterMode counts them) and
    elementwise operations (pointwise outputs + reduction inputs)."""

    matmul: int
    elementwise: int

    @property
    def total(self) -> int:
        return self.matmul + self.elementwise

    def __add__(self, other: "OpCount") -> "OpCount":
        return OpCount(self.matmul + other.matmul, self.elementwise + other.elementwise)

    def __sub__(self, other: "OpCount") -> "OpCount":
        return OpCount(self.matmul - other.matmul, self.elementwise - other.elementwise)


def count_ops(fn) -> tuple[OpCount, object]:
    """(operations executed by ``fn()``, its result). Deterministic: depends on shapes and the
    code path only. Counts forward and backward passes alike (CPU autograd runs in this thread).

    The feature engine's fused kernels (:mod:`attnbound.engines.fused`) do their arithmetic outside torch, where
    no counter sees it; while counting they are switched off, so the engine runs its reference torch path
    (the same products, in torch operations)."""
    from ..engines import fused

    flops = FlopCounterMode(display=False)
    elem = _ElementwiseCounter()
    available = fused.available
    fused.available = lambda *tensors: (False, "operation counting: the reference torch path")
    try:
        with flops, elem:
            out = fn()
    finally:
        fused.available = available
    return OpCount(int(flops.get_total_flops()), elem.pointwise + elem.reduction), out


# ---------------------------------------------------------------- timing (illustration)


def timeit(fn, repeats: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one warm-up call."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def timed(fn, repeats: int):
    """(median wall time over ``repeats`` calls, the last result), without a warm-up call."""
    ts, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def interleaved_min_times(fns: dict, rounds: int) -> dict:
    """Minimum wall time of each ``fns[key]()`` over ``rounds`` rounds; every round calls every
    function once (after one warm-up round), so a burst of load from other processes hits all
    keys alike instead of one series. The minimum estimates the unloaded cost."""
    for fn in fns.values():
        fn()
    best = {key: math.inf for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


def overhead_fit(work, seconds) -> dict:
    """Least-squares t = a + b·work (a, b ≥ 0): the fixed cost a per call and the cost b per unit
    of work; ``fixed_share`` = a / t at the largest work. When the fixed cost is most of the
    largest time, timings say nothing about how cost grows: ``dominated`` is then True.
    ``max_relative_residual``: the worst |t − (a + b·work)| / t (large: time does not follow work)."""
    w = np.asarray(work, float)
    t = np.asarray(seconds, float)
    A = np.stack([np.ones_like(w), w], 1)
    (a, b), *_ = np.linalg.lstsq(A, t, rcond=None)
    if b < 0:
        a, b = float(t.min()), 0.0
    elif a < 0:
        a, b = 0.0, float((w @ t) / (w @ w))
    i = int(np.argmax(w))
    share = float(a / t[i]) if t[i] > 0 else 1.0
    residual = float(np.max(np.abs(t - (a + b * w)) / t))
    return {"fixed_s": float(a), "per_unit_s": float(b), "fixed_share": share, "dominated": share > 0.5,
            "max_relative_residual": residual}


# ---------------------------------------------------------------- fits and verdicts


def fit_slope(xs, ys) -> tuple[float, float, float]:
    """Least-squares slope of log y on log x with a 95% confidence interval (lo, hi)."""
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float))
    fit = stats.linregress(lx, ly)
    if len(xs) < 3:
        return float(fit.slope), -math.inf, math.inf
    half = stats.t.ppf(0.975, len(xs) - 2) * fit.stderr
    return float(fit.slope), float(fit.slope - half), float(fit.slope + half)


def slope_verdict(slope: float, lo: float, hi: float, target: float, tol: float, *, upper_only=False) -> tuple[str, str]:
    """PASS when the fitted slope is within ``tol`` of ``target`` (or below target+tol when
    ``upper_only``); INCONCLUSIVE when the 95% interval is too wide to tell; FAIL otherwise."""
    desc = f"slope {slope:.3f} (95% CI {lo:.3f}..{hi:.3f}), predicted {target:g} ± {tol:g}"
    if hi - lo > 4 * tol:
        return "INCONCLUSIVE", desc + ": too noisy for a verdict"
    ok = slope <= target + tol if upper_only else abs(slope - target) <= tol
    return ("PASS" if ok else "FAIL"), desc


def combine(verdicts: list[str]) -> str:
    if "FAIL" in verdicts:
        return "FAIL"
    if "INCONCLUSIVE" in verdicts:
        return "INCONCLUSIVE"
    return "PASS"


def fmt_count(x: float) -> str:
    """3.2e+07-style for big counts, plain for small ones."""
    return f"{x:.3g}" if abs(x) < 1e5 else f"{x:.2e}"


def new_figure(ncols: int = 1, width: float = 5.4, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])
