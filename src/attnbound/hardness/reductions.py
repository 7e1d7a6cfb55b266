"""The SETH reductions to self-attention, as runnable instance builders (docs/theory.md §4).

Every builder returns a :class:`Reduction`: queries, keys, values and scale of one attention
call whose output decides the combinatorial instance, with the decision threshold and margin.
All use the *extra-key trick*: one extra key gets log-weight equal to that of a "hit" pair and
value 1, every real key value 0, so

    out_i = e^{τ} / (e^{τ} + Σ_j e^{x_ij}) ≤ 1/2       if row i has a hit (some x_ij ≥ τ),
    out_i ≥ 1 / (1 + n·e^{−gap}) ≥ 4/5                if every x_ij ≤ τ − gap,

with gap = ln(4n) (docs/theory.md §4 asks for ln(2n), which gives 2/3; we take ln(4n) for a wider margin).
The decision threshold is the midpoint 0.65 and the margin 0.15: any attention method whose
max-abs output error is below the margin decides correctly, which is what the certificate checks.

* OV → softmax attention (Keles, Wijewardena, Hegde, ALT 2023): q_i = −σ a_i, k_j = σ b_j, extra key 0,
  s = 1/m, C = sσ² = ln(4n): x_ij = −C⟨a_i, b_j⟩ is 0 for an orthogonal pair and ≤ −C otherwise.
  Entries B = σ = √(C m) = Θ(log n) when m = Θ(log n).
* OV → ℓ2 attention: weights exp(−s‖q − k‖²) with q_i = σ[a_i, 0^m], k_j = −σ[b_j, pad_j] where
  pad_j ∈ {0,1}^m tops b_j up to weight m, so ‖q_i − k_j‖² = σ²(|a_i| + m + 2⟨a_i, b_j⟩): the |a_i|
  term cancels per row and the padding makes the |b_j| term a constant; the extra key
  −σ[0^m, 1^m] has ‖q_i − k‖² = σ²(|a_i| + m). With 2sσ² = C, s = 1/(2m), the log-weights are
  those of the softmax reduction. Dimension 2m.
* Gap-Hamming → softmax attention (Alman–Song, NeurIPS 2023): ±1 encodings x̃ = 2x − 1,
  ⟨x̃, ỹ⟩ = d − 2·Ham(x, y); q_i = σ[ã_i, 1^{d−2t}], k_j = σ[b̃_j, 0^{d−2t}], extra key
  σ[0^d, 1^{d−2t}], s = 1/d: x_ij = σ²(1 − 2H_ij/d), the extra key's τ = σ²(1 − 2t/d) equals a
  pair at distance t, and far pairs (H ≥ (1+γ)t) sit ≥ 2σ²γt/d below it. σ² = d·ln(4n)/(2γt)
  makes that gap ln(4n); with t = Θ(d) this is B = σ = Θ(√log n) — the Alman–Song threshold.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .. import api
from ..certificate import Certificate
from .instances import GapHammingInstance, OVInstance

THRESHOLD = 0.65
MARGIN = 0.15


@dataclass(frozen=True)
class Reduction:
    """One attention call that decides a combinatorial instance."""

    problem: str
    kind: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    entry_bound: float
    threshold: float
    margin: float
    meta: dict = field(default_factory=dict)

    def _column(self, out: torch.Tensor) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or out.shape[-2:] != (self.q.shape[-2], 1):
            raise ValueError(f"out must be the attention output of shape ({self.q.shape[-2]}, 1)")
        return out[..., 0].double()

    def decide(self, out: torch.Tensor) -> bool:
        """Yes (a hit exists) iff some row's output falls below the threshold."""
        return bool((self._column(out) < self.threshold).any())

    def witness(self, out: torch.Tensor) -> int | None:
        """The query row with the smallest output, when the answer is yes."""
        col = self._column(out)
        return int(col.argmin()) if bool((col < self.threshold).any()) else None

    def row_margins(self, out: torch.Tensor) -> torch.Tensor:
        """Signed distance of each row's output from the threshold (negative = hit side)."""
        return self._column(out) - self.threshold


def _check_kind(kind):
    if kind not in ("softmax", "l2"):
        raise ValueError(f"kind must be 'softmax' or 'l2', got {kind!r}")


