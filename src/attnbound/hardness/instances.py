"""Combinatorial instances behind the SETH lower bounds, with brute-force solvers.

* Orthogonal Vectors (OV): A, B ⊂ {0,1}^m, |A| = |B| = n; is there a ∈ A, b ∈ B with ⟨a, b⟩ = 0?
  Under SETH no n^{2−ε}·poly(m) algorithm exists for m = ω(log n) (Williams 2005); Keles et al.
  reduce it to exact (and approximate) self-attention.
* Gap-Hamming close pair: A, B ⊂ {0,1}^d with the promise that either some pair has Hamming
  distance ≤ t, or every pair has distance ≥ (1+γ)t. Hard for d = Θ(log n) under SETH
  (Rubinstein 2018); Alman–Song reduce it to approximate attention with entries Θ(√log n).

Brute force is vectorised with matrix products: ⟨a, b⟩ = (A Bᵀ)_ab and
Ham(a, b) = |a| + |b| − 2⟨a, b⟩, in row chunks — O(n² m) work, O(chunk·n) memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_CHUNK = 2048


def _as_binary(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of 0/1 entries, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must have shape (n, m) with n, m >= 1, got {tuple(x.shape)}")
    if x.dtype != torch.bool:
        if x.is_floating_point() or x.is_complex() or not bool(((x == 0) | (x == 1)).all()):
            raise ValueError(f"{name} must hold only 0/1 entries (bool or integer dtype)")
    return x.to(torch.uint8)


def _inner_products(A: torch.Tensor, B: torch.Tensor):
    """Yield (row offset, A[i0:i1] @ Bᵀ) in float64 (exact for integer entries below 2^53)."""
    Bd = B.double()
    for i0 in range(0, A.shape[0], _CHUNK):
        yield i0, A[i0 : i0 + _CHUNK].double() @ Bd.T


@dataclass(frozen=True)
class OVInstance:
    """Sets A, B ⊂ {0,1}^m given as (n_a, m) and (n_b, m) 0/1 tensors."""

    A: torch.Tensor
    B: torch.Tensor

    def __post_init__(self):
        A, B = _as_binary("A", self.A), _as_binary("B", self.B)
        if A.shape[1] != B.shape[1]:
            raise ValueError(f"A and B must have the same dimension m, got {A.shape[1]} and {B.shape[1]}")
        object.__setattr__(self, "A", A)
        object.__setattr__(self, "B", B)

    @property
    def n(self) -> int:
        return self.A.shape[0]

    @property
    def m(self) -> int:
        return self.A.shape[1]


def solve_ov(inst: OVInstance) -> tuple[bool, tuple[int, int] | None]:
    """Brute force: (is there an orthogonal pair, the first such (i, j) in row-major order)."""
    if not isinstance(inst, OVInstance):
        raise TypeError(f"inst must be an OVInstance, got {type(inst).__name__}")
    for i0, G in _inner_products(inst.A, inst.B):
        hits = (G == 0).nonzero()
        if len(hits):
            return True, (i0 + int(hits[0, 0]), int(hits[0, 1]))
    return False, None


def _repair_ov(A, B, gen, keep=None):
    """Add 1s (never remove) until no pair other than ``keep`` is orthogonal: inner products only grow."""
    m = A.shape[1]
    for _ in range(10_000):
        pairs = []
        for i0, G in _inner_products(A, B):
            z = (G == 0).nonzero()
            z[:, 0] += i0
            pairs.append(z)
        z = torch.cat(pairs)
        if keep is not None:
            z = z[~((z[:, 0] == keep[0]) & (z[:, 1] == keep[1]))]
        if not len(z):
            return
        if keep is None:
            c = torch.randint(0, m, (len(z),), generator=gen)
            A[z[:, 0], c] = 1
            B[z[:, 1], c] = 1
            continue
        i_star, j_star = keep
        supp_a = A[i_star].nonzero().flatten()
        supp_b = B[j_star].nonzero().flatten()
        for i, j in z.tolist():
            if i == i_star:  # b_j orthogonal to the planted a: give b_j a 1 where a_{i*} has one
                B[j, supp_a[torch.randint(0, len(supp_a), (1,), generator=gen)]] = 1
            elif j == j_star:
                A[i, supp_b[torch.randint(0, len(supp_b), (1,), generator=gen)]] = 1
            else:
                c = int(torch.randint(0, m, (1,), generator=gen))
                A[i, c] = 1
                B[j, c] = 1
    raise RuntimeError("OV repair did not converge")  # pragma: no cover - each step removes a pair


def ov_instance(n: int, m: int, *, planted: bool, seed: int | None = None, density: float = 0.5) -> OVInstance:
    """A random OV instance with exactly one orthogonal pair (``planted=True``) or none.

    Vectors are i.i.d. Bernoulli(``density``). Orthogonal pairs are then *repaired*: for each
    one, a coordinate c is set to 1 in both vectors (adding 1s can only raise inner products, so
    this never creates a new orthogonal pair and terminates). With ``planted=True`` a random pair
    (i*, j*) is rebuilt on disjoint non-empty supports and every other pair orthogonal to a_{i*}
    or b_{j*} is repaired on a coordinate of the planted vectors' supports, so (i*, j*) stays the
    only orthogonal pair. Needs m ≥ 2 when planted.
    """
    for name, val in (("n", n), ("m", m)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if planted and m < 2:
        raise ValueError(f"m must be >= 2 for a planted instance (two disjoint non-empty supports), got {m}")
    if not 0.0 < density < 1.0:
        raise ValueError(f"density must be in (0, 1), got {density}")
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**63)
    A = (torch.rand(n, m, generator=gen) < density).to(torch.uint8)
    B = (torch.rand(n, m, generator=gen) < density).to(torch.uint8)
    if not planted:
        _repair_ov(A, B, gen)
        return OVInstance(A, B)
    i_star = int(torch.randint(0, n, (1,), generator=gen))
    j_star = int(torch.randint(0, n, (1,), generator=gen))
    perm = torch.randperm(m, generator=gen)
    split = int(torch.randint(1, m, (1,), generator=gen))
    a_supp, b_supp = perm[:split], perm[split:]
    A[i_star] = 0
    B[j_star] = 0
    A[i_star, a_supp] = (torch.rand(len(a_supp), generator=gen) < density).to(torch.uint8)
    B[j_star, b_supp] = (torch.rand(len(b_supp), generator=gen) < density).to(torch.uint8)
    A[i_star, a_supp[0]] = 1
    B[j_star, b_supp[0]] = 1
    _repair_ov(A, B, gen, keep=(i_star, j_star))
    return OVInstance(A, B)


@dataclass(frozen=True)
class GapHammingInstance:
    """A, B ⊂ {0,1}^d with the promise: some pair at distance ≤ t, or all pairs ≥ (1+γ)t.

    The promise is checked on construction (one brute-force pass): an instance with a pair in the
    gap (t, (1+γ)t) is rejected.
    """

    A: torch.Tensor
    B: torch.Tensor
    t: int
    gamma: float

    def __post_init__(self):
        A, B = _as_binary("A", self.A), _as_binary("B", self.B)
        if A.shape[1] != B.shape[1]:
            raise ValueError(f"A and B must have the same dimension d, got {A.shape[1]} and {B.shape[1]}")
        d = A.shape[1]
        if isinstance(self.t, bool) or not isinstance(self.t, int) or not 1 <= self.t < d:
            raise ValueError(f"t must be an int in 1..d-1 = 1..{d - 1}, got {self.t!r}")
        if not (isinstance(self.gamma, (int, float)) and math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma must be a positive float, got {self.gamma!r}")
        if (1 + self.gamma) * self.t > d:
            raise ValueError(f"(1+gamma)*t = {(1 + self.gamma) * self.t:g} exceeds d = {d}: no far pair can exist")
        object.__setattr__(self, "A", A)
        object.__setattr__(self, "B", B)
        lo = float("inf")
        bad = 0
        for _, H in _hamming(A, B):
            lo = min(lo, float(H.min()))
            bad += int(((H > self.t) & (H < (1 + self.gamma) * self.t)).sum())
        if bad and lo > self.t:
            raise ValueError(f"instance violates the gap promise: no pair at distance <= t={self.t}, but {bad} "
                             f"pairs lie strictly between t and (1+gamma)t={(1 + self.gamma) * self.t:g}")

    @property
    def n(self) -> int:
        return self.A.shape[0]

    @property
    def d(self) -> int:
        return self.A.shape[1]


def _hamming(A, B):
    wa = A.double().sum(1, keepdim=True)
    wb = B.double().sum(1)
    for i0, G in _inner_products(A, B):
        yield i0, wa[i0 : i0 + _CHUNK] + wb - 2 * G


def solve_gap_hamming(inst: GapHammingInstance) -> tuple[bool, tuple[int, int] | None]:
    """Brute force: (is some pair at Hamming distance ≤ t, the closest such pair)."""
    if not isinstance(inst, GapHammingInstance):
        raise TypeError(f"inst must be a GapHammingInstance, got {type(inst).__name__}")
    best, where = float("inf"), None
    for i0, H in _hamming(inst.A, inst.B):
        v, idx = H.flatten().min(0)
        if float(v) < best:
            best, where = float(v), (i0 + int(idx) // H.shape[1], int(idx) % H.shape[1])
    return (True, where) if best <= inst.t else (False, None)


def gap_hamming_instance(n: int, d: int, *, t: int, gamma: float, planted: bool, seed: int | None = None,
                         max_rounds: int = 200) -> GapHammingInstance:
    """A random gap-Hamming instance satisfying the promise.

    Vectors are uniform in {0,1}^d. Every pair closer than (1+γ)t is removed by *resampling*
    one of its vectors (never a planted one) until none is left; with ``planted=True`` a random
    pair (i*, j*) is set to distance exactly t first. Fails with a ValueError when resampling
    cannot meet the promise (raise d or lower (1+γ)t; uniform pairs sit at d/2 ± √d/2).
    """
    for name, val in (("n", n), ("d", d)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t < d:
        raise ValueError(f"t must be an int in 1..d-1 = 1..{d - 1}, got {t!r}")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a positive float, got {gamma!r}")
    if (1 + gamma) * t > d:
        raise ValueError(f"(1+gamma)*t = {(1 + gamma) * t:g} exceeds d = {d}")
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**63)
    A = torch.randint(0, 2, (n, d), generator=gen, dtype=torch.uint8)
    B = torch.randint(0, 2, (n, d), generator=gen, dtype=torch.uint8)
    keep = None
    if planted:
        i_star = int(torch.randint(0, n, (1,), generator=gen))
        j_star = int(torch.randint(0, n, (1,), generator=gen))
        B[j_star] = A[i_star]
        flip = torch.randperm(d, generator=gen)[:t]
        B[j_star, flip] ^= 1
        keep = (i_star, j_star)
    far = (1 + gamma) * t
    for _ in range(max_rounds):
        bad_a, bad_b = set(), set()
        for i0, H in _hamming(A, B):
            for i, j in (H < far).nonzero().tolist():
                i += i0
                if keep and (i, j) == keep:
                    continue
                if keep and j == keep[1]:
                    bad_a.add(i)  # never touch the planted pair: resample the other side
                else:
                    bad_b.add(j)
        if not bad_a and not bad_b:
            return GapHammingInstance(A, B, t, float(gamma))
        if bad_a:
            idx = torch.tensor(sorted(bad_a))
            A[idx] = torch.randint(0, 2, (len(idx), d), generator=gen, dtype=torch.uint8)
        if bad_b:
            idx = torch.tensor(sorted(bad_b))
            B[idx] = torch.randint(0, 2, (len(idx), d), generator=gen, dtype=torch.uint8)
    raise ValueError(f"could not sample {n} pairs all at distance >= (1+gamma)t = {far:g} in d = {d} "
                     f"dimensions; raise d or lower t/gamma")
