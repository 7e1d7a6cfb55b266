"""Autoregressive decoding: the certified feature state against a KV cache, as the context grows.

    python benchmarks/bench_decoding.py [--quick] [--ds 8 16] [--max-log2n 17] [--tokens 32] [--threads 1]

For d ∈ {8, 16} (d_v = d, one head, scale 1/√d), entries of q, k uniform in [−B, B] with
B = d^{−1/4}, so the declared radius is R = s·d·B² = 1, values uniform in [−1, 1] (declared
``value_bound=1``), eps = 1e-3. At each context length n = 2^lo … 2^max the same sequence is held by

* ``state``: :class:`attnbound.decoding.DecodingState` with ``keep_cache=False`` (the feature state
  from the first token; ``method="auto"`` picks the family of smallest rank certified for eps);
* ``cache``: ``DecodingState(method="exact", eps=1e-3)``, a KV cache answered by
  :func:`attnbound.attention` (exact; its rounding certificate must meet eps, so it computes in
  float64 once the float32 worst-case bound would not);
* ``sdpa``: torch's scaled_dot_product_attention of one query over a plain float32 KV cache tensor
  (the cheapest exact step, no certificate, for scale).

Per row: memory held (the state's r·(d_v+1) float64 numbers, the cache's n·(d + d_v) float32
numbers) and the median time of one decoding step (``step(q, k, v)`` with one new token: append its
key and value, answer its query) over ``--tokens`` steps, the largest certified bound of those steps
and the largest error measured against float64 exact attention over every key so far. A default
``DecodingState`` keeps the cache while n·(d + d_v) < r·(d_v + 1) and switches at the n printed
in the header. Wall times on a shared machine are noisy (medians; ``--threads 1`` by default).

Writes benchmarks/results/bench_decoding.json and .txt (``--quick``: *_quick.*).
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

from attnbound.decoding import DecodingState

OUT = pathlib.Path(__file__).with_name("results")


def exact64(q, k, v, scale):
    """Float64 attention of queries (t, d) over keys (n, d): the reference for the measured error."""
    w = torch.softmax(scale * (q.double() @ k.double().T), -1)
    return w @ v.double()


def run_d(d: int, levels: list[int], tokens: int, seed: int) -> tuple[dict, list[dict]]:
    d_v, eps = d, 1e-3
    scale = 1.0 / math.sqrt(d)
    bound = d ** -0.25
    n_max = levels[-1] + tokens * len(levels)
    g = torch.Generator().manual_seed(seed)
    q = (torch.rand(n_max, d, generator=g) * 2 - 1) * bound
    k = (torch.rand(n_max, d, generator=g) * 2 - 1) * bound
    v = torch.rand(n_max, d_v, generator=g) * 2 - 1
    st = DecodingState(d, d_v, scale=scale, bound=bound, eps=eps, method="auto", value_bound=1.0, keep_cache=False)
    cache = DecodingState(d, d_v, scale=scale, eps=eps, method="exact")  # certified to eps too (float64 when needed)
    kv_k = torch.empty(1, 1, n_max, d)
    kv_v = torch.empty(1, 1, n_max, d_v)
    n = 0
    rows = []
    for level in levels:
        t0 = time.perf_counter()
        for j0 in range(n, level, 4096):  # grow to the level (not timed)
            j1 = min(level, j0 + 4096)
            st.append(k[j0:j1], v[j0:j1])
            cache.append(k[j0:j1], v[j0:j1])
        kv_k[0, 0, n:level], kv_v[0, 0, n:level] = k[n:level], v[n:level]
        n = level
        grow_s = time.perf_counter() - t0
        times = {"state": [], "cache": [], "sdpa": []}
        worst = {}
        for name, obj in (("state", st), ("cache", cache)):  # each object's steps timed in its own loop
            outs = []
            for i in range(n, n + tokens):
                t0 = time.perf_counter()
                outs.append(obj.step(q[i:i + 1], k[i:i + 1], v[i:i + 1]))
                times[name].append(time.perf_counter() - t0)
            errs, bounds = [], []
            for i, (out, cert) in zip(range(n, n + tokens), outs):
                err = float((out.double() - exact64(q[i:i + 1], k[: i + 1], v[: i + 1], scale)).abs().max())
                assert err <= cert.output_error_bound, (name, i, err, cert)
                errs.append(err)
                bounds.append(cert.output_error_bound)
            worst[name] = (max(errs), max(bounds))
        for i in range(n, n + tokens):
            kv_k[0, 0, i], kv_v[0, 0, i] = k[i], v[i]
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(q[i:i + 1].view(1, 1, 1, d), kv_k[..., : i + 1, :], kv_v[..., : i + 1, :],
                                           scale=scale)
            times["sdpa"].append(time.perf_counter() - t0)
        n += tokens
        rank = st.rank
        rows.append(dict(
            d=d, n=level, method=st.approximation[0], degree=st.approximation[1], rank=rank,
            state_bytes=rank * (d_v + 1) * 8, kv_bytes=level * (d + d_v) * 4,
            state_held_bytes=st.nbytes, cache_held_bytes=cache.nbytes,
            state_ms=1e3 * float(np.median(times["state"])), cache_ms=1e3 * float(np.median(times["cache"])),
            sdpa_ms=1e3 * float(np.median(times["sdpa"])),
            state_bound=worst["state"][1], state_err=worst["state"][0],
            cache_bound=worst["cache"][1], cache_err=worst["cache"][0], grow_s=grow_s,
        ))
        print(row_line(rows[-1]), flush=True)
    head = dict(d=d, d_v=d_v, eps=eps, bound=bound, radius=st.radius, method=st.approximation[0], degree=st.approximation[1],
                rank=st.rank, switch_n=math.ceil(st.rank * (d_v + 1) / (d + d_v)))
    return head, rows


HEADER = (f"{'n':>7} | {'KV cache':>9} {'state':>9} | {'cache ms':>8} {'sdpa ms':>8} {'state ms':>8} | "
          f"{'state bound':>11} {'state err':>9} | {'cache bound':>11} {'cache err':>9}")


def _mib(b: int) -> str:
    return f"{b / 2**20:7.3f}Mi"


def row_line(r: dict) -> str:
    return (f"{r['n']:>7} | {_mib(r['kv_bytes']):>9} {_mib(r['state_bytes']):>9} | {r['cache_ms']:8.3f} "
            f"{r['sdpa_ms']:8.3f} {r['state_ms']:8.3f} | {r['state_bound']:11.3g} {r['state_err']:9.2g} | "
            f"{r['cache_bound']:11.3g} {r['cache_err']:9.2g}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="n up to 2^12, 8 tokens per level")
    ap.add_argument("--ds", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--min-log2n", type=int, default=10)
    ap.add_argument("--max-log2n", type=int, default=17)
    ap.add_argument("--tokens", type=int, default=32, help="timed decoding steps per context length")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.min_log2n, args.max_log2n, args.tokens = 8, 12, 8
    torch.set_num_threads(args.threads)
    levels = [2**e for e in range(args.min_log2n, args.max_log2n + 1)]
    report = dict(config=dict(ds=args.ds, levels=levels, tokens=args.tokens, threads=args.threads, seed=args.seed,
                              torch=torch.__version__, machine=platform.machine(), processor=platform.processor(),
                              note="wall-clock medians on a shared, loaded machine: noisy"),
                  heads=[], rows=[])
    lines = []
    for d in args.ds:
        print(f"d = {d}", flush=True)
        print(HEADER, flush=True)
        head, rows = run_d(d, levels, args.tokens, args.seed)
        report["heads"].append(head)
        report["rows"].extend(rows)
        lines += [f"d = d_v = {d}, R = {head['radius']:.3g} (B = {head['bound']:.4f}), eps = {head['eps']:g}: "
                  f"{head['method']} degree {head['degree']}, rank {head['rank']}; a default DecodingState keeps "
                  f"the KV cache up to n = {head['switch_n']}",
                  HEADER] + [row_line(r) for r in rows] + [""]
    lines.append(f"one step = append one key/value and answer one query; median of {args.tokens} steps per n, "
                 f"{args.threads} thread(s); bytes: cache n·(d+d_v) float32, state r·(d_v+1) float64; "
                 "bounds and errors: max over the timed steps (error vs float64 exact over every key so far)")
    suffix = "_quick" if args.quick else ""
    OUT.mkdir(exist_ok=True)
    (OUT / f"bench_decoding{suffix}.json").write_text(json.dumps(report, indent=1))
    (OUT / f"bench_decoding{suffix}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
