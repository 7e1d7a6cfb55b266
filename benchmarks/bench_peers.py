"""attnbound vs its peers, in one run: error-vs-time frontier against torch SDPA, Performer FAVOR+
(performer-pytorch) and the Taylor-2 (Based) feature map.

    python benchmarks/bench_peers.py [--scale large] [--log2n 12 14 16] [--d 8 16] [--threads 2]

Inputs: one head; Gaussian with data radius R ∈ {0.5, 1, 2}, "peaked" (clusters of 4 keys, each
query on one cluster, R = 16), and rows of a real all-MiniLM-L6-v2 head (head dim 32) when the hf
extra is installed. For every method: median time over repeats, max and mean |out − exact| against
a float64 reference on 256 random query rows, and attnbound's certificate. Performer runs several
seeds (its error is random); its points show the median error and a bar up to the worst seed.

Writes benchmarks/results/bench_peers.json (every run), a table on stdout, and
benchmarks/results/peers_d{d}_n{n}.png (log-log frontier, one panel per input family).
The machinery lives in attnbound.experiments.peers (also `attnbound reproduce --only peers`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import torch

from attnbound.experiments import peers


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", default="large", choices=list(peers.GRID), help="preset grid (default large)")
    ap.add_argument("--log2n", type=int, nargs="+", help="override: sequence lengths as powers of two")
    ap.add_argument("--d", type=int, nargs="+", help="override: head dims")
    ap.add_argument("--features", type=int, nargs="+", help="override: Performer feature counts")
    ap.add_argument("--seeds", type=int, help="override: Performer seeds")
    ap.add_argument("--repeats", type=int, help="override: timing repeats (exact runs at n ≥ 2^15 use 1)")
    ap.add_argument("--max-rank", type=int, default=peers.MAX_RANK, help="largest polynomial feature rank to run")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-real", action="store_true", help="skip the all-MiniLM-L6-v2 family")
    ap.add_argument("--families", nargs="+", choices=["gaussian", "peaked", "minilm"], help="only these families")
    ap.add_argument("--merge", nargs="+", default=[], help="bench_peers.json files of other runs to merge in "
                    "(e.g. the same grid split over processes)")
    ap.add_argument("--no-run", action="store_true", help="measure nothing: only merge, tabulate and plot")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    ok, why = peers.available()
    if not ok:
        sys.exit(why)
    if args.threads:
        torch.set_num_threads(args.threads)
    log2ns, ds, feats, seeds, repeats = peers.GRID[args.scale]
    log2ns, ds = args.log2n or log2ns, args.d or ds
    feats, seeds, repeats = args.features or feats, args.seeds or seeds, args.repeats or repeats
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw, t0 = [], time.perf_counter()
    grid = [(f, r, d, lg) for f, r, d in peers.families(ds, with_real=not args.no_real) for lg in log2ns
            if (not args.families or f in args.families) and not args.no_run]
    for i, (fam, radius, d, lg) in enumerate(grid, 1):
        t1 = time.perf_counter()
        raw += peers.measure(fam, radius, d, 1 << lg, features=feats, seeds=seeds, repeats=repeats,
                             max_rank=args.max_rank, seed=lg)
        print(f"[{i}/{len(grid)}] {fam} R={radius} d={d} n=2^{lg}: {time.perf_counter() - t1:.1f} s", file=sys.stderr,
              flush=True)
        (out / "bench_peers.partial.json").write_text(json.dumps(raw, default=str))  # survives a killed run
    for path in args.merge:
        raw += json.loads(pathlib.Path(path).read_text())["runs"]
    points = peers.summarize(raw)
    cmp_rows = peers.equal_time(points)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
           "machine": platform.machine(), "seconds": time.perf_counter() - t0}
    (out / "bench_peers.json").write_text(json.dumps({"environment": env, "runs": raw, "points": points,
                                                      "equal_time": cmp_rows}, indent=1, default=str))
    hdr = f"{'family':<9}{'R':>6}{'d':>4}{'n':>8}  {'method':<22}{'param':>7}{'time [s]':>11}{'max err':>11}" \
          f"{'mean err':>11}{'bound':>11}"
    print(hdr)
    for p in points:
        bound = "-" if p.get("bound") is None else f"{p['bound']:.2e}"
        print(f"{p['family']:<9}{p['R']:>6.2f}{p['d']:>4}{p['n']:>8}  {p['method']:<22}{str(p['param'] or ''):>7}"
              f"{p['seconds']:>11.4g}{p['max_err']:>11.2e}{p['mean_err']:>11.2e}{bound:>11}")
    print("\nequal time (Gaussian, R ≤ 1): Performer vs the best certified attnbound point at no more time")
    print(f"{'R':>5}{'d':>4}{'n':>8}{'feat':>6}{'perf s':>10}{'perf err':>10}  {'attnbound':<24}{'ours s':>10}"
          f"{'ours err':>10}{'ratio':>10}")
    for r in cmp_rows:
        mark = "" if r["as_fast"] else " (slower)"
        print(f"{r['R']:>5.2f}{r['d']:>4}{r['n']:>8}{r['features']:>6}{r['performer_s']:>10.4g}"
              f"{r['performer_max_err']:>10.2e}  {r['attnbound']:<24}{r['attnbound_s']:>10.4g}"
              f"{r['attnbound_max_err']:>10.2e}{r['error_ratio']:>10.3g}{mark}")
    for d, n in sorted({(p["d"], p["n"]) for p in points if p["family"] != "minilm"}):
        fig = peers.frontier_figure(points, d, n)
        fig.tight_layout()
        fig.savefig(out / f"peers_d{d}_n{n.bit_length() - 1}.png", dpi=110)
    print(f"\nwrote {out}/bench_peers.json and peers_d*_n*.png ({env['seconds']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
