"""Certified degree and feature rank against the radius R for the three approximation families of exp.

    python benchmarks/family_degrees.py [--d 8] [--value-range 8] [--eps 1e-3] [--n 65536]

For each R and each target, the smallest degree whose *proved* relative weight error η meets it:

* Taylor (even orders only): η = taylor_remainder(R, p)·e^R (Lagrange remainder, SPEC §2);
* Chebyshev truncation ("polynomial"): η = chebyshev_error(R, g)·e^R (Bessel tail);
* relative minimax ("relative"): η = relative_eta(R, g) (proved per table entry, attnbound.families.relative).

The target is the η with η/(1−η)·range = eps, i.e. η = eps/(range + eps) — the approximation term of
the certificate alone (the float64 rounding term is tabulated beside it, for n keys:
(rank + n + 2)·2^−53·Σ|a_j|·e^R, the certificate's current form). Rank is C(d + g, g).
Nothing is timed: the figures are the bounds themselves. Writes benchmarks/results/family_degrees.json
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

import numpy as np

from attnbound.families.chebyshev import chebyshev_coefficients, chebyshev_error
from attnbound.families.relative import relative_coefficients, relative_eta
from attnbound.families.taylor import taylor_coefficients, taylor_remainder

RADII = (0.5, 1.0, 2.0, 4.0, 8.0)


def _families():
    return {
        "taylor": (lambda R, g: taylor_remainder(R, g) * math.exp(R), taylor_coefficients, 2),
        "polynomial": (lambda R, g: chebyshev_error(R, g) * math.exp(R), chebyshev_coefficients, 1),
        "relative": (relative_eta, relative_coefficients, 1),
    }


def rows(d: int, value_range: float, eps_list: list[float], n: int, radii=RADII, max_degree: int = 40):
    out = []
    for eps in eps_list:
        target = eps / (value_range + eps)
        for R in radii:
            for name, (eta, coeffs, step) in _families().items():
                g = next((h for h in range(0, max_degree + 1, step) if eta(R, h) <= target), None)
                row = dict(family=name, radius=R, eps=eps, eta_target=target, degree=g)
                if g is not None:
                    a = coeffs(R, g)
                    rank = math.comb(d + g, g)
                    abs_sum = float(np.abs(a).sum())
                    row.update(eta=eta(R, g), rank=rank, coeff_abs_sum=abs_sum,
                               rounding_eta=(rank + n + 2) * 2.0**-53 * abs_sum * math.exp(R))
                out.append(row)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--value-range", type=float, default=8.0, help="max_j v_jc − min_j v_jc (Gaussian values ≈ 8)")
    ap.add_argument("--eps", type=float, nargs="+", default=None, help="default: 1e-3 and 1/n")
    ap.add_argument("--n", type=int, default=2**16, help="keys, for 1/n and the rounding column")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "family_degrees.json"))
    args = ap.parse_args(argv)
    eps_list = args.eps or [1e-3, 1.0 / args.n]
    table = rows(args.d, args.value_range, eps_list, args.n)
    pathlib.Path(args.out).write_text(json.dumps(dict(d=args.d, value_range=args.value_range, n=args.n,
                                                      rows=table), indent=1))
    print(f"d = {args.d}, value range {args.value_range}, n = {args.n}; degree (rank) [η, Σ|a_j|, rounding η]")
    for eps in eps_list:
        print(f"\neps = {eps:.3g} (η ≤ {eps / (args.value_range + eps):.3g})")
        print(f"{'R':>5} | " + " | ".join(f"{f:^40}" for f in _families()))
        for R in RADII:
            cells = []
            for f in _families():
                r = next(x for x in table if x["family"] == f and x["radius"] == R and x["eps"] == eps)
                cells.append("—" if r["degree"] is None else
                             f"{r['degree']:>2} ({r['rank']:>8}) [{r['eta']:.1e}, {r['coeff_abs_sum']:.1e}, "
                             f"{r['rounding_eta']:.1e}]")
            print(f"{R:>5} | " + " | ".join(f"{c:<40}" for c in cells))


if __name__ == "__main__":
    main()
