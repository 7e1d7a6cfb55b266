"""Certified fast attention vs exact, in one run: time ratios to torch SDPA, measured error vs
certificate, and every feature method's multiple of its float64 flop floor.

    python benchmarks/bench_approx.py [--quick] [--sections kernel grid scaling offset] [--ds 8 16] [--radii 0.5 1 2 4 8]
                                      [--min-log2n 12] [--max-log2n 17]
                                      [--methods auto relative polynomial taylor blockwise]
                                      [--max-floor-s 10] [--no-causal] [--threads N] [--clock wall|cpu]

peak:   the float64 GEMM rate of this process (best of 5 products of 2048×2048 matrices), measured
        at the start (the rows printed as they run use it) and again at the end; the kernel rows
        are summarised again at the higher of the two (the conservative multiple).
        The flop floor of a feature method of rank r is 2·2·n·r·(d_v + 1) flops (key state and
        readout, each an n × r by r × (d_v + 1) product) at that rate.
kernel: the feature engine itself at fixed (d, degree, d_v = 8): the pure-torch engine
        (attnbound.engines.features.feature_attention with its fused dispatch switched off) against the fused kernels (attnbound.engines.fused, through
        a small wrapper), non-causal and causal, with their multiples of the flop floor and their
        largest difference.
grid:   d ∈ {8, 16}, data radius R ∈ {0.5, 1, 2, 4, 8}, eps = 1e-3, n = 2^12 … 2^17, one head, without and
        with ``is_causal``; methods ``auto`` (the planner's choice: exact, or a family — it may pick
        ``relative``), and the families ``relative`` and ``polynomial`` (Chebyshev) forced. SDPA gets 4-D
        (1, 1, n, d) tensors (its fair CPU path), with ``is_causal`` in the causal rows. Errors are
        measured against a float64 reference on a random subsample of 256 query rows, beside the
        certificate. Times are medians of ``--repeats`` calls (one call above n = 2^15). A forced
        family whose certified rank would need more than ``--max-floor-s`` seconds at the GEMM peak
        is not run (the cell says so and gives the degree and rank), nor is any cell whose time at the
        previous n, extrapolated linearly in n, exceeds ``--max-cell-s`` (default 60 s).
scaling: the certified method at one point (d = 8, R = 1, eps = 1e-3, d_v = 8; ``auto`` and ``relative``,
        full and causal) over n = 2^12 … 2^18 (``--scaling-log2ns``): best of ``--repeats`` calls after a
        warm-up, the degree certified at each n, the fitted exponent p of t ∝ n^p (least squares of log t
        on log n over all sizes, and over the top three octaves, where fixed costs weigh least), and the
        peak memory of one call measured in a fresh process (VmHWM after /proc/self/clear_refs, the
        inputs already built and the kernels loaded) as a multiple of the input bytes (q, k, v): a
        flat multiple is memory independent of n beyond the inputs.
offset: inputs where centring and heavy tokens pay: q, k = small Gaussians (centred radius 1) plus one
        shared large vector each (plain radius 32), and the same with 4 outlier queries and 4 outlier
        keys (centred radius ≈ 16, radius ≈ 1 once 8 heavy tokens are exact). Rows give the three
        radii (plain, centred, 8 heavy) and run SDPA, ``auto``, and ``relative`` plain, with
        ``centre=True`` and with ``centre=True, heavy=8`` — when :func:`attnbound.attention` has those
        options; otherwise those cells say "not implemented".

Prints tables and writes benchmarks/results/bench_approx.json and the printed table beside it (.txt).
Wall times on a shared machine are
noisy; ``--clock cpu`` times the peak and the kernel section in CPU seconds of this process (with
``--threads 1``: one core's time, little affected by other processes). The JSON records the thread
count, the clock and both GEMM peaks.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

import attnbound
from attnbound.engines import features, fused, monomials
from attnbound.families import certified_degree
from attnbound.experiments.common import timed
from attnbound.experiments.radii import radii as call_radii

LINES: list[str] = []  # everything printed, written to the .txt beside the JSON


def say(*parts):
    line = " ".join(str(x) for x in parts)
    LINES.append(line)
    print(line, flush=True)


def has_centring() -> bool:
    import inspect

    params = inspect.signature(attnbound.attention).parameters
    return "centre" in params and "heavy" in params


CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of this process, all threads)


def clocked(fn, repeats: int):
    """(median time over ``repeats`` calls on CLOCK, the last result)."""
    ts, out = [], None
    for _ in range(repeats):
        t0 = CLOCK()
        out = fn()
        ts.append(CLOCK() - t0)
    return float(np.median(ts)), out


def gemm_peak(size: int = 2048, rounds: int = 5, clock=None) -> float:
    """Best float64 GEMM rate (flop/s) of this process over ``rounds`` products of size × size."""
    clock = clock or CLOCK
    a = torch.randn(size, size, dtype=torch.float64)
    b = torch.randn(size, size, dtype=torch.float64)
    a @ b
    best = math.inf
    for _ in range(rounds):
        t0 = clock()
        a @ b
        best = min(best, clock() - t0)
    return 2 * size**3 / best


def floor_seconds(n: int, rank: int, d_v: int, peak: float) -> float:
    """2·2·n·r·(d_v + 1) flops at the GEMM peak: key state plus readout as two dense products."""
    return 4 * n * rank * (d_v + 1) / peak


def inputs(n, d, radius, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 1, n, d, generator=g) for _ in range(3))
    c = math.sqrt(radius / (float(q.norm(dim=-1).max()) * float(k.norm(dim=-1).max()) / math.sqrt(d)))
    return q * c, k * c, v


def sub_error(out, q, k, v, idx, is_causal):
    s = 1 / math.sqrt(q.shape[-1])
    scores = s * q[..., idx, :].double() @ k.double().transpose(-1, -2)
    if is_causal:
        keys = torch.arange(k.shape[-2])
        scores = scores.masked_fill(keys[None, :] > idx[:, None], float("-inf"))
    ref = torch.softmax(scores, -1) @ v.double()
    return float((out[..., idx, :].double() - ref).abs().max())


# ------------------------------------------------------------------------------------------------
# kernel section: engine vs fused at a fixed rank


def fused_feature_attention(q, k, v, coeffs, is_causal):
    """The fused kernels behind the engine's normalisation: what a dispatch from
    ``features.feature_attention`` (without key weights) computes."""
    degree, d, d_v = len(coeffs) - 1, q.shape[-1], v.shape[-1]
    w = torch.as_tensor(monomials.monomial_weights(coeffs, d))
    vv = features.weighted_values(v)
    if is_causal:
        num = fused.causal_readout(q, k, vv, degree=degree, weights=w)
    else:
        num = fused.state_readout(q, fused.key_state(k, vv, degree=degree, weights=w), degree=degree)
    return features.normalize_readout(num, d_v)


def torch_engine(q, k, v, coeffs, is_causal):
    """features.feature_attention on its pure-torch path (the fused dispatch switched off for the call)."""
    available = fused.available
    fused.available = lambda *tensors: (False, "benchmark: the torch engine")
    try:
        return features.feature_attention(q, k, v, coeffs=coeffs, is_causal=is_causal)
    finally:
        fused.available = available


def run_kernel(cases, n, d_v, peak, repeats):
    rows = []
    for d, degree in cases:
        rank = monomials.feature_rank(d, degree)
        g = torch.Generator().manual_seed(d * 100 + degree)
        q, k = (torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(2))
        q, k = q / q.norm(dim=-1).max(), k / k.norm(dim=-1).max()  # |<q, k>| <= 1, where P is certified
        v = torch.randn(n, d_v, generator=g, dtype=torch.float64)
        coeffs = attnbound.chebyshev_coefficients(1.0, degree)
        for is_causal in (False, True):
            fused_feature_attention(q[:300], k[:300], v[:300], coeffs, is_causal)  # compile / load kernels
            reps = 1 if n > 1 << 15 else repeats
            t_eng, ref = clocked(lambda: torch_engine(q, k, v, coeffs, is_causal), reps)
            t_fus, out = clocked(lambda: fused_feature_attention(q, k, v, coeffs, is_causal), reps)
            fl = floor_seconds(n, rank, d_v, peak)
            row = {"d": d, "degree": degree, "rank": rank, "d_v": d_v, "n": n, "causal": is_causal,
                   "engine_s": t_eng, "fused_s": t_fus, "floor_s": fl, "engine_x_floor": t_eng / fl,
                   "fused_x_floor": t_fus / fl, "fused_speedup": t_eng / t_fus,
                   "max_abs_diff": float((out - ref).abs().max())}
            rows.append(row)
            say(f"d={d:>2} g={degree} r={rank:>5} n=2^{int(math.log2(n))} {'causal' if is_causal else 'full  '} "
                  f"engine {t_eng:7.3f}s ({t_eng / fl:5.1f}x floor)  fused {t_fus:7.3f}s ({t_fus / fl:4.2f}x floor)  "
                  f"speedup {t_eng / t_fus:5.1f}x  |diff| {row['max_abs_diff']:.1e}")
    return rows


# ------------------------------------------------------------------------------------------------
# grid section: attnbound.attention vs SDPA


def planned_cost(method, radius, eps, n, d, v, peak):
    """(degree, rank, floor seconds) the family ``method`` would certify at ``radius`` for these values (a
    priori, else a posteriori), or None when no degree meets eps."""
    vr = float((v.amax(-2) - v.amin(-2)).max())
    stats = dict(d=d, n_k=n, value_range=vr, max_abs_value=float(v.abs().max()))
    cert = certified_degree(method, radius, eps, **stats) or \
        certified_degree(method, radius, eps, rounding="posterior", **stats)
    if cert is None:
        return None
    return cert.degree, cert.rank, floor_seconds(n, cert.rank, v.shape[-1], peak)


LAST_TIME: dict = {}  # cell key -> (n, seconds) of its last run, for the extrapolation guard
MAX_CELL_S = 60.0


def run_cell(q, k, v, idx, is_causal, t_sdpa, reps, peak, max_floor_s, radius, key=None, **kw):
    """Time one attention call (or say why it did not run) and measure its error beside its certificate.

    Not run: a forced family whose certified rank's flop floor exceeds ``max_floor_s``, and any cell whose
    time at the previous (smaller) n, extrapolated linearly in n, exceeds MAX_CELL_S."""
    name = kw.get("method")
    n = q.shape[-2]
    if key is not None and key in LAST_TIME:
        n0, t0 = LAST_TIME[key]
        if t0 * n / n0 > MAX_CELL_S:
            return {"skipped": f"{t0:.1f} s at n = {n0}, extrapolated {t0 * n / n0:.0f} s > {MAX_CELL_S:g} s",
                    "degree": None, "rank": None}
    if name in ("relative", "polynomial", "taylor") and radius is not None:
        need = planned_cost(name, radius, kw["eps"], q.shape[-2], q.shape[-1], v, peak)
        if need is not None and need[2] > max_floor_s:
            return {"skipped": f"degree {need[0]}, rank {need[1]}: flop floor {need[2]:.0f} s > {max_floor_s:g} s",
                    "degree": need[0], "rank": need[1]}
    try:
        t, (out, cert) = timed(lambda: attnbound.attention(q, k, v, is_causal=is_causal, return_certificate=True,
                                                           **kw), reps)
    except ValueError as exc:
        return {"error": str(exc)}
    if key is not None:
        LAST_TIME[key] = (n, t)
    cell = {"seconds": t, "speedup_vs_sdpa": t_sdpa / t, "method": cert.method, "degree": cert.degree,
            "rank": cert.rank, "radius": cert.radius, "radius_source": cert.radius_source,
            "certificate": cert.output_error_bound, "measured_max_error": sub_error(out, q, k, v, idx, is_causal)}
    if cert.rank:
        cell["x_floor"] = t / floor_seconds(q.shape[-2], cert.rank, v.shape[-1], peak)
    return cell


def run_grid(ds, radii, log2ns, eps, repeats, skip_exact_above, methods, causal_modes, peak, max_floor_s):
    rows = []
    for d in ds:
        for radius in radii:
            for is_causal in causal_modes:
                for lg in log2ns:
                    n = 1 << lg
                    q, k, v = inputs(n, d, radius, seed=lg * 100 + d)
                    idx = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:256]
                    reps = 1 if n > 1 << 15 else repeats
                    t_sdpa, _ = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal), reps)
                    row = {"d": d, "R": radius, "n": n, "eps": eps, "causal": is_causal, "sdpa_s": t_sdpa}
                    for name in methods:
                        kw = {"method": "blockwise"} if name == "blockwise" else {"method": name, "eps": eps}
                        if name == "blockwise" and n > skip_exact_above:
                            continue
                        row[name] = run_cell(q, k, v, idx, is_causal, t_sdpa, reps, peak, max_floor_s, radius,
                                             key=("grid", d, radius, is_causal, name), **kw)
                    rows.append(row)
                    say(fmt_row(row, methods))
    return rows


def offset_inputs(n, d, seed, *, light_radius=1.0, plain_radius=32.0, outliers=0, outlier_scale=4.0):
    """q, k = Gaussians scaled to centred radius ``light_radius`` plus one shared vector each (s·‖μ‖² =
    ``plain_radius``, s = 1/√d), with ``outliers`` queries and keys moved ``outlier_scale`` times the light
    norm away from the centre; values standard Gaussian."""
    g = torch.Generator().manual_seed(seed)
    s = 1 / math.sqrt(d)
    q, k, v = (torch.randn(1, 1, n, d, generator=g) for _ in range(3))
    q, k = q - q.mean(-2, keepdim=True), k - k.mean(-2, keepdim=True)
    c = math.sqrt(light_radius / (s * float(q.norm(dim=-1).max()) * float(k.norm(dim=-1).max())))
    q, k = q * c, k * c
    if outliers:
        for x in (q, k):
            light = float(x.norm(dim=-1).max())
            pick = torch.randperm(n, generator=g)[:outliers]
            u = torch.nn.functional.normalize(torch.randn(outliers, d, generator=g), dim=-1)
            x[0, 0, pick] = u * (outlier_scale * light)
    m = math.sqrt(plain_radius / s)
    for x in (q, k):
        x += torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0) * m
    return q, k, v


OFFSET_CASES = {"offset": dict(outliers=0), "offset+4 outliers": dict(outliers=4)}
OFFSET_CELLS = {"auto": dict(method="auto"), "relative": dict(method="relative", centre=False, heavy=0),
                "relative centred": dict(method="relative", centre=True, heavy=0),
                "relative centred heavy=8": dict(method="relative", centre=True, heavy=8)}


def run_offset(ds, log2ns, eps, repeats, causal_modes, peak, max_floor_s):
    rows = []
    centring = has_centring()
    for d in ds:
        for case, opts in OFFSET_CASES.items():
            for is_causal in causal_modes:
                for lg in log2ns:
                    n = 1 << lg
                    q, k, v = offset_inputs(n, d, seed=lg * 10 + d, **opts)
                    rad = call_radii(q, k, 1 / math.sqrt(d), heavy=(8,))
                    idx = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:256]
                    reps = 1 if n > 1 << 15 else repeats
                    t_sdpa, _ = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal), reps)
                    row = {"case": case, "d": d, "n": n, "eps": eps, "causal": is_causal, "sdpa_s": t_sdpa,
                           "R_plain": rad["R"], "R_centred": rad["R_centred"], "R_heavy8": rad["R_heavy8"]}
                    for label, kw in OFFSET_CELLS.items():
                        if not centring and ("centre" in kw and label != "relative"):
                            row[label] = {"not_implemented": "attention() has no centre/heavy options"}
                            continue
                        if not centring:
                            kw = {key: val for key, val in kw.items() if key not in ("centre", "heavy")}
                        # the radius the forced family will certify at, for the cost guard
                        radius = None if kw["method"] == "auto" else (
                            rad["R_heavy8"] if kw.get("heavy") else rad["R_centred"] if kw.get("centre") else rad["R"])
                        row[label] = run_cell(q, k, v, idx, is_causal, t_sdpa, reps, peak, max_floor_s, radius,
                                              key=("offset", d, case, is_causal, label), eps=eps, **kw)
                    rows.append(row)
                    say(fmt_offset_row(row))
    return rows


def _fmt_cell(x, width=36):
    if not x:
        return f"{'-':>{width}}"
    if "not_implemented" in x:
        return f"{'not implemented':>{width}}"
    if "skipped" in x:
        if x.get("rank") is None:
            return f"{'not run: too slow (extrapolated)':>{width}}"
        return f"{'not run: g=' + str(x['degree']) + ' r=' + format(x['rank'], '.2g'):>{width}}"
    if "error" in x:
        why = "rounding" if "rounding bound" in x["error"] else "memory" if "memory" in x["error"] else "no degree"
        return f"{'uncertifiable (' + why + ')':>{width}}"
    fl = f"{x['x_floor']:5.1f}xF" if "x_floor" in x else f"{'':7}"
    how = x["method"][:3] if x["method"] not in ("exact", "dense", "blockwise", "sdpa") else "exa"
    return (f"{x['speedup_vs_sdpa']:6.2f}x {how} g={x['degree'] if x['degree'] is not None else '-':>2} {fl} "
            f"{x['measured_max_error']:.1e}/{x['certificate']:.0e}")


def fmt_offset_row(r):
    return (f"{r['case']:<17} d={r['d']:>2} {'causal' if r['causal'] else 'full  '} n=2^{int(math.log2(r['n'])):<2} "
            f"R={r['R_plain']:.1f}/{r['R_centred']:.1f}/{r['R_heavy8']:.2f} sdpa={r['sdpa_s']:7.3f}s "
            + " ".join(_fmt_cell(r.get(m)) for m in OFFSET_CELLS))


def fmt_row(r, methods):
    return (f"d={r['d']:>2} R={r['R']:<3} {'causal' if r['causal'] else 'full  '} n=2^{int(math.log2(r['n'])):<2} "
            f"sdpa={r['sdpa_s']:8.3f}s " + " ".join(_fmt_cell(r.get(m)) for m in methods))


SCALING_POINT = dict(d=8, radius=1.0, eps=1e-3)


def _vm_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(n: int, method: str, is_causal: bool) -> dict:
    """Run in a fresh process: the peak resident memory of one call beyond what the process held before it."""
    import ctypes

    d, radius, eps = SCALING_POINT["d"], SCALING_POINT["radius"], SCALING_POINT["eps"]
    q, k, v = inputs(n, d, radius, seed=n)
    attnbound.attention(q, k, v, method=method, eps=eps, is_causal=is_causal)  # the same path once: kernels loaded
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so the baseline is what is live
    open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current RSS
    before = _vm_kib("VmRSS")
    out = attnbound.attention(q, k, v, method=method, eps=eps, is_causal=is_causal)
    peak = _vm_kib("VmHWM")
    in_bytes = sum(x.numel() * x.element_size() for x in (q, k, v))
    return {"n": n, "input_mib": in_bytes / 2**20, "extra_peak_mib": (peak - before) / 1024,
            "out_mib": out.numel() * out.element_size() / 2**20}


def measure_memory(n: int, method: str, is_causal: bool, threads: int | None) -> dict:
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "--memory-child", str(n), method, str(int(is_causal))]
    if threads:
        cmd += ["--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def slope(ns, ts) -> float:
    x, y = np.log(np.asarray(ns, float)), np.log(np.asarray(ts, float))
    return float(np.polyfit(x, y, 1)[0])


def run_scaling(log2ns, repeats, peak, threads):
    d, radius, eps = SCALING_POINT["d"], SCALING_POINT["radius"], SCALING_POINT["eps"]
    rows, fits = [], {}
    for method in ("auto", "relative"):
        for is_causal in (False, True):
            ns, ts = [], []
            for lg in log2ns:
                n = 1 << lg
                q, k, v = inputs(n, d, radius, seed=lg * 100 + d)
                call = lambda: attnbound.attention(q, k, v, method=method, eps=eps, is_causal=is_causal,  # noqa: E731
                                                   return_certificate=True)
                _, cert = call()  # warm-up
                best = math.inf
                for _ in range(repeats if n <= 1 << 16 else max(2, repeats - 1)):
                    t0 = time.perf_counter()
                    call()
                    best = min(best, time.perf_counter() - t0)
                mem = measure_memory(n, method, is_causal, threads)
                row = {"method": method, "causal": is_causal, "n": n, "seconds": best, "run": cert.method,
                       "degree": cert.degree, "rank": cert.rank, "certificate": cert.output_error_bound,
                       "x_floor": best / floor_seconds(n, cert.rank, v.shape[-1], peak) if cert.rank else None,
                       **{key: mem[key] for key in ("input_mib", "extra_peak_mib", "out_mib")}}
                row["extra_over_input"] = row["extra_peak_mib"] / row["input_mib"]
                rows.append(row)
                ns.append(n)
                ts.append(best)
                xf = f"{row['x_floor']:5.2f}xF" if row["x_floor"] else "   -   "
                say(f"{method:>8} {'causal' if is_causal else 'full  '} n=2^{lg:<2} {best:9.4f}s  {cert.method[:3]} "
                    f"g={cert.degree} r={cert.rank} {xf}  bound {cert.output_error_bound:.1e}  "
                    f"peak +{row['extra_peak_mib']:7.1f} MiB = {row['extra_over_input']:.2f}x inputs "
                    f"({row['input_mib']:.1f} MiB; output {row['out_mib']:.1f} MiB)")
            key = f"{method},{'causal' if is_causal else 'full'}"
            fits[key] = {"all": slope(ns, ts), "top3": slope(ns[-3:], ts[-3:]) if len(ns) >= 3 else None,
                         "extra_over_input": [r["extra_over_input"] for r in rows
                                              if r["method"] == method and r["causal"] == is_causal]}
            top3 = "-" if fits[key]["top3"] is None else f"{fits[key]['top3']:.3f}"
            say(f"  {key}: fitted exponent {fits[key]['all']:.3f} over 2^{log2ns[0]}..2^{log2ns[-1]}, "
                f"{top3} over the top three octaves (target <= 1.05); peak beyond the call's "
                f"inputs {min(fits[key]['extra_over_input']):.2f}-{max(fits[key]['extra_over_input']):.2f}x the input bytes")
    return rows, fits


def fit_exponent(rows, method, d, radius, causal):
    pts = [(r["n"], r[method]["seconds"]) for r in rows
           if r["d"] == d and r["R"] == radius and r["causal"] == causal and "seconds" in r.get(method, {})]
    return slope(*zip(*pts)) if len(pts) >= 2 else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: d=8, R=1, n = 2^12..2^14, kernel section at n = 2^13")
    ap.add_argument("--sections", nargs="+", default=["kernel", "grid", "scaling", "offset"],
                    choices=["kernel", "grid", "scaling", "offset"])
    ap.add_argument("--scaling-log2ns", nargs="+", type=int, default=list(range(12, 19)))
    ap.add_argument("--memory-child", nargs=3, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ds", nargs="+", type=int, default=[8, 16])
    ap.add_argument("--radii", nargs="+", type=float, default=[0.5, 1.0, 2.0, 4.0, 8.0])
    ap.add_argument("--methods", nargs="+", default=["auto", "relative", "polynomial"],
                    choices=["auto", "relative", "polynomial", "taylor", "blockwise"])
    ap.add_argument("--offset-log2ns", nargs="+", type=int, default=[12, 14, 16, 17],
                    help="sizes of the offset section")
    ap.add_argument("--max-cell-s", type=float, default=60.0,
                    help="do not run a cell whose time at the previous n, extrapolated linearly, exceeds this")
    ap.add_argument("--max-floor-s", type=float, default=10.0,
                    help="do not run a forced family whose rank's flop floor exceeds this many seconds")
    ap.add_argument("--min-log2n", type=int, default=12)
    ap.add_argument("--max-log2n", type=int, default=17)
    ap.add_argument("--no-causal", action="store_true", help="skip the is_causal rows")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op (and numba) threads (default: theirs)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="peak and kernel section timed in wall seconds or in CPU seconds of this process "
                         "(cpu: less sensitive to other processes on a shared machine; the grid is always wall)")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "bench_approx.json"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
        if fused.numba is not None:
            fused.numba.set_num_threads(min(a.threads, fused.numba.config.NUMBA_NUM_THREADS))
    if a.memory_child:
        n, method, causal = a.memory_child
        print(json.dumps(memory_child(int(n), method, bool(int(causal)))))
        return
    global CLOCK, MAX_CELL_S
    MAX_CELL_S = a.max_cell_s
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    if a.quick:
        a.ds, a.radii, a.min_log2n, a.max_log2n, a.offset_log2ns = [8], [1.0, 4.0], 12, 14, [12, 13]
        a.scaling_log2ns = [12, 13, 14]
    log2ns = list(range(a.min_log2n, a.max_log2n + 1))
    causal_modes = (False,) if a.no_causal else (False, True)

    peak_start = gemm_peak()
    say(f"float64 GEMM peak (2048², best of 5, {a.clock} clock): {peak_start / 1e9:.1f} GFLOP/s")
    kernel_rows, grid_rows, offset_rows, scaling_rows, scaling_fits = [], [], [], [], {}
    if "kernel" in a.sections:
        ok, why = fused.available(torch.zeros(1, dtype=torch.float64))
        if ok:
            n_kernel = 1 << (13 if a.quick else a.max_log2n)
            say(f"kernel: pure-torch engine vs fused kernels, d_v = 8, n = {n_kernel}; "
                  "floor = 2·2·n·r·(d_v+1) flops at the GEMM peak above")
            kernel_rows = run_kernel([(8, 6), (16, 4)], n_kernel, 8, peak_start, a.repeats)
        else:
            say("kernel section skipped:", why)
    if "grid" in a.sections:
        say("grid columns per method: speedup vs SDPA (SDPA time / method time), degree, "
              "multiple of the rank's flop floor (xF), measured max error / certificate")
        say("methods:", " | ".join(a.methods))
        peak_wall = peak_start if a.clock == "wall" else gemm_peak(clock=time.perf_counter)
        if a.clock != "wall":
            say(f"float64 GEMM peak, wall clock (the grid's floors): {peak_wall / 1e9:.1f} GFLOP/s")
        grid_rows = run_grid(a.ds, a.radii, log2ns, 1e-3, a.repeats, 1 << 15, a.methods, causal_modes, peak_wall,
                             a.max_floor_s)
    if "scaling" in a.sections:
        peak_wall = peak_start if a.clock == "wall" else gemm_peak(clock=time.perf_counter)
        say(f"scaling: d={SCALING_POINT['d']}, R={SCALING_POINT['radius']}, eps={SCALING_POINT['eps']:g}, d_v=8, one head; "
            "best-of-k wall time, certified run, x floor, bound, and one call's peak memory in a fresh process")
        scaling_rows, scaling_fits = run_scaling(a.scaling_log2ns, a.repeats, peak_wall, a.threads)
    if "offset" in a.sections:
        peak_wall = peak_start if a.clock == "wall" else gemm_peak(clock=time.perf_counter)
        say("offset: q, k = small Gaussians + one shared large vector each (+ 4 outlier queries and keys); "
            "R = plain/centred/8 heavy; columns: " + " | ".join(OFFSET_CELLS)
            + ("" if has_centring() else " (centre/heavy not implemented in attention())"))
        say("each cell: speedup vs SDPA, method run (exa = exact, rel = relative, …), degree, x floor, "
            "measured max error / certificate")
        offset_rows = run_offset(a.ds, a.offset_log2ns, 1e-3, a.repeats, causal_modes, peak_wall, a.max_floor_s)
    peak_end = gemm_peak()
    say(f"float64 GEMM peak at the end ({a.clock} clock): {peak_end / 1e9:.1f} GFLOP/s (the multiples above use the start's "
          f"{peak_start / 1e9:.1f}; with the end's they would scale by {peak_end / peak_start:.2f})")
    peak_hi = max(peak_start, peak_end)
    for row in kernel_rows:  # conservative: a peak measured under load makes every floor look closer
        fl = floor_seconds(row["n"], row["rank"], row["d_v"], peak_hi)
        row["fused_x_floor_at_higher_peak"] = row["fused_s"] / fl
        row["engine_x_floor_at_higher_peak"] = row["engine_s"] / fl
    if kernel_rows:
        say(f"kernel rows at the higher peak {peak_hi / 1e9:.1f} GFLOP/s: " + "; ".join(
            f"d={r['d']} g={r['degree']} {'causal' if r['causal'] else 'full'}: fused {r['fused_x_floor_at_higher_peak']:.2f}x, "
            f"engine {r['engine_x_floor_at_higher_peak']:.1f}x floor" for r in kernel_rows))
    fits = {f"d={d},R={R},{'causal' if c else 'full'}": {m: fit_exponent(grid_rows, m, d, R, c) for m in a.methods}
            for d in a.ds for R in a.radii for c in causal_modes} if grid_rows else {}
    if fits:
        say("fitted time exponents (log t vs log n):", json.dumps(fits, indent=1))
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "numba_threads": fused.numba.get_num_threads() if fused.numba is not None else None,
           "cpu": platform.processor() or platform.machine(),
           "gemm_peak_flops_start": peak_start, "gemm_peak_flops_end": peak_end, "args": vars(a)}
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.out).write_text(json.dumps({"env": env, "kernel": kernel_rows, "rows": grid_rows,
                                               "offset_rows": offset_rows, "fits": fits,
                                               "scaling_rows": scaling_rows, "scaling_fits": scaling_fits}, indent=1))
    say("wrote", a.out)
    pathlib.Path(a.out).with_suffix(".txt").write_text(
        f"# python benchmarks/bench_approx.py {' '.join(__import__('sys').argv[1:])} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()})\n" + "\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
