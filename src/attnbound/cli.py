"""The ``attnbound`` command line."""

from __future__ import annotations

import time

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Certified fast attention and the fine-grained complexity of self-attention.")
console = Console()


@app.command()
def demo(n: int = typer.Option(4096, help="sequence length"), d: int = typer.Option(64, help="head dim"),
         heads: int = typer.Option(4, help="number of heads"), seed: int = typer.Option(0)):
    """Exact attention on a random instance: shapes, time, and the max difference from torch SDPA."""
    import torch
    import torch.nn.functional as F

    import attnbound

    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, d, generator=gen) for _ in range(3))
    t0 = time.perf_counter()
    out = attnbound.attention(q, k, v)
    t1 = time.perf_counter()
    ref = F.scaled_dot_product_attention(q, k, v)
    t2 = time.perf_counter()
    console.print(f"q, k, v: {tuple(q.shape)} float32 -> out {tuple(out.shape)}")
    console.print(f"attnbound exact: {t1 - t0:.3f} s   torch SDPA: {t2 - t1:.3f} s")
    console.print(f"max |attnbound - SDPA| = {float((out - ref).abs().max()):.3e}")


@app.command()
def calibrate():
    """Measure the planner's cost-model constants on this machine."""
    import attnbound

    cm = attnbound.calibrate()
    console.print(cm)


@app.command("plan")
def plan_cmd(n: int = typer.Option(..., help="sequence length (n_q = n_k)"), d: int = typer.Option(..., help="head dim"),
             radius: float = typer.Option(..., help="R bounding |s<q,k>|"), eps: float = typer.Option(1e-3),
             d_v: int = typer.Option(None, help="value dim (default d)"), causal: bool = typer.Option(False)):
    """Show every candidate the auto method weighs: certified error, rank, predicted time."""
    import attnbound

    try:
        p = attnbound.plan(n, n, d, d_v or d, radius, eps, causal)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    table = Table(title=f"plan: n={n} d={d} R={radius} eps={eps:g}")
    for col in ("method", "degree", "rank", "error bound", "pred. time [s]", "memory [MiB]", "ok"):
        table.add_column(col)
    for c in p.candidates:
        mark = "← choice" if c == p.choice else ("yes" if c.certified and c.fits_memory else "")
        table.add_row(c.method, str(c.degree if c.degree is not None else "-"), str(c.rank or "-"),
                      f"{c.error_bound:.3g}", f"{c.seconds:.4g}", f"{c.memory_bytes / 2**20:.1f}", mark)
    console.print(table)


def main():  # pragma: no cover
    app()
