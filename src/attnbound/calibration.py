"""Measuring the planner's cost model on this machine (:class:`attnbound.planner.CostModel`).

:func:`calibrate` times the public calls ``method="auto"`` chooses between — exact attention (torch's
fused SDPA kernel on the CPU) at two head dims and polynomial attention at two value widths — and
solves for the constants of the planner's cost formulas. It sits above :func:`attnbound.attention`,
which it times, and beside :mod:`attnbound.planner`, which only reads what it measured.
"""

from __future__ import annotations

import math
import time

import torch

from .api import attention
from .engines.monomials import feature_rank
from .planner import CostModel


def calibrate(repeats: int = 5) -> CostModel:
    """Measure the cost-model constants on this machine (a few seconds): the public calls ``auto`` chooses
    between, so validation, statistics and certificates are in the figures. :meth:`CostModel.save`
    (or ``attnbound calibrate``) stores them where :func:`plan` finds them.

    Each pair of runs that a constant is solved from is timed alternately (a, b, a, b, …; best of
    ``repeats`` each), so a change of load on a shared machine hits both sides of the difference.
    """

    def best_pair(fa, fb):
        fa(), fb()  # warm-up (a compiled kernel may build here)
        ta = tb = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            fa()
            t1 = time.perf_counter()
            fb()
            t2 = time.perf_counter()
            ta, tb = min(ta, t1 - t0), min(tb, t2 - t1)
        return ta, tb

    gen = torch.Generator().manual_seed(0)
    n, (d1, d2) = 2048, (16, 128)
    # exact (torch SDPA): two head dims separate the per-pair cost from the per-multiply-add cost
    qkv = [[torch.randn(1, 1, n, d, generator=gen) for _ in range(3)] for d in (d1, d2)]
    t1, t2 = best_pair(lambda: attention(*qkv[0]), lambda: attention(*qkv[1]))
    (x1, y1), (x2, y2) = (2 * d1, t1 / (n * n)), (2 * d2, t2 / (n * n))
    c_mac = max((y2 - y1) / (x2 - x1), 1e-13)
    c_pair = max(y1 - c_mac * x1, 1e-13)
    # dispatch overhead per torch op
    small = torch.randn(8, 8, dtype=torch.float64)
    c_op = min(best_pair(lambda: [small * small for _ in range(200)], lambda: None)[0] / 200, 1e-4)
    # polynomial attention at two value widths: the slope is the GEMM cost, the intercept the features
    n_f, g = 4096, 6
    r = feature_rank(8, g)
    x = torch.randn(n_f, 8, dtype=torch.float64, generator=gen) / 3
    vs = [torch.randn(n_f, d_v, dtype=torch.float64, generator=gen) for d_v in (1, 64)]
    t1, t2 = best_pair(*(lambda v=v: attention(x, x, v, method="polynomial", degree=g, strict=False) for v in vs))
    (x1, y1), (x2, y2) = (2, t1 / (2 * n_f * r)), (65, t2 / (2 * n_f * r))
    c_mac_feat = max((y2 - y1) / (x2 - x1), 1e-13)
    c_feat = max(y1 - c_mac_feat * x1, 1e-13)
    return CostModel(c_pair=c_pair, c_mac=c_mac, c_feat=c_feat, c_mac_feat=c_mac_feat, c_op=c_op)