def ov_to_attention(inst: OVInstance, *, kind: str = "softmax") -> Reduction:
    """Keles et al.'s OV → attention reduction (softmax or ℓ2 kind); see the module docstring."""
    if not isinstance(inst, OVInstance):
        raise TypeError(f"inst must be an OVInstance, got {type(inst).__name__}")
    _check_kind(kind)
    n, m = inst.n, inst.m
    n_keys = inst.B.shape[0]
    C = math.log(4 * max(n_keys, 1))
    A, B = inst.A.double(), inst.B.double()
    if kind == "softmax":
        scale = 1.0 / m
        sigma = math.sqrt(C / scale)
        q = -sigma * A
        k = torch.cat([sigma * B, torch.zeros(1, m, dtype=torch.float64)])
    else:
        scale = 1.0 / (2 * m)
        sigma = math.sqrt(C / (2 * scale))
        pad = (torch.arange(m, dtype=torch.float64) < (m - B.sum(1, keepdim=True))).double()
        q = sigma * torch.cat([A, torch.zeros(n, m, dtype=torch.float64)], 1)
        k = -sigma * torch.cat([torch.cat([B, pad], 1),
                                torch.cat([torch.zeros(1, m, dtype=torch.float64),
                                           torch.ones(1, m, dtype=torch.float64)], 1)])
    v = torch.zeros(n_keys + 1, 1, dtype=torch.float64)
    v[-1] = 1.0
    meta = {"n": n, "m": m, "C": C, "sigma": sigma, "B_over_sqrt_ln_n": sigma / math.sqrt(math.log(max(n, 2))),
            "B_over_ln_n": sigma / math.log(max(n, 2)), "dim": q.shape[-1]}
    return Reduction("ov", kind, q, k, v, scale, sigma, THRESHOLD, MARGIN, meta)


def gap_hamming_to_attention(inst: GapHammingInstance, *, scale: float | None = None) -> Reduction:
    """Alman–Song's gap-Hamming close pair → softmax attention; see the module docstring.

    ``scale`` defaults to 1/d (Alman–Song's setting); σ is then chosen from (n, d, t, γ) so the
    far pairs sit ln(4n) below a close pair, and the builder reports B = σ and B/√(ln n).
    """
    if not isinstance(inst, GapHammingInstance):
        raise TypeError(f"inst must be a GapHammingInstance, got {type(inst).__name__}")
    n, d, t, gamma = inst.n, inst.d, inst.t, inst.gamma
    s = 1.0 / d if scale is None else float(scale)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"scale must be positive and finite, got {scale!r}")
    n_keys = inst.B.shape[0]
    gap = math.log(4 * n_keys)
    sigma = math.sqrt(gap / (2 * s * gamma * t))
    pad = d - 2 * t
    a = 2 * inst.A.double() - 1
    b = 2 * inst.B.double() - 1
    if pad >= 0:  # extra coordinates lift the extra key's score to τ = sσ²(d − 2t)
        q = sigma * torch.cat([a, torch.ones(n, pad, dtype=torch.float64)], 1)
        k = sigma * torch.cat([torch.cat([b, torch.zeros(n_keys, pad, dtype=torch.float64)], 1),
                               torch.cat([torch.zeros(1, d, dtype=torch.float64),
                                          torch.ones(1, pad, dtype=torch.float64)], 1)])
    else:  # t > d/2: τ < 0, realised with −1 entries
        q = sigma * torch.cat([a, torch.ones(n, -pad, dtype=torch.float64)], 1)
        k = sigma * torch.cat([torch.cat([b, torch.zeros(n_keys, -pad, dtype=torch.float64)], 1),
                               torch.cat([torch.zeros(1, d, dtype=torch.float64),
                                          -torch.ones(1, -pad, dtype=torch.float64)], 1)])
    v = torch.zeros(n_keys + 1, 1, dtype=torch.float64)
    v[-1] = 1.0
    meta = {"n": n, "d": d, "t": t, "gamma": gamma, "gap": gap, "sigma": sigma,
            "B_over_sqrt_ln_n": sigma / math.sqrt(math.log(max(n, 2))), "dim": q.shape[-1]}
    return Reduction("gap_hamming", "softmax", q, k, v, s, sigma, THRESHOLD, MARGIN, meta)


@dataclass(frozen=True)
class Decision:
    answer: bool
    witness: int | None
    out_margin: float  # min over rows of |out_i − threshold|
    certificate: Certificate
    seconds: float
    certified: bool  # the certificate's output bound is below the decision margin


def solve_via_attention(reduction: Reduction, method: str = "exact", **attention_kwargs) -> Decision:
    """Run ``attnbound.attention`` as the oracle and read off the answer.

    For an approximate method whose certificate exceeds the decision margin (or that cannot be
    certified at all, η ≥ 1), the answer is still computed — with ``strict=False`` — and flagged
    ``certified=False``: it may be wrong.
    """
    if not isinstance(reduction, Reduction):
        raise TypeError(f"reduction must be a Reduction, got {type(reduction).__name__}")
    attention_kwargs.setdefault("strict", False)
    t0 = time.perf_counter()
    out, cert = api.attention(reduction.q, reduction.k, reduction.v, scale=reduction.scale, kind=reduction.kind,
                              method=method, return_certificate=True, **attention_kwargs)
    seconds = time.perf_counter() - t0
    margins = reduction.row_margins(out)
    return Decision(
        answer=reduction.decide(out),
        witness=reduction.witness(out),
        out_margin=float(margins.abs().min()),
        certificate=cert,
        seconds=seconds,
        certified=cert.output_error_bound < reduction.margin,
    )
