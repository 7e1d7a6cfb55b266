"""The monomial order: the one place that says which feature sits at which index.

Every feature engine (the torch engine, the fused kernels, the decoding state, the distributed
paths) computes with φ(x) = (x^α)_{|α| ≤ g}, the bare monomials of degree ≤ g in d variables, in
one order, defined here once:

    degree 0 is the constant 1; the degree-j monomials come next, in d blocks: block i holds the
    degree-j monomials whose largest variable is x_i, and they are x_i times the first
    C(i + j − 1, j − 1) monomials of degree j − 1 (exactly those whose largest variable is ≤ i).

So degree j starts at index C(d + j − 1, j − 1), its block i at C(d + j − 1, j − 1) + C(i + j − 1, j),
and the rank is r(d, g) = Σ_{j≤g} C(d + j − 1, j) = C(d + g, g). Everything else here is derived from
:func:`degree_blocks`: the exponent table (tests), the multinomials |α|!/α! (the weights
w_α = a_{|α|}·|α|!/α! that turn P(⟨q, k⟩) into ⟨φ(q) ⊙ w, φ(k)⟩), the torch feature builder, the
gather plan of a few rows (decoding), and the depth-first walk of the fused kernels. Cost of each
table: O(r) time and memory (never the r × d exponent table outside the tests).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch


def feature_rank(d: int, degree: int) -> int:
    """r(d, g) = C(d+g, g): the number of monomials of degree ≤ g in d variables."""
    return math.comb(d + degree, degree)


def degree_start(d: int, j: int) -> int:
    """Index of the first degree-j monomial: C(d + j − 1, j − 1) (0 for the constant)."""
    return math.comb(d + j - 1, j - 1) if j else 0


def degree_blocks(d: int, j: int) -> list[tuple[int, int]]:
    """The order of degree j ≥ 1: (variable i, count) per block, the block being x_i times the first
    ``count`` = C(i + j − 1, j − 1) monomials of degree j − 1."""
    return [(i, math.comb(i + j - 1, j - 1)) for i in range(d)]


@lru_cache(maxsize=8)
def monomial_exponents(d: int, degree: int) -> np.ndarray:
    """Exponent vectors α (r, d) of the engine's monomials, in the order the features use."""
    blocks = [np.zeros((1, d), dtype=np.int64)]
    for j in range(1, degree + 1):
        prev = blocks[-1]
        parts = []
        for i, c in degree_blocks(d, j):
            part = prev[:c].copy()
            part[:, i] += 1
            parts.append(part)
        blocks.append(np.concatenate(parts))
    return np.concatenate(blocks)


@lru_cache(maxsize=16)
def multinomials(d: int, degree: int) -> tuple[np.ndarray, np.ndarray]:
    """(|α|!/α!, |α|) for every monomial, in O(r) memory (never the r × d exponent table).

    A degree-j monomial with largest variable i is x_i times a degree-(j−1) monomial α' whose largest
    variable is ≤ i, so |α|!/α! = |α'|!/α'! · j / (α'_i + 1), where α'_i is α''s exponent of x_i (its
    top exponent when its largest variable is i, else 0).
    """
    multi = [np.ones(1)]
    top_var = [np.full(1, -1, dtype=np.int64)]  # largest variable of each monomial (−1 for the constant)
    top_exp = [np.zeros(1, dtype=np.int64)]  # its exponent
    for j in range(1, degree + 1):
        pm, pv, pe = multi[-1], top_var[-1], top_exp[-1]
        m_parts, v_parts, e_parts = [], [], []
        for i, c in degree_blocks(d, j):
            e = np.where(pv[:c] == i, pe[:c], 0) + 1
            m_parts.append(np.rint(pm[:c] * j / e))
            v_parts.append(np.full(c, i, dtype=np.int64))
            e_parts.append(e)
        multi.append(np.concatenate(m_parts))
        top_var.append(np.concatenate(v_parts))
        top_exp.append(np.concatenate(e_parts))
    total = np.concatenate([np.full(len(m), j, dtype=np.int64) for j, m in enumerate(multi)])
    return np.concatenate(multi), total


