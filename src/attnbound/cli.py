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


@app.command()
def reproduce(scale: str = typer.Option("small", help="test | small | medium | large"),
              out: str = typer.Option(None, help="output folder (default reports/<timestamp>)"),
              only: list[str] = typer.Option(None, help="run only these experiments (repeatable)"),
              seed: int = typer.Option(0)):
    """Reproduce every claim of the seed papers; writes index.html, PNGs, results.json and CSVs."""
    from attnbound.experiments.report import reproduce as run_report

    try:
        run_report(scale, out, only, seed, console)
    except ValueError as exc:
        _fail(str(exc))


reduce_app = typer.Typer(no_args_is_help=True, help="Decide a hard combinatorial instance with attention as the oracle.")
app.add_typer(reduce_app, name="reduce")


def _fail(msg: str):
    console.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(2)


def _report_decision(red, truth, seconds_brute, method, attention_kwargs):
    import math

    from attnbound.hardness import solve_via_attention

    try:
        dec = solve_via_attention(red, method=method, **attention_kwargs)
    except ValueError as exc:
        _fail(str(exc))
    n = red.meta["n"]
    table = Table(show_header=False)
    for key, val in red.meta.items():
        table.add_row(key, f"{val:.4g}" if isinstance(val, float) else str(val))
    table.add_row("entry bound B", f"{red.entry_bound:.4g}   (√ln n = {math.sqrt(math.log(max(n, 2))):.4g})")
    table.add_row("oracle", f"{method}: answer {dec.answer}, witness row {dec.witness}, {dec.seconds:.4f} s")
    table.add_row("brute force", f"answer {truth}, {seconds_brute:.4f} s")
    table.add_row("agree", "[green]yes[/green]" if dec.answer == truth else "[red]NO[/red]")
    table.add_row("decision margin", f"{red.margin:.3g} (closest row {dec.out_margin:.3g} from the threshold)")
    if dec.certificate.method != "exact":
        table.add_row("certificate", str(dec.certificate))
    table.add_row("certified", "yes" if dec.certified else "[yellow]no: the answer is not trustworthy[/yellow]")
    console.print(table)


def _oracle_kwargs(degree, eps):
    kw = {}
    if degree is not None:
        kw["degree"] = degree
    if eps is not None:
        kw["eps"] = eps
    return kw


@reduce_app.command("ov")
def reduce_ov(n: int = typer.Option(512, help="|A| = |B|"), m: int = typer.Option(24, help="vector dimension"),
              planted: bool = typer.Option(True, "--planted/--no-planted"), seed: int = typer.Option(0),
              kind: str = typer.Option("softmax", help="softmax or l2"),
              method: str = typer.Option("exact"), degree: int = typer.Option(None), eps: float = typer.Option(None)):
    """Orthogonal Vectors → attention (Keles et al.)."""
    from attnbound.hardness import ov_instance, ov_to_attention, solve_ov

    try:
        inst = ov_instance(n, m, planted=planted, seed=seed)
        red = ov_to_attention(inst, kind=kind)
    except ValueError as exc:
        _fail(str(exc))
    t0 = time.perf_counter()
    truth, _ = solve_ov(inst)
    _report_decision(red, truth, time.perf_counter() - t0, method, _oracle_kwargs(degree, eps))


@reduce_app.command("gap-hamming")
def reduce_gap_hamming(n: int = typer.Option(512), d: int = typer.Option(64, help="vector dimension"),
                       t: int = typer.Option(None, help="close distance (default d/8)"),
                       gamma: float = typer.Option(0.5, help="gap: far pairs are >= (1+gamma)t"),
                       planted: bool = typer.Option(True, "--planted/--no-planted"), seed: int = typer.Option(0),
                       method: str = typer.Option("exact"), degree: int = typer.Option(None),
                       eps: float = typer.Option(None)):
    """Gap-Hamming close pair → attention (Alman–Song)."""
    from attnbound.hardness import gap_hamming_instance, gap_hamming_to_attention, solve_gap_hamming

    try:
        inst = gap_hamming_instance(n, d, t=t if t is not None else max(1, d // 8), gamma=gamma, planted=planted,
                                    seed=seed)
        red = gap_hamming_to_attention(inst)
    except ValueError as exc:
        _fail(str(exc))
    t0 = time.perf_counter()
    truth, _ = solve_gap_hamming(inst)
    _report_decision(red, truth, time.perf_counter() - t0, method, _oracle_kwargs(degree, eps))


study_app = typer.Typer(no_args_is_help=True, help="Study a real pretrained model through attnbound.")
app.add_typer(study_app, name="study")


@study_app.command("minilm")
def study_minilm(eps: list[float] = typer.Option(None, help="target errors (repeatable; default 1e-2 and 1e-3)"),
                 batch_size: int = typer.Option(16, help="sentences per padded batch"),
                 out: str = typer.Option(None, help="also write minilm.json, minilm.csv and the two PNGs here")):
    """all-MiniLM-L6-v2 (offline): B, R, degree needed per layer/head; embedding cosine vs exact."""
    import json
    import pathlib

    from attnbound.experiments import minilm
    from attnbound.experiments.report import _clean, write_csv

    ok, why = minilm.available()
    if not ok:
        _fail(why)
    if batch_size < 1:
        _fail(f"batch-size must be >= 1, got {batch_size}")
    eps_list = tuple(eps) if eps else minilm.EPS
    if any(not (e > 0) for e in eps_list):
        _fail(f"eps must be positive, got {list(eps_list)}")
    with console.status("running all-MiniLM-L6-v2 through attnbound…"):
        res = minilm.study(eps=eps_list, batch_size=batch_size)
    table = Table(title=f"all-MiniLM-L6-v2: {res['sentences']} sentences, {res['min_tokens']}–{res['max_tokens']} "
                        f"tokens (degree = Chebyshev degree whose approximation term meets eps; × = none ≤ 40)")
    for col in ("layer", "head", "B", "R", "B/√ln n", *[f"degree @{e:g}" for e in eps_list],
                *[f"rank @{e:g}" for e in eps_list]):
        table.add_column(col, justify="right")
    for h in res["heads"]:
        table.add_row(str(h["layer"]), str(h["head"]), f"{h['B']:.2f}", f"{h['R']:.1f}", f"{h['B_over_sqrt_ln_n']:.2f}",
                      *[str(h[f"degree@{e:g}"]) if h[f"degree@{e:g}"] is not None else "×" for e in eps_list],
                      *[f"{h[f'rank@{e:g}']:.1e}" if h[f"rank@{e:g}"] is not None else "×" for e in eps_list])
    console.print(table)
    runs = Table(title="whole model through the attnbound backend vs the stock (SDPA) model")
    for col in ("backend", "cos min", "cos mean", "max |Δ emb|", "worst certified bound", "head-calls by method"):
        runs.add_column(col)
    for r in res["runs"]:
        calls = ", ".join(f"{k[6:]} {v}" for k, v in r.items() if k.startswith("calls_"))
        runs.add_row(r["backend"], f"{r['cos_min']:.6f}", f"{r['cos_mean']:.6f}", f"{r['max_abs_diff']:.2e}",
                     f"{r['worst_bound']:.3g}", calls)
    console.print(runs)
    if out:
        path = pathlib.Path(out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "minilm.json").write_text(json.dumps(_clean(res), indent=1))
        write_csv(path / "minilm.csv", res["heads"])
        for stem, fig in minilm.figures(res).items():
            fig.tight_layout()
            fig.savefig(path / f"{stem}.png", dpi=110)
        console.print(f"wrote {path.resolve()}")


def main():  # pragma: no cover
    app()
