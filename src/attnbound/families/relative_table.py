"""The offline builder of the relative-error table: Remez exchange and the proved bound.

Run once (minutes) to recompute and prove ``data/relative_table.npz``::

    python -m attnbound.families.relative_table --build

The theorem behind each stored η and the rescaling used at run time are in
:mod:`attnbound.families.relative`, which only reads the table; this module holds what builds it:
:func:`remez` (the weighted minimax polynomial), :func:`relative_error_bound` (the proof over dyadic
pieces in integer fixed point) and :func:`build_table`.
"""

from __future__ import annotations

import argparse
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
from numpy.polynomial import chebyshev as npcheb

from .chebyshev import chebyshev_to_monomial
from .relative import _F, MAX_DEGREE, TABLE_PATH, _ceil_div, _dyadic, _exp_interval, _fraction_up, grid_radii

_D = 60  # piece end points are multiples of 2^-_D
_TARGET = 1.03  # refine pieces until the bound is within this factor of the centre maximum

# --------------------------------------------------------------------------------------------------
# the rigorous bound


def _piece(coeffs_int: list[int], e0: int, r_num: int, r_exp: int, lo: int, hi: int,
           order: int | None = None) -> tuple[Fraction, float]:
    """(upper bound of max |P(u) e^{−Ru} − 1| on [lo, hi]·2^−_D, a lower bound of |r| at the centre).

    ``coeffs_int``: P(u) = Σ A_j u^j / 2^e0. R = r_num / 2^r_exp. ``order``: the power M after which the
    series of e^{−zs} is cut (default: where its tail falls below 2^−100); the tail is always added.
    """
    g = len(coeffs_int) - 1
    d1 = _D + 1
    C, H = lo + hi, hi - lo  # c = C/2^d1, h = H/2^d1
    # exact Taylor shift: B(s) = 2^{e0 + d1 g} · P(c + h s)
    B = [coeffs_int[g]]
    for j in range(g - 1, -1, -1):
        nb = [C * b for b in B] + [0]
        for k, b in enumerate(B):
            nb[k + 1] += H * b
        nb[0] += coeffs_int[j] << (d1 * (g - j))
        B = nb
    scale = e0 + d1 * g  # b_k = B_k / 2^scale
    sh = scale - _F
    Bf = [(b >> sh) if sh >= 0 else (b << -sh) for b in B]  # floor(b_k 2^F), error < 1 unit
    # z = R h = Z / 2^ez
    Z, ez = r_num * H, r_exp + d1
    zf = Z / 2.0**ez
    if order is None:
        M, t = 0, 1.0
        while t > 2.0**-100 or M < 2:
            M += 1
            t *= zf / M
    else:
        M = order
    # W_m = floor((−z)^m/m! · 2^F), m = 0..M
    W = []
    num, den = 1, 1
    for m in range(M + 1):
        if m:
            num *= -Z
            den *= m << ez
        W.append((num << _F) // den)
    # tail factor t_{M+1} = z^{M+1}/(M+1)! / (1 − z/(M+2)), rounded up (units 2^-F)
    tn = abs(num) * Z  # z^{M+1} numerator
    td = den * ((M + 1) << ez)
    # divide by (1 − z/(M+2)) = ((M+2) 2^ez − Z)/((M+2) 2^ez)
    q = ((M + 2) << ez) - Z
    if q <= 0:
        raise ValueError("piece too wide for the series bound (z ≥ M + 2)")
    tail_fx = _ceil_div((tn << _F) * ((M + 2) << ez), td * q)
    # σ̃_n (units 2^-2F) with rounding allowance
    sum_abs = 0
    for n in range(1, g + M + 1):
        s = 0
        err = 0
        for k in range(max(0, n - M), min(n, g) + 1):
            w = W[n - k]
            s += Bf[k] * w
            err += abs(w) + abs(Bf[k]) + 1
        sum_abs += abs(s) + err
    babs = sum(abs(b) + 1 for b in Bf)
    sum_abs += babs * tail_fx
    # e^{−Rc}: y = −R c = −r_num C / 2^{r_exp + d1}
    Lx, Ux = _exp_interval(-r_num * C, r_exp + d1, _F)
    one = 1 << (_F + scale)
    B0 = B[0]
    v1, v2 = Lx * B0 - one, Ux * B0 - one  # units 2^-(F + scale)
    first = max(abs(v1), abs(v2))
    centre_low = 0 if (v1 <= 0 <= v2 or v2 <= 0 <= v1) else min(abs(v1), abs(v2))
    bound = Fraction(first, one) + Fraction(Ux * sum_abs, 1 << (3 * _F))
    return bound, float(Fraction(centre_low, one))


def _prepare(coefficients) -> tuple[list[int], int]:
    pairs = [_dyadic(float(a)) for a in coefficients]
    e0 = max(e for _, e in pairs)
    return [n << (e0 - e) for n, e in pairs], e0


def relative_error_bound(coefficients, radius: float, *, pieces: int | None = None,
                         order: int | None = None, refine: bool = True) -> tuple[float, float]:
    """Proved bound on max_{|u|≤1} |P(u)·e^{−radius·u} − 1| for P(u) = Σ_j coefficients[j] u^j.

    Returns ``(upper, lower)``: ``upper`` is a float64 ≥ the real maximum (the theorem in the module
    docstring, evaluated in integer arithmetic); ``lower`` is the largest |r| proved at a piece centre,
    so lower ≤ max ≤ upper. ``pieces``, ``order`` and ``refine`` expose the subdivision and the series
    order (the bound is valid for any choice; defaults make it tight). Cost: O(pieces·g·(g + M)) integer
    operations.
    """
    coeffs = np.asarray(coefficients, dtype=np.float64)
    if coeffs.ndim != 1 or coeffs.size == 0 or not np.all(np.isfinite(coeffs)):
        raise ValueError("coefficients must be a non-empty 1-D array of finite floats")
    radius = float(radius)
    if not (math.isfinite(radius) and radius >= 0):
        raise ValueError(f"radius must be finite and >= 0, got {radius}")
    g = coeffs.size - 1
    A, e0 = _prepare(coeffs)
    r_num, r_exp = _dyadic(radius)
    if pieces is None:
        pieces = max(3 * (g + 2), int(math.ceil(math.pi * radius)) + 1, 8)
    # Chebyshev-spaced end points, rounded to multiples of 2^-40 (bisection stays dyadic)
    ends = sorted({int(round(-math.cos(math.pi * i / pieces) * 2**40)) << (_D - 40) for i in range(pieces + 1)})
    ends[0], ends[-1] = -(1 << _D), 1 << _D
    work = [(a, b) for a, b in zip(ends[:-1], ends[1:])]
    results = []
    for a, b in work:
        results.append(((a, b),) + _piece(A, e0, r_num, r_exp, a, b, order))
    lower = max(r[2] for r in results)
    for _ in range(24 if refine else 0):
        top = max(r[1] for r in results)
        if top <= _TARGET * lower:
            break
        thr = max(_TARGET * lower, float(top) * 0.5) if top > 4 * lower else _TARGET * lower
        new = []
        for (a, b), ub, cl in results:
            if float(ub) > thr and b - a >= 2:
                m = (a + b) >> 1
                new.append(((a, m),) + _piece(A, e0, r_num, r_exp, a, m, order))
                new.append(((m, b),) + _piece(A, e0, r_num, r_exp, m, b, order))
            else:
                new.append(((a, b), ub, cl))
        results = new
        lower = max(lower, max(r[2] for r in results))
    upper = max(r[1] for r in results)
    return _fraction_up(upper), lower


# --------------------------------------------------------------------------------------------------
# the Remez exchange (finds the polynomial; proves nothing)


def _alternating_extrema(u: np.ndarray, r: np.ndarray, n: int) -> np.ndarray | None:
    sign = np.sign(r)
    sign[sign == 0] = 1
    cuts = np.flatnonzero(np.diff(sign)) + 1
    segs = np.split(np.arange(u.size), cuts)
    idx = [s[np.argmax(np.abs(r[s]))] for s in segs]
    while len(idx) > n:
        if (len(idx) - n) % 2 == 1:
            idx.pop(0 if abs(r[idx[0]]) < abs(r[idx[-1]]) else -1)
        else:
            pair = min(range(len(idx) - 1), key=lambda i: max(abs(r[idx[i]]), abs(r[idx[i + 1]])))
            del idx[pair:pair + 2]
    if len(idx) < n:
        return None
    return u[np.array(idx)]


def remez(radius: float, degree: int, *, reference: np.ndarray | None = None,
          iterations: int = 40) -> tuple[np.ndarray, float, np.ndarray]:
    """Near-minimax P for min max_{|u|≤1} |P(u)e^{−Ru} − 1| by the Remez exchange.

    Returns (Chebyshev coefficients of P, its error sampled on a fine grid, the final reference). The
    reference of a nearby radius is a good start (``reference``); the default, Chebyshev extrema, is
    good for small R. Nothing here is rigorous: :func:`relative_error_bound` proves the error.
    """
    g = degree
    n = g + 2
    grid = -np.cos(np.pi * np.arange(max(4000, 80 * n) + 1) / max(4000, 80 * n))
    x = -np.cos(np.pi * np.arange(n) / (n - 1)) if reference is None else np.asarray(reference, dtype=np.float64)
    best, best_err, best_x = None, math.inf, x
    for _ in range(iterations):
        T = npcheb.chebvander(x, g) * np.exp(-radius * x)[:, None]
        M = np.hstack([T, -((-1.0) ** np.arange(n))[:, None]])
        try:
            sol = np.linalg.solve(M, np.ones(n))
        except np.linalg.LinAlgError:
            break
        c, E = sol[:-1], sol[-1]
        r = npcheb.chebval(grid, c) * np.exp(-radius * grid) - 1.0
        err = float(np.max(np.abs(r)))
        if err < best_err:
            best, best_err, best_x = c, err, x
        if err - abs(E) <= 1e-4 * err:
            break
        nx = _alternating_extrema(grid, r, n)
        if nx is None:
            break
        x = nx
    if best is None:  # cannot happen for g ≥ 0 on a valid grid; keep the constant 1/cosh R
        best, best_err = np.array([1.0 / math.cosh(radius)] + [0.0] * g), math.tanh(radius)
    return best, best_err, best_x


# --------------------------------------------------------------------------------------------------
# building the table


def _build_radius(radius: float, references: dict[int, np.ndarray], log=None) -> list[tuple[np.ndarray, float, float]]:
    """Degrees 0.. for one grid radius, until the bound stops improving (float64 coefficients saturate)."""
    rows: list[tuple[np.ndarray, float, float]] = []
    best = math.inf
    since_best = 0
    for g in range(MAX_DEGREE + 1):
        cheb, _, ref = remez(radius, g, reference=references.get(g))
        references[g] = ref
        a = chebyshev_to_monomial(cheb)
        upper, lower = relative_error_bound(a, radius)
        rows.append((a, upper, lower))
        if log:
            log(f"R={radius:.6g} g={g}: η ≤ {upper:.4e} (≥ {lower:.4e})")
        if upper < 0.5 * best:
            since_best = 0
        else:
            since_best += 1
        best = min(best, upper)
        if best <= 2.0**-52 or (since_best >= 3 and best < 1e-2):
            break
    return rows


def build_table(path: Path = TABLE_PATH, *, log=print) -> None:
    """Compute and prove every entry, then write ``path`` (npz: radii, coefficients, eta, lower)."""
    radii = grid_radii()
    G = MAX_DEGREE + 1
    coeffs = np.zeros((radii.size, G, G))
    eta = np.full((radii.size, G), np.inf)
    lower = np.full((radii.size, G), np.nan)
    references: dict[int, np.ndarray] = {}
    for i, R in enumerate(radii):
        rows = _build_radius(float(R), references, log=None)
        for g, (a, up, lo) in enumerate(rows):
            coeffs[i, g, : g + 1] = a
            eta[i, g] = up
            lower[i, g] = lo
        if log:
            log(f"R={R:.6g}: degrees 0..{len(rows) - 1}, best η ≤ {min(r[1] for r in rows):.3e}")
    np.savez_compressed(path, radii=radii, coefficients=coeffs, eta=eta, lower=lower)



def _main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m attnbound.families.relative_table",
                                     description="Build or print the relative-error polynomial table.")
    parser.add_argument("--build", action="store_true", help=f"recompute and prove the table into {TABLE_PATH}")
    parser.add_argument("--out", type=Path, default=TABLE_PATH)
    args = parser.parse_args(argv)
    if args.build:
        build_table(args.out)
    else:
        parser.print_help()


if __name__ == "__main__":
    _main()
