"""Relative-error polynomials for exp: the family whose error is measured the way the certificate uses it.

The certificate needs only the relative error of every weight,

    η = max_{|x|≤R} |P(x)/eˣ − 1|,

and η < 1 makes every weight positive. A Chebyshev truncation minimises the *absolute* error δ and
equioscillates, so its relative error is ≈ δ·e^R at x = −R. This module stores, for a grid of radii R'
and degrees g, near-minimax polynomials of the weighted problem

    min_{P ∈ Π_g} max_{|u|≤1} |P(u)·e^{−R'u} − 1|          (u = x/R')

found by the Remez exchange (weight e^{−R'u}, Chebyshev basis, linear system on g+2 alternation points),
converted exactly to monomial coefficients a'_j in u and rounded to float64; and for each a *proved*
bound η(R', g) for exactly those float64 coefficients.

Theorem (the stored η). Split [−1, 1] into pieces I = [c − h, c + h] with dyadic end points. On I write
u = c + h s, |s| ≤ 1, and z = R'h. Then, for the exact rational coefficients a'_j,

    P(u)·e^{−R'u} − 1 = e^{−R'c}·Σ_{n≥0} σ_n s^n − 1,   σ_n = Σ_k b_k (−z)^{n−k}/(n−k)!,

where P(c + h s) = Σ_k b_k s^k (an exact Taylor shift in integer arithmetic). Truncating the series of
e^{−zs} after the power M leaves, for |s| ≤ 1, at most Σ_k |b_k| · Σ_{m>M} z^m/m! ≤
Σ_k |b_k| · z^{M+1}/(M+1)! / (1 − z/(M+2)), hence

    max_I |P e^{−R'u} − 1| ≤ |e^{−R'c} b_0 − 1| + e^{−R'c} (Σ_{n≥1} |σ̃_n| + Σ_k |b_k|·t_{M+1}),

with σ̃ the truncated sums. Every quantity is computed with Python integers: b_k exactly; z^m/m!,
e^{−R'c} and the products in fixed point with 2^−256 units, each rounded in a known direction or with its
rounding added to the bound (e^y is enclosed by its Taylor series at x = |y|/2^s ≤ 2^−8, summed
with floor/ceil until a term drops below one unit — the rest is then below one unit — squared s times
with floor/ceil rounding, and inverted outward for y < 0). The maximum over
the pieces is therefore an upper bound on the real-number maximum — a proof, not a sample. Pieces
are bisected where the bound exceeds 1.03 times the largest centre value |r(c)| (a lower bound of the
true maximum), so the stored η is within a few per cent of the true relative error.

Rescaling. For a radius R ≤ R' (R' the smallest grid radius ≥ R), P(x) = Σ a'_j (x/R')^j also
approximates eˣ on [−R, R] ⊂ [−R', R'] with relative error ≤ η(R', g); in u = x/R its coefficients
are a'_j (R/R')^j. The float64 values a_j actually returned differ from those by Δa_j, computed
exactly in integer arithmetic (each |Δa_j| rounded up to a multiple of 2^−400), and |P̃(x) − P(x)|/eˣ ≤ Σ_j |Δa_j|·e^R on the interval, so

    relative_eta(R, g) = η(R', g) + Σ_j |Δa_j| · e^R        (rounded up).

The grid is R' = 2^{k/16}, k = −70..64 (0.048 ≤ R' ≤ 16): rounding R up costs a factor ≤ 2^{1/16}
in radius. Above 16 the float64 monomial form cannot carry a useful relative error anyway (its
coefficients sum to ≈ e^R while P(−R) ≈ e^{−R}, so rounding alone moves P by ≈ 2^−53·e^{2R} relative).

Cost: the table is built once (``python -m attnbound.relative --build``, minutes) and shipped as
package data; at run time a lookup plus an O(g) integer computation per (R, g), cached.
"""

from __future__ import annotations

import argparse
import math
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np
from numpy.polynomial import chebyshev as npcheb

from .chebyshev import _cheb_monomial_table

MAX_DEGREE = 40
GRID_STEPS_PER_OCTAVE = 16
GRID_K_MIN, GRID_K_MAX = -70, 64
TABLE_PATH = Path(__file__).with_name("data") / "relative_table.npz"

_F = 256  # fixed-point fraction bits of the verifier
_D = 60  # piece end points are multiples of 2^-_D
_TARGET = 1.03  # refine pieces until the bound is within this factor of the centre maximum


