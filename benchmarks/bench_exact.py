"""Exact attention (``attnbound.attention(method="exact")``) against torch SDPA, in one run.

    python benchmarks/bench_exact.py [--min-log2n 12] [--max-log2n 16] [--d 64] [--repeats 3] [--causal]
                                     [--dtype float32] [--threads N] [--out PATH]

Both get the same 4-D (1, 1, n, d) tensors (one head; SDPA's fused CPU path) and the same options
(``is_causal`` with ``--causal``). The two are timed alternately, ``--repeats`` calls each (one
above n = 2^15) after one warm-up call each, and the best time of each is kept, so a change of load
on a shared machine hits both. ``ratio`` = exact / SDPA; the target is ≤ 1.15. ``exact`` includes
everything the call does beyond SDPA: validation, the input statistics and the certificate.

Errors are measured against a float64 reference (SDPA in float64) on a random subsample of 256
query rows (their rows of the full attention), next to the certificate's bound.

Prints a table and writes JSON (default benchmarks/results/bench_exact.json) with the thread
count, torch version and machine. Wall times on a shared machine are noisy; one run is one sample.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import time

import torch
import torch.nn.functional as F

import attnbound


def best_alternating(fns, repeats: int):
    """Best wall time of each function, calls interleaved (a, b, a, b, …) after one warm-up each."""
    outs = [fn() for fn in fns]
    best = [math.inf] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best, outs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-log2n", type=int, default=12)
    ap.add_argument("--max-log2n", type=int, default=16)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "bench_exact.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    rows = []
    header = f"{'n':>7} {'sdpa [s]':>10} {'exact [s]':>10} {'ratio':>7} {'error':>10} {'bound':>10} {'compute':>8}"
    print(f"exact vs SDPA: d={args.d}, one head, {args.dtype}, causal={args.causal}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(header)
    for e in range(args.min_log2n, args.max_log2n + 1):
        n = 2**e
        q, k, v = (torch.randn(1, 1, n, args.d, generator=gen, dtype=dtype) for _ in range(3))
        reps = args.repeats if n <= 2**15 else 1
        (t_sdpa, t_exact), (_, (out, cert)) = best_alternating(
            [lambda: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal),
             lambda: attnbound.attention(q, k, v, is_causal=args.causal, return_certificate=True)], reps)
        idx = torch.randperm(n, generator=gen)[:256]
        if args.causal:
            ref = torch.cat([F.scaled_dot_product_attention(q[..., i:i + 1, :].double(), k[..., :i + 1, :].double(),
                                                            v[..., :i + 1, :].double()) for i in idx.tolist()], -2)
        else:
            ref = F.scaled_dot_product_attention(q[..., idx, :].double(), k.double(), v.double())
        err = float((out[..., idx, :].double() - ref).abs().max())
        row = dict(n=n, d=args.d, causal=args.causal, dtype=args.dtype, sdpa_seconds=t_sdpa, exact_seconds=t_exact,
                   ratio=t_exact / t_sdpa, error=err, bound=cert.output_error_bound,
                   compute_dtype=cert.compute_dtype, repeats=reps)
        rows.append(row)
        print(f"{n:>7} {t_sdpa:>10.4f} {t_exact:>10.4f} {row['ratio']:>7.3f} {err:>10.2e} "
              f"{cert.output_error_bound:>10.2e} {cert.compute_dtype:>8}", flush=True)
    result = dict(benchmark="bench_exact", threads=torch.get_num_threads(), torch=torch.__version__,
                  machine=platform.machine(), processor=platform.processor(), target_ratio=1.15, rows=rows)
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
