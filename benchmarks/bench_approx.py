"""Certified fast attention vs exact, in one run: time ratios to torch SDPA and measured error vs certificate.

    python benchmarks/bench_approx.py [--quick] [--max-log2n 17]

Grid: d ∈ {8, 16}, data radius R ∈ {0.5, 1, 2}, eps = 1e-3, n = 2^12 … 2^17, one head. SDPA gets
4-D (1, 1, n, d) tensors (its fair CPU path). Errors are measured against a float64 reference on
a random subsample of 256 query rows. Prints a table and writes benchmarks/results/bench_approx.json.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform

import numpy as np
import torch
import torch.nn.functional as F

import attnbound
from attnbound.experiments.common import timed


def inputs(n, d, radius, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 1, n, d, generator=g) for _ in range(3))
    c = math.sqrt(radius / (float(q.norm(dim=-1).max()) * float(k.norm(dim=-1).max()) / math.sqrt(d)))
    return q * c, k * c, v


def sub_error(out, q, k, v, idx):
    s = 1 / math.sqrt(q.shape[-1])
    ref = torch.softmax(s * q[..., idx, :].double() @ k.double().transpose(-1, -2), -1) @ v.double()
    return float((out[..., idx, :].double() - ref).abs().max())


def run(ds, radii, log2ns, eps, repeats, skip_exact_above):
    rows = []
    for d in ds:
        for radius in radii:
            for lg in log2ns:
                n = 1 << lg
                q, k, v = inputs(n, d, radius, seed=lg * 100 + d)
                idx = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:256]
                t_sdpa, ref = timed(lambda: F.scaled_dot_product_attention(q, k, v), 1 if n > 1 << 15 else repeats)
                row = {"d": d, "R": radius, "n": n, "eps": eps, "sdpa_s": t_sdpa}
                for name, kw in (("auto", {"method": "auto", "eps": eps}),
                                 ("polynomial", {"method": "polynomial", "eps": eps}),
                                 ("taylor", {"method": "taylor", "eps": eps}),
                                 ("blockwise", {"method": "blockwise"})):
                    if name == "blockwise" and n > skip_exact_above:
                        continue
                    try:
                        t, (out, cert) = timed(lambda: attnbound.attention(q, k, v, return_certificate=True, **kw),
                                               1 if n > 1 << 15 else repeats)
                    except ValueError as exc:
                        row[name] = {"error": str(exc)}
                        continue
                    row[name] = {"seconds": t, "speedup_vs_sdpa": t_sdpa / t, "method": cert.method,
                                 "degree": cert.degree, "rank": cert.rank, "certificate": cert.output_error_bound,
                                 "measured_max_error": sub_error(out, q, k, v, idx)}
                rows.append(row)
                print(fmt_row(row), flush=True)
    return rows


def fmt_row(r):
    def cell(name):
        x = r.get(name)
        if not x:
            return f"{'-':>24}"
        if "error" in x:
            return f"{'uncertifiable':>24}"
        return f"{x['speedup_vs_sdpa']:6.2f}x g={x['degree'] if x['degree'] is not None else '-':>2} {x['measured_max_error']:.1e}/{x['certificate']:.0e}"
    return f"d={r['d']:>2} R={r['R']:<3} n=2^{int(math.log2(r['n'])):<2} sdpa={r['sdpa_s']:8.3f}s " + " ".join(
        cell(m) for m in ("auto", "polynomial", "taylor", "blockwise"))


def fit_exponent(rows, method, d, radius):
    pts = [(math.log(r["n"]), math.log(r[method]["seconds"])) for r in rows
           if r["d"] == d and r["R"] == radius and "seconds" in r.get(method, {})]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="d=8, R=1, n up to 2^14 (a smoke run)")
    ap.add_argument("--max-log2n", type=int, default=17)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "bench_approx.json"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    ds, radii, log2ns = ([8], [1.0], range(12, 15)) if a.quick else ([8, 16], [0.5, 1.0, 2.0], range(12, a.max_log2n + 1))
    print("columns: speedup vs SDPA (SDPA time / method time), degree, measured max error / certificate")
    rows = run(ds, radii, list(log2ns), 1e-3, a.repeats, skip_exact_above=1 << 15)
    fits = {f"d={d},R={R}": {m: fit_exponent(rows, m, d, R) for m in ("polynomial", "auto", "blockwise")}
            for d in ds for R in radii}
    print("fitted time exponents (log t vs log n):", json.dumps(fits, indent=1))
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.out).write_text(json.dumps({"env": env, "rows": rows, "fits": fits}, indent=1))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
