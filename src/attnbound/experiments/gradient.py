"""Claim (Baur–Strassen, SPEC §5.5): the gradient of any straight-line computation costs a small
constant times the computation itself, so backward/forward time stays bounded for every
attention method as n grows (which is why the forward lower bounds also bound training).

Measured as time(forward + backward) / time(forward). Falsified if that ratio grows with n or
exceeds a small constant (7).
"""

from __future__ import annotations


import torch

import attnbound

from .common import Result, new_figure, timeit

NS = {"test": [128, 256], "small": [512, 1024, 2048, 4096], "medium": [1024, 2048, 4096, 8192],
      "large": [2048, 4096, 8192, 16384]}
METHODS = (("dense", {}), ("blockwise", {"block_size": 512}), ("polynomial", {"degree": 4}))


def run(scale: str, seed: int, advance) -> Result:
    d = 8
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in NS[scale]:
        base = [torch.randn(1, 2, n, d, generator=gen) * 0.5 for _ in range(3)]
        for method, kw in METHODS:
            if method == "dense" and n > 4096:
                continue
            leaves = [b.clone().requires_grad_() for b in base]

            def fwd():
                with torch.no_grad():
                    attnbound.attention(*base, method=method, strict=False, **kw)

            def fwd_bwd():
                out = attnbound.attention(*leaves, method=method, strict=False, **kw)
                out.square().sum().backward()

            tf, tb = timeit(fwd, 2), timeit(fwd_bwd, 2)
            rows.append({"n": n, "method": method, "forward_s": tf, "forward_backward_s": tb,
                         "ratio": tb / tf})
        advance()
    top = max(r["ratio"] for r in rows)
    verdict = "PASS" if top <= 7.0 else "FAIL"
    reason = "(forward+backward)/forward: " + ", ".join(
        f"{m} {min(r['ratio'] for r in rows if r['method'] == m):.2f}–{max(r['ratio'] for r in rows if r['method'] == m):.2f}"
        for m, _ in METHODS) + f" (bounded by 7: {top <= 7.0})"
    fig, (ax,) = new_figure()
    for m, _ in METHODS:
        sub = [r for r in rows if r["method"] == m]
        ax.plot([r["n"] for r in sub], [r["ratio"] for r in sub], "o-", label=m)
    ax.axhline(7, color="k", ls=":", lw=0.8, label="small constant (7)")
    ax.set_xscale("log", base=2), ax.set_ylim(0, max(8, top * 1.1))
    ax.set_xlabel("n"), ax.set_ylabel("(forward + backward) / forward time"), ax.set_title("Baur–Strassen: gradient cost")
    ax.legend(fontsize=7)
    return Result("gradient", __doc__.split("\n\n")[0], verdict, reason, rows, {"d": d}, {"gradient": fig})


def steps(scale: str) -> int:
    return len(NS[scale])
