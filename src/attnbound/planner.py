"""The planner: the fastest method whose certificate meets a requested error.

For every candidate — exact attention, Taylor orders p = 0, 2, 4, … and Chebyshev degrees
g = 0, 1, 2, … — :func:`plan` computes the certified output error (SPEC §3, via
:func:`attnbound.certificate.feature_certificate`), the rank r = C(d+g, g), the memory the
engine would allocate, and a predicted time from a cost model:

    exact       t = b·n_q·n_k·(c_pair + c_mac·(d + d_v))   (halved when causal)
    features    t = b·(n_q + n_k)·r·(c_feat + c_mac_feat·(d_v + 1))  [+ causal: b·n_q·(64·(r + d_v + 1) + 2r(d_v + 1))·c_mac_feat]
                  + c_op·(#chunks)·(g·d + 6)

The constants are *measured*, not guessed: :func:`calibrate` times exact blockwise attention
and the feature engine on this machine and solves for them. :data:`DEFAULT_COST_MODEL` holds
the figures ``attnbound calibrate`` printed on the 2-core reference machine; pass
``cost_model=calibrate()`` to plan for yours. The choice is the cheapest candidate that is
certified (error ≤ eps) and fits the memory budget; exact always qualifies.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from .certificate import feature_certificate
from .features import CAUSAL_TILE, chunk_rows, feature_memory_bytes, feature_rank
from .chebyshev import MAX_DEGREE, chebyshev_coefficients, chebyshev_error
from .taylor import taylor_coefficients, taylor_remainder

MAX_TAYLOR_ORDER = 20


@dataclass(frozen=True)
class CostModel:
    """Seconds per unit of work; see the module docstring for the formulas."""

    c_pair: float  # exact: per (query, key) pair (exp, max, sum)
    c_mac: float  # exact: per multiply-add of the score and value GEMMs
    c_feat: float  # features: per (row, monomial) built
    c_mac_feat: float  # features: per multiply-add of the thin float64 GEMMs
    c_op: float  # per torch op dispatched (Python overhead)

    def exact_seconds(self, batch, n_q, n_k, d, d_v, is_causal=False) -> float:
        t = batch * n_q * n_k * (self.c_pair + self.c_mac * (d + d_v))
        blocks = math.ceil(n_q / 1024) * math.ceil(n_k / 1024)
        return (0.5 if is_causal else 1.0) * t + self.c_op * 12 * blocks

    def feature_seconds(self, batch, n_q, n_k, d, d_v, degree, is_causal=False) -> float:
        r = feature_rank(d, degree)
        chunk = chunk_rows(batch, r)
        t = batch * (n_q + n_k) * r * (self.c_feat + self.c_mac_feat * (d_v + 1))
        ops = 0
        if is_causal:  # triangular tiles of CAUSAL_TILE rows, plus the per-tile state readout and update
            tile = min(CAUSAL_TILE, n_q)
            t += batch * n_q * (tile * (r + d_v + 1) + 2 * r * (d_v + 1)) * self.c_mac_feat
            ops = 6 * math.ceil(n_q / tile)
        chunks = math.ceil(n_q / chunk) + math.ceil(n_k / chunk)
        return t + self.c_op * (chunks * (degree * d + 6) + ops)


# Measured with `attnbound calibrate` (torch 2.13 CPU, 2 threads) on the project's reference machine.
DEFAULT_COST_MODEL = CostModel(c_pair=2.3e-09, c_mac=1.15e-11, c_feat=2.1e-09, c_mac_feat=3.0e-11, c_op=1.5e-06)


@dataclass(frozen=True)
class Candidate:
    method: str  # "exact", "taylor", "polynomial"
    degree: int | None
    rank: int | None
    error_bound: float
    seconds: float
    memory_bytes: int
    certified: bool
    fits_memory: bool


@dataclass(frozen=True)
class Plan:
    choice: Candidate
    candidates: list[Candidate] = field(default_factory=list)
    eps: float = 0.0
    radius: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def default_memory_budget(device: torch.device | str = "cpu") -> int:
    """Half of the memory available now (RAM, or free GPU memory on CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // 2)


def family_error(method: str, radius: float, degree: int) -> tuple[float, float]:
    """(δ, Σ|a_j|) of the Taylor order / Chebyshev degree on [−R, R]."""
    if method == "taylor":
        return taylor_remainder(radius, degree), float(abs(taylor_coefficients(radius, degree)).sum())
    return chebyshev_error(radius, degree), float(abs(chebyshev_coefficients(radius, degree)).sum())


def plan(
    n_q: int,
    n_k: int,
    d: int,
    d_v: int,
    radius: float,
    eps: float,
    is_causal: bool = False,
    *,
    batch: int = 1,
    kind: str = "softmax",
    value_range: float = 2.0,
    max_abs_value: float = 1.0,
    memory_budget: int | None = None,
    requires_grad: bool = False,
    cost_model: CostModel | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Plan:
    """Plan the ``method="auto"`` run: every candidate's certified error, rank and predicted cost.

    ``radius`` bounds |s⟨q,k⟩| over all pairs; ``value_range``/``max_abs_value`` describe V
    (defaults: entries in [−1, 1]). Returns a :class:`Plan` whose ``choice`` is the cheapest
    candidate with error ≤ eps that fits ``memory_budget`` bytes.
    """
    for name, val in (("n_q", n_q), ("n_k", n_k), ("d", d), ("d_v", d_v), ("batch", batch)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius >= 0):
        raise ValueError(f"radius must be finite and >= 0, got {radius!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be positive and finite, got {eps!r}")
    cm = cost_model or DEFAULT_COST_MODEL
    budget = memory_budget if memory_budget is not None else default_memory_budget()
    exact = Candidate("exact", None, None, 0.0, cm.exact_seconds(batch, n_q, n_k, d, d_v, is_causal),
                      8 * batch * min(n_q, 1024) * min(n_k, 1024) * 3, True, True)
    candidates = [exact]
    for method, degrees, max_deg in (("taylor", range(0, MAX_TAYLOR_ORDER + 1, 2), MAX_TAYLOR_ORDER),
                                     ("polynomial", range(0, MAX_DEGREE + 1), MAX_DEGREE)):
        for g in degrees:
            r = feature_rank(d, g)
            mem = feature_memory_bytes(batch, n_q, n_k, d_v, r, chunk_rows(batch, r),
                                       is_causal=is_causal, requires_grad=requires_grad)
            delta, abs_sum = family_error(method, float(radius), g)
            cert = feature_certificate(method=method, kind=kind, degree=g, rank=r, radius=float(radius),
                                       radius_source="data", delta=delta, coeff_abs_sum=abs_sum, n_k=n_k,
                                       value_range=value_range, max_abs_value=max_abs_value,
                                       out_dtype=out_dtype)
            err = cert.output_error_bound
            cand = Candidate(method, g, r, err, cm.feature_seconds(batch, n_q, n_k, d, d_v, g, is_causal),
                             mem, err <= eps, mem <= budget)
            candidates.append(cand)
            if cand.certified or not cand.fits_memory or cand.seconds > 10 * exact.seconds:
                break
    usable = [c for c in candidates if c.certified and c.fits_memory]
    choice = min(usable, key=lambda c: c.seconds)
    return Plan(choice=choice, candidates=candidates, eps=float(eps), radius=float(radius))


def calibrate(repeats: int = 5) -> CostModel:
    """Measure the cost-model constants on this machine (about a second)."""

    def best(fn):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    from .exact import blockwise_attention
    from .features import feature_attention

    gen = torch.Generator().manual_seed(0)
    n = 2048
    # exact: two head dims separate the per-pair cost from the per-multiply-add cost
    rows = []
    for d in (16, 128):
        q, k, v = (torch.randn(n, d, generator=gen) for _ in range(3))
        t = best(lambda: blockwise_attention(q, k, v, scale=0.1))
        rows.append((d + d, t / (n * n)))
    (x1, y1), (x2, y2) = rows
    c_mac = max((y2 - y1) / (x2 - x1), 1e-13)
    c_pair = max(y1 - c_mac * x1, 1e-13)
    # dispatch overhead per torch op
    small = torch.randn(8, 8, dtype=torch.float64)
    c_op = best(lambda: [small * small for _ in range(200)]) / 200
    # whole engine runs at two value widths: the slope is the GEMM cost, the intercept the features
    n_f, g = 4096, 6
    r = feature_rank(8, g)
    x = torch.randn(n_f, 8, dtype=torch.float64, generator=gen) / 3
    coeffs = chebyshev_coefficients(1.0, g)
    pts = []
    for d_v in (1, 64):
        v = torch.randn(n_f, d_v, dtype=torch.float64, generator=gen)
        t = best(lambda: feature_attention(x, x, v, coeffs=coeffs))
        pts.append((d_v + 1, t / (2 * n_f * r)))
    (x1, y1), (x2, y2) = pts
    c_mac_feat = max((y2 - y1) / (x2 - x1), 1e-13)
    c_feat = max(y1 - c_mac_feat * x1, 1e-13)
    return CostModel(c_pair=c_pair, c_mac=c_mac, c_feat=c_feat, c_mac_feat=c_mac_feat, c_op=c_op)