def grid_radii() -> np.ndarray:
    """The table's radii R'_k = 2^{k/16}, k = −70..64 (powers of two are exact grid points)."""
    return np.array([2.0 ** (k / GRID_STEPS_PER_OCTAVE) for k in range(GRID_K_MIN, GRID_K_MAX + 1)])


# --------------------------------------------------------------------------------------------------
# exact helpers


def _dyadic(x: float) -> tuple[int, int]:
    """x = n / 2^e exactly, e ≥ 0."""
    n, d = float(x).as_integer_ratio()
    return n, d.bit_length() - 1


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def _exp_interval(y_num: int, y_exp: int, bits: int = _F) -> tuple[int, int]:
    """Integers (lo, hi) with lo ≤ e^y · 2^bits ≤ hi for y = y_num / 2^y_exp (exact dyadic).

    Proof: for x = |y|/2^s ∈ [0, 2^−8], e^x = Σ_{m≤K} x^m/m! + ρ; the partial sum is taken term by
    term with floor (lo) and ceil (hi) in units 2^−G, stopping at the first K whose term is below one
    unit, so 0 ≤ ρ < x^K/K!·(x/(K+1))/(1 − x/(K+1)) < 1 unit (2 are added to hi); squaring s times with
    floor/ceil keeps lo ≤ e^{|y|}·2^G ≤ hi; e^{−|y|} = 1/e^{|y|} swaps the ends and rounds outward.
    """
    guard = bits + 64
    a = abs(y_num)
    s = max(0, a.bit_length() - y_exp + 8)
    e = y_exp + s  # x = a / 2^e ≤ 2^-8
    lo = hi = 1 << guard  # m = 0 term
    num, den, m = 1, 1, 0
    while True:
        m += 1
        num *= a
        den *= m
        den_full = den << (m * e)
        t_lo = (num << guard) // den_full
        lo += t_lo
        hi += _ceil_div(num << guard, den_full)
        if t_lo == 0 and m > 2:
            # remainder Σ_{j>m} x^j/j! ≤ 2 x^{m+1}/(m+1)! < 2 x^m/m! < 2^{1-guard}
            hi += 2
            break
    for _ in range(s):
        lo = (lo * lo) >> guard
        hi = _ceil_div(hi * hi, 1 << guard)
    if y_num < 0:
        lo, hi = (1 << (2 * guard)) // hi, _ceil_div(1 << (2 * guard), lo)
    shift = guard - bits
    return lo >> shift, _ceil_div(hi, 1 << shift)


def _fraction_up(q: Fraction) -> float:
    """The smallest float64 ≥ q (q ≥ 0)."""
    f = float(q)
    if Fraction(f) < q:
        f = math.nextafter(f, math.inf)
    return f


@lru_cache(maxsize=None)
def _exp_upper(x: float) -> float:
    """A float64 upper bound of e^x (x a float64), proved via :func:`_exp_interval`."""
    n, e = _dyadic(x)
    if x > 709.0:
        return math.inf
    _, hi = _exp_interval(n, e, 64)
    return _fraction_up(Fraction(hi, 1 << 64))


def chebyshev_to_monomial(cheb: np.ndarray) -> np.ndarray:
    """Monomial coefficients of Σ c_k T_k(u): computed exactly in rationals, rounded to nearest float64."""
    g = len(cheb) - 1
    rows = _cheb_monomial_table(max(g, 1))
    exact = [Fraction(0)] * (g + 1)
    for k, ck in enumerate(cheb):
        fk = Fraction(float(ck))
        for j, t in enumerate(rows[k]):
            if t:
                exact[j] += fk * t
    return np.array([float(e) for e in exact])


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


# --------------------------------------------------------------------------------------------------
# run-time lookups