def monomial_weights(coeffs: np.ndarray, d: int) -> np.ndarray:
    """w_α = a_{|α|}·|α|!/α! for every monomial of the engine order."""
    degree = len(coeffs) - 1
    multi, total = multinomials(d, degree)
    return np.asarray(coeffs, dtype=np.float64)[total] * multi


def monomial_features(x: torch.Tensor, degree: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bare monomials of the rows of x (..., n, d), returned transposed as (..., r, n).

    ``out`` (..., r, ≥ n), if given, is a buffer reused across chunks (no-grad path): the features are
    written into its first n columns, so a long sequence allocates one feature block, not one per chunk.
    Degree by degree without index gathers: d contiguous row-broadcast multiplies per degree.
    """
    d = x.shape[-1]
    xt = x.transpose(-1, -2)
    if torch.is_grad_enabled() and x.requires_grad:
        blocks = [torch.ones_like(xt[..., :1, :])]
        for j in range(1, degree + 1):
            prev = blocks[-1]
            blocks.append(torch.cat([prev[..., :c, :] * xt[..., i: i + 1, :] for i, c in degree_blocks(d, j)], -2))
        return torch.cat(blocks, -2)
    xt = xt.contiguous()
    r = feature_rank(d, degree)
    if out is None:
        out = torch.empty((*x.shape[:-2], r, x.shape[-2]), dtype=x.dtype, device=x.device)
    else:
        out = out[..., : x.shape[-2]]
    out[..., 0, :] = 1.0
    prev_off, off = 0, 1
    for j in range(1, degree + 1):
        start = off
        for i, c in degree_blocks(d, j):
            torch.mul(out[..., prev_off: prev_off + c, :], xt[..., i: i + 1, :], out=out[..., off: off + c, :])
            off += c
        prev_off = start
    return out


def gather_plan(d: int, degree: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per degree j ≥ 1: (parent rows, variables) such that φ_m = φ_parent(m)·x_var(m) for the block of degree j."""
    plan = []
    for j in range(1, degree + 1):
        prev_off = degree_start(d, j - 1)
        parents, variables = [], []
        for i, c in degree_blocks(d, j):
            parents += range(prev_off, prev_off + c)
            variables += [i] * c
        plan.append((torch.tensor(parents, device=device), torch.tensor(variables, device=device)))
    return plan


def few_row_features(x: torch.Tensor, plan) -> torch.Tensor:
    """The engine's monomial features of a few rows x (..., t, d) as (..., r, t): one gather and one multiply
    per degree (:func:`gather_plan`) instead of d small multiplies (a few rows are launch-bound, not flop-bound)."""
    xt = x.transpose(-1, -2)
    feats = torch.ones_like(xt[..., :1, :])
    for parents, variables in plan:
        feats = torch.cat([feats, feats.index_select(-2, parents) * xt.index_select(-2, variables)], -2)
    return feats


# ----------------------------------------------------------------------------------------------
# the depth-first walk of the fused kernels (the same monomials, visited parent before child)


@lru_cache(maxsize=16)
def _dfs(d: int, degree: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Depth-first walk: (engine index, degree, variable, |α|!/α!) per non-constant monomial.

    In the order above the child m·x_i of a degree-(j − 1) monomial at position p of its degree sits at
    position C(i + j − 1, j) + p of degree j, i.e. at index :func:`degree_start` (d, j) + C(i + j − 1, j) + p.
    Its multinomial is the parent's times j / (e + 1), e the parent's exponent of x_i.
    """
    comb = math.comb
    order = []
    work = [(0, 0, 0, 0, 1)]  # (position in its degree, largest variable, degree, its exponent, |α|!/α!)
    while work:  # a stack: children pushed largest variable first, so the smallest is visited first
        pos, maxvar, depth, top, multi = work.pop()
        if depth:
            order.append((degree_start(d, depth) + pos, depth, maxvar, multi))
        if depth < degree:
            j = depth + 1
            for i in range(d - 1, maxvar - 1, -1):
                e = top if (i == maxvar and depth) else 0
                work.append((comb(i + j - 1, j) + pos, i, j, e + 1, multi * j // (e + 1)))
    arr = np.array([o[:3] for o in order], dtype=np.int64).reshape(-1, 3)
    multi = np.array([float(o[3]) for o in order], dtype=np.float64)
    return (np.ascontiguousarray(arr[:, 0]), np.ascontiguousarray(arr[:, 1]), np.ascontiguousarray(arr[:, 2]),
            multi)


def dfs_order(d: int, degree: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The non-constant monomials in depth-first order: (engine index, degree, variable multiplied in).

    The parent of entry m (degree j, variable i) is the latest earlier entry of degree j − 1 (the
    constant monomial for j = 1); the engine index is where :func:`monomial_features` puts the same monomial.
    """
    return _dfs(d, degree)[:3]


@lru_cache(maxsize=64)
def dfs_items(d: int, degree: int) -> np.ndarray:
    """:func:`dfs_order` with consecutive sibling leaves paired: rows (index, degree, variable,
    second index or −1, second variable). A pair shares its parent's vector and one pass over the tile."""
    idx, dep, var = dfs_order(d, degree)
    rows, m = [], 0
    while m < len(idx):
        if dep[m] == degree and m + 1 < len(idx) and dep[m + 1] == degree:  # siblings: same parent
            rows.append((idx[m], dep[m], var[m], idx[m + 1], var[m + 1]))
            m += 2
        else:
            rows.append((idx[m], dep[m], var[m], -1, 0))
            m += 1
    return np.array(rows, dtype=np.int64).reshape(-1, 5)


@lru_cache(maxsize=64)
def fused_items(d: int, degree: int) -> np.ndarray:
    """:func:`dfs_items` with each interior monomial (degree < g) joined to the item right after it (its
    first child, one monomial or a pair of sibling leaves): the two share one pass over the tile — in the
    readout one read and write of the tile's (d_v + 1) × T outputs, in the key state one load of its
    [V, 1] — where a lone interior monomial pays that pass for d_v + 1 multiply-adds. Rows (index, degree, variable,
    second index or −1, second variable, child index or −1, child variable, child's second index or −1,
    child's second variable); a child pair's parent vector is the interior monomial's own."""
    base = dfs_items(d, degree)
    rows, m = [], 0
    while m < len(base):
        a, j, i, a2, i2 = (int(x) for x in base[m])
        if a2 < 0 and j < degree and m + 1 < len(base) and int(base[m + 1, 1]) == j + 1:
            b, _, ib, b2, ib2 = (int(x) for x in base[m + 1])
            rows.append((a, j, i, -1, 0, b, ib, b2, ib2))
            m += 2
        else:
            if j < degree:  # the kernels have no pass for an interior monomial on its own
                raise AssertionError(f"interior monomial {a} not followed by its first child")
            rows.append((a, j, i, a2, i2, -1, 0, -1, 0))
            m += 1
    return np.array(rows, dtype=np.int64).reshape(-1, 9)


@lru_cache(maxsize=16)
def _degree_structure(d: int, degree: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(|α|, |α|!/α!, engine index of x_0^j for j = 0..g) for the engine's monomials."""
    idx, dep, _, multi_dfs = _dfs(d, degree)
    r = feature_rank(d, degree)
    total = np.zeros(r, dtype=np.int64)
    multi = np.ones(r, dtype=np.float64)
    total[idx], multi[idx] = dep, multi_dfs
    first = np.array([degree_start(d, j) for j in range(degree + 1)], dtype=np.int64)
    return total, multi, first


def polynomial_of_weights(weights: np.ndarray, d: int, degree: int) -> np.ndarray | None:
    """a_0..a_g when w_α = a_{|α|}·|α|!/α! (to 1e-14 relative), else None."""
    total, multi, first = _degree_structure(d, degree)
    a = weights[first]  # x_0^j has |α|!/α! = 1
    expect = a[total] * multi
    if np.all(np.abs(weights - expect) <= 1e-14 * np.abs(expect)):
        return np.ascontiguousarray(a, dtype=np.float64)
    return None
