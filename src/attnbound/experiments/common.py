"""Shared pieces of the reproduction experiments: results, timing, slope fits, verdicts."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

SCALES = ("test", "small", "medium", "large")


@dataclass
class Result:
    name: str
    claim: str
    verdict: str  # PASS / FAIL / INCONCLUSIVE
    reason: str
    rows: list[dict] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)  # file stem -> matplotlib Figure


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
    desc = f"slope {slope:.2f} (95% CI {lo:.2f}..{hi:.2f}), predicted {target:g}"
    if hi - lo > 4 * tol:
        return "INCONCLUSIVE", desc + ": timings too noisy for a verdict"
    ok = slope <= target + tol if upper_only else abs(slope - target) <= tol
    return ("PASS" if ok else "FAIL"), desc


def combine(verdicts: list[str]) -> str:
    if "FAIL" in verdicts:
        return "FAIL"
    if "INCONCLUSIVE" in verdicts:
        return "INCONCLUSIVE"
    return "PASS"


def new_figure(ncols: int = 1, width: float = 5.2, height: float = 3.8):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])