@lru_cache(maxsize=1)
def _table() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(radii, coefficients[i, g, j], eta[i, g], best[i, g]) with best[i, g] = argmin_{g' ≤ g} eta[i, g']."""
    with np.load(TABLE_PATH) as z:
        radii, coeffs, eta = z["radii"], z["coefficients"], z["eta"]
    best = np.zeros(eta.shape, dtype=np.int64)
    for i in range(radii.size):
        b = 0
        for g in range(eta.shape[1]):
            if eta[i, g] < eta[i, b]:
                b = g
            best[i, g] = b
    for arr in (radii, coeffs, eta, best):
        arr.setflags(write=False)
    return radii, coeffs, eta, best


def max_radius() -> float:
    """The largest radius the table covers."""
    return float(_table()[0][-1])


def _check(radius, degree) -> tuple[float, int]:
    if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 0:
        raise ValueError(f"degree must be a non-negative int, got {degree!r}")
    try:
        radius = float(radius)
    except (TypeError, ValueError):
        raise TypeError(f"radius must be a real number, got {radius!r}") from None
    if math.isnan(radius) or radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    return radius, int(degree)


@lru_cache(maxsize=8192)
def _rescaled(radius: float, degree: int) -> tuple[np.ndarray, float]:
    radii, coeffs, eta, best = _table()
    if radius == 0.0:
        return np.eye(1, degree + 1)[0], 0.0
    if degree > MAX_DEGREE or not radius <= radii[-1]:
        return None, math.inf
    i = int(np.searchsorted(radii, radius, side="left"))
    b = int(best[i, degree])
    base = coeffs[i, b, : b + 1]
    table_eta = float(eta[i, b])
    grid_r = float(radii[i])
    out = np.zeros(degree + 1)
    if radius == grid_r:
        out[: b + 1] = base
        return out, table_eta
    rho = radius / grid_r
    power = 1.0
    for j in range(b + 1):  # a_j = a'_j·ρ^j by repeated products; the rounding is measured exactly below
        out[j] = base[j] * power
        power *= rho
    # Σ_j |a_j − a'_j (radius/R')^j| exactly, in integers: ratio = N/Q, each term rounded up to 2^-400
    rn, re_ = _dyadic(radius)
    gn, ge = _dyadic(grid_r)
    N, Q = rn << ge, gn << re_
    units = 0
    Nj, Qj = 1, 1
    for j in range(b + 1):
        m, e = _dyadic(out[j])
        n, f = _dyadic(base[j])
        x = abs((m << f) * Qj - (n << e) * Nj)  # |Δ_j| = x / (2^{e+f} Q^j)
        if x:
            units += _ceil_div(x << 400, Qj << (e + f))
        Nj *= N
        Qj *= Q
    total = Fraction(table_eta) + Fraction(units, 1 << 400) * Fraction(_exp_upper(radius))
    return out, _fraction_up(total)


def relative_coefficients(radius: float, degree: int) -> np.ndarray:
    """Monomial coefficients a_0..a_g in u = x/radius of the stored relative-minimax polynomial.

    Taken from the smallest grid radius R' ≥ radius (the best stored degree ≤ g there, zero-padded)
    and rescaled a_j = a'_j (radius/R')^j. Raises ValueError above the table or the degree cap.
    """
    radius, degree = _check(radius, degree)
    if degree > MAX_DEGREE:
        raise ValueError(f"degree must be <= {MAX_DEGREE}, got {degree}")
    a, _ = _rescaled(radius, degree)
    if a is None:
        raise ValueError(f"radius {radius} is above the relative-error table (max {max_radius()})")
    return a.copy()


def relative_eta(radius: float, degree: int) -> float:
    """Proved η ≥ max_{|x|≤radius} |P(x)/eˣ − 1| for the float64 coefficients of :func:`relative_coefficients`.

    η(R', g) of the table plus the exact rescaling drift Σ|Δa_j|·e^radius; inf above the table or the
    degree cap, 0 at radius 0 (P = 1).
    """
    radius, degree = _check(radius, degree)
    return _rescaled(radius, degree)[1]


def relative_delta(radius: float, degree: int) -> float:
    """Absolute error bound max |P(x) − eˣ| ≤ η·e^radius on [−radius, radius]."""
    eta = relative_eta(radius, degree)
    return 0.0 if eta == 0.0 else (_fraction_up(Fraction(eta) * Fraction(_exp_upper(radius)))
                                   if math.isfinite(eta) and radius <= 700 else math.inf)


def relative_degree(radius: float, eta: float, max_degree: int = MAX_DEGREE) -> int | None:
    """Smallest degree g ≤ max_degree with relative_eta(radius, g) ≤ eta, or None."""
    for g in range(min(max_degree, MAX_DEGREE) + 1):
        if relative_eta(radius, g) <= eta:
            return g
    return None


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m attnbound.relative",
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
