"""Sequence-parallel attention on one machine: 1 vs 2 (or more) gloo processes, time and bytes.

    python benchmarks/bench_distributed.py [--procs 1 2] [--max-log2n 17] [--threads 1]

One head, d = d_v = 8, float32 inputs with data radius R = 1, the sequence split evenly across
the processes (loopback gloo, each process limited to ``--threads`` torch threads so that the
process counts compare like for like). Methods: ring exact attention and the polynomial method
at eps = 1e-3, non-causal and causal. Reported per run: the slowest rank's median wall time,
the bytes each rank sent (attnbound.distributed.last_communication), and the speedup over one
process. Writes benchmarks/results/bench_distributed.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import platform
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CASES = [("exact", {}, False), ("exact", {}, True), ("polynomial", {"eps": 1e-3}, False),
         ("polynomial", {"eps": 1e-3}, True)]


def _inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, n, d, generator=g) for _ in range(3))
    c = math.sqrt(1.0 / (float(q.norm(dim=-1).max()) * float(k.norm(dim=-1).max()) / math.sqrt(d)))
    return q * c, k * c, v


def _worker(rank, world, port, log2ns, d, threads, repeats, exact_max_log2n, methods, out_path):
    from attnbound import distributed

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    rows = []
    for lg in log2ns:
        n = 1 << lg
        q, k, v = _inputs(n, d)
        bounds = [n * r // world for r in range(world + 1)]
        sq, sk, sv = (x[..., bounds[rank]:bounds[rank + 1], :].contiguous() for x in (q, k, v))
        for method, opts, causal in CASES:
            if method not in methods or (method == "exact" and lg > exact_max_log2n):
                continue
            times = []
            for _ in range(repeats):
                dist.barrier()
                t0 = time.perf_counter()
                _, cert = distributed.attention(sq, sk, sv, method=method, is_causal=causal, return_certificate=True,
                                                **opts)
                t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                times.append(float(t))
            sent = torch.tensor([distributed.last_communication()["bytes_sent"]], dtype=torch.float64)
            dist.all_reduce(sent, op=dist.ReduceOp.MAX)
            rows.append({"procs": world, "n": n, "method": method, "causal": causal, "seconds": statistics.median(times),
                         "bytes_sent_per_rank": int(sent), "degree": cert.degree, "rank": cert.rank,
                         "error_bound": cert.output_error_bound})
    if rank == 0:
        pathlib.Path(out_path).write_text(json.dumps(rows))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--min-log2n", type=int, default=12)
    ap.add_argument("--max-log2n", type=int, default=17)
    ap.add_argument("--exact-max-log2n", type=int, default=17, help="skip exact runs above this length")
    ap.add_argument("--methods", nargs="+", default=["exact", "polynomial"], choices=["exact", "polynomial"])
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log2ns = list(range(args.min_log2n, args.max_log2n + 1))
    rows = []
    for world in args.procs:
        tmp = out / f".bench_distributed_{world}.json"
        t0 = time.perf_counter()
        mp.spawn(_worker, args=(world, _free_port(), log2ns, args.d, args.threads, args.repeats,
                                args.exact_max_log2n, args.methods, str(tmp)), nprocs=world, join=True)
        rows += json.loads(tmp.read_text())
        tmp.unlink()
        print(f"{world} process(es): {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    one = {(r["n"], r["method"], r["causal"]): r["seconds"] for r in rows if r["procs"] == 1}
    for r in rows:
        base = one.get((r["n"], r["method"], r["causal"]))
        r["speedup_vs_1"] = base / r["seconds"] if base else None
    env = {"torch": torch.__version__, "threads_per_process": args.threads, "cores": torch.multiprocessing.cpu_count(),
           "python": platform.python_version(), "machine": platform.machine()}
    (out / "bench_distributed.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    print(f"{'procs':>5}{'n':>8}  {'method':<11}{'causal':>7}{'time [s]':>11}{'speedup':>9}{'sent/rank':>12}"
          f"{'degree':>7}{'rank r':>8}")
    for r in sorted(rows, key=lambda r: (r["method"], r["causal"], r["n"], r["procs"])):
        sp = f"{r['speedup_vs_1']:.2f}" if r["speedup_vs_1"] else "-"
        sent = r["bytes_sent_per_rank"]
        sent_s = f"{sent / 2**20:.2f} MiB" if sent >= 2**20 else f"{sent / 1024:.1f} KiB"
        print(f"{r['procs']:>5}{r['n']:>8}  {r['method']:<11}{str(r['causal']):>7}{r['seconds']:>11.4g}{sp:>9}"
              f"{sent_s:>12}{str(r['degree'] if r['degree'] is not None else '-'):>7}"
              f"{str(r['rank'] if r['rank'] is not None else '-'):>8}")


if __name__ == "__main__":
    main()
