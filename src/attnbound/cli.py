"""The ``attnbound`` command line.

Imports are lazy (torch and the package load inside the commands), so ``--help`` stays quick.
Errors print one line and exit with status 2; progress goes to stderr when stdout is not a terminal.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import sys
import time

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Certified fast attention and the fine-grained complexity of self-attention.")
console = Console()


class Method(str, enum.Enum):
    """attnbound.attention's methods (validation.METHODS; kept here so --help needs no torch)."""

    exact = "exact"
    dense = "dense"
    blockwise = "blockwise"
    taylor = "taylor"
    polynomial = "polynomial"
    relative = "relative"
    auto = "auto"


class ApproxMethod(str, enum.Enum):
    auto = "auto"
    polynomial = "polynomial"
    relative = "relative"
    taylor = "taylor"


class Kind(str, enum.Enum):
    softmax = "softmax"
    l2 = "l2"


class Layout(str, enum.Enum):
    bhnd = "bhnd"
    bnhd = "bnhd"


def _fail(msg: str):
    console.print(f"[red]error:[/red] {msg}", soft_wrap=True)
    raise typer.Exit(2)


def _one_line_errors(fn):
    """Bad input and resource limits end the command with one line (exit status 2), not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyError as exc:
            _fail(f"missing key {exc.args[0]!r}" if exc.args else "missing key")
        except (ValueError, TypeError, OSError) as exc:
            _fail(str(exc))
        except MemoryError:
            _fail("out of memory: try a smaller size")

    return wrapper


def _positive(**values):
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"--{name} must be positive, got {value:g}")


def _short(cert) -> str:
    if cert is None:
        return "-"
    if cert.method == "exact":
        return "exact: rounding only"
    return f"{cert.method} degree {cert.degree}, rank {cert.rank}, R = {cert.radius:.3g}"


@contextlib.contextmanager
def _progress(message: str):
    """A spinner on a terminal; one line on stderr otherwise (so redirected runs still show progress)."""
    if console.is_terminal:
        with console.status(message):
            yield
    else:
        print(f"{message}", file=sys.stderr, flush=True)
        yield


@app.command()
@_one_line_errors
def demo(n: int = typer.Option(4096, help="sequence length"),
         d: int = typer.Option(8, help="head dim"),
         heads: int = typer.Option(1, help="number of heads"),
         scale: float = typer.Option(0.3, help="entries of q, k, v are N(0, scale²)"),
         method: ApproxMethod = typer.Option(ApproxMethod.auto, help="the approximate method shown"),
         eps: float = typer.Option(1e-3, help="target max-abs error ‖out − exact‖∞ (absolute)"),
         seed: int = typer.Option(0)):
    """Torch SDPA, attnbound exact and an approximate method with its certificate, on one random input.

    Each is run once to warm up, then timed; the error column is measured against a float64 reference.
    """
    import torch
    import torch.nn.functional as F

    import attnbound

    _positive(n=n, d=d, heads=heads, scale=scale, eps=eps)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, d, generator=gen) * scale for _ in range(3))
    with _progress(f"float64 reference at n={n}…"):
        ref = attnbound.attention(q.double(), k.double(), v.double(), method="exact")
    runs = [("torch SDPA", lambda: (F.scaled_dot_product_attention(q, k, v), None)),
            ("attnbound exact", lambda: attnbound.attention(q, k, v, return_certificate=True)),
            (f"attnbound {method.value}", lambda: attnbound.attention(q, k, v, method=method.value, eps=eps,
                                                                     return_certificate=True))]
    table = Table(title=f"q, k, v: (1, {heads}, {n}, {d}) float32, entries N(0, {scale:g}²), eps = {eps:g} "
                        f"(max-abs error)")
    for col, just in (("implementation", "left"), ("time\n\\[s]", "right"), ("‖out − exact‖∞\nmeasured", "right"),
                      ("‖out − exact‖∞\ncertified", "right"), ("certificate", "left")):
        table.add_column(col, justify=just, no_wrap=col != "certificate")
    for name, run in runs:
        with _progress(f"{name}: warm-up and timed run…"):
            run()
            t0 = time.perf_counter()
            out, cert = run()
            seconds = time.perf_counter() - t0
        err = float((out.double() - ref).abs().max())
        table.add_row(name, f"{seconds:.4f}", f"{err:.2e}", "-" if cert is None else f"{cert.output_error_bound:.2e}",
                      _short(cert))
    console.print(table)


@app.command()
@_one_line_errors
def calibrate(repeats: int = typer.Option(5, help="timed runs per kernel (the best is kept)"),
              out: str = typer.Option(None, help="file to write (default: $ATTNBOUND_COST_MODEL, else "
                                                 "~/.cache/attnbound/cost_model.json)"),
              save: bool = typer.Option(True, help="write the file that plan and auto read")):
    """Measure the planner's cost-model constants on this machine and save them for plan/auto."""
    import attnbound
    from attnbound.planner import cost_model_path

    _positive(repeats=repeats)
    with _progress("timing exact and feature attention on this machine…"):
        cm = attnbound.calibrate(repeats=repeats)
    console.print(cm)
    if save:
        path = cm.save(out if out is not None else cost_model_path())
        console.print(f"wrote {escape(str(path))} (plan and method='auto' read it)")


@app.command("plan")
@_one_line_errors
def plan_cmd(n: int = typer.Option(..., help="sequence length (n_q = n_k)"),
             d: int = typer.Option(..., help="head dim"),
             radius: float = typer.Option(..., help="R bounding |s·⟨q, k⟩| over all pairs"),
             eps: float = typer.Option(1e-3, help="target max-abs error ‖out − exact‖∞ (absolute)"),
             d_v: int = typer.Option(None, help="value dim (default d)"), causal: bool = typer.Option(False)):
    """Show every candidate the auto method weighs: certified error, rank, predicted time and memory."""
    import attnbound

    _positive(n=n, d=d, **({"d-v": d_v} if d_v is not None else {}))
    p = attnbound.plan(n, n, d, d_v or d, radius, eps, causal)
    table = Table(title=f"plan: n={n}, d={d}, R={radius:g}, eps={eps:g} (max-abs error){', causal' if causal else ''}")
    # "[s]" would be read as rich markup (strike-through) and vanish: headers are escaped
    for col in ("method", "degree", "rank", "error bound\n‖Δout‖∞", "pred. time\n\\[s]", "memory\n\\[MiB]", "ok"):
        table.add_column(col, justify="left" if col in ("method", "ok") else "right", no_wrap=True)
    for c in p.candidates:
        mark = "choice" if c == p.choice else ("yes" if c.certified and c.fits_memory else "")
        table.add_row(c.method, str(c.degree if c.degree is not None else "-"), str(c.rank or "-"),
                      f"{c.error_bound:.2g}", f"{c.seconds:.2g}", f"{c.memory_bytes / 2**20:.3g}", mark)
    console.print(table)
    engines: dict[str, list[str]] = {}  # engine -> the methods that would run on it
    for c in p.candidates:
        methods = engines.setdefault(c.engine or "-", [])
        if c.method not in methods:
            methods.append(c.method)
    console.print(escape("engines: " + "; ".join(f"{', '.join(ms)} on {e}" for e, ms in engines.items())))
    passed = {name: why for c in p.candidates for name, why in c.rejected.items()}
    for name, why in passed.items():  # the faster engines the candidates do not run on, and why
        console.print(escape(f"engine {name} not used: {'; '.join(why)}"))


@app.command()
@_one_line_errors
def reproduce(scale: str = typer.Option("small", help="test | small | medium | large"),
              out: str = typer.Option(None, help="output folder (default reports/<timestamp>)"),
              only: list[str] = typer.Option(None, help="run only these experiments (repeatable)"),
              seed: int = typer.Option(0)):
    """Reproduce the checkable claims (the reductions' correctness, the algorithms' costs, the rank threshold); writes index.html, PNGs, results.json and CSVs."""
    from attnbound.experiments.report import reproduce as run_report

    try:
        run_report(scale, out, only, seed, console)
    except ValueError as exc:
        _fail(str(exc))


reduce_app = typer.Typer(no_args_is_help=True, help="Decide a hard combinatorial instance with attention as the oracle.")
app.add_typer(reduce_app, name="reduce")


def _report_decision(red, truth, seconds_brute, method, attention_kwargs):
    import math

    from attnbound.hardness import solve_via_attention

    with _progress(f"deciding n={red.meta['n']} with the {method} oracle…"):
        dec = solve_via_attention(red, method=method, **attention_kwargs)
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
        table.add_row("certificate", escape(str(dec.certificate)))  # "[data]" is not markup
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
@_one_line_errors
def reduce_ov(n: int = typer.Option(512, help="|A| = |B|"), m: int = typer.Option(24, help="vector dimension"),
              planted: bool = typer.Option(True, "--planted/--no-planted"), seed: int = typer.Option(0),
              kind: Kind = typer.Option(Kind.softmax, help="attention kind"),
              method: Method = typer.Option(Method.exact, help="the attention oracle"),
              degree: int = typer.Option(None, help="fixed degree (polynomial) or even order (taylor)"),
              eps: float = typer.Option(None, help="target max-abs error of the oracle's output")):
    """Orthogonal Vectors → attention (Keles et al.)."""
    from attnbound.hardness import ov_instance, ov_to_attention, solve_ov

    try:
        inst = ov_instance(n, m, planted=planted, seed=seed)
        red = ov_to_attention(inst, kind=kind.value)
    except ValueError as exc:
        _fail(str(exc))
    t0 = time.perf_counter()
    truth, _ = solve_ov(inst)
    _report_decision(red, truth, time.perf_counter() - t0, method.value, _oracle_kwargs(degree, eps))


@reduce_app.command("gap-hamming")
@_one_line_errors
def reduce_gap_hamming(n: int = typer.Option(512), d: int = typer.Option(64, help="vector dimension"),
                       t: int = typer.Option(None, help="close distance (default d/8)"),
                       gamma: float = typer.Option(0.5, help="gap: far pairs are >= (1+gamma)t"),
                       planted: bool = typer.Option(True, "--planted/--no-planted"), seed: int = typer.Option(0),
                       method: Method = typer.Option(Method.exact, help="the attention oracle"),
                       degree: int = typer.Option(None, help="fixed degree (polynomial) or even order (taylor)"),
                       eps: float = typer.Option(None, help="target max-abs error of the oracle's output")):
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
    _report_decision(red, truth, time.perf_counter() - t0, method.value, _oracle_kwargs(degree, eps))


study_app = typer.Typer(no_args_is_help=True, help="Study a real pretrained model through attnbound.")
app.add_typer(study_app, name="study")


@study_app.command("minilm")
@_one_line_errors
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
    with _progress("running all-MiniLM-L6-v2 through attnbound…"):
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


@app.command("error")
@_one_line_errors
def error_cmd(file: str = typer.Argument(..., help="a torch.save'd dict with out, q, k, v (and optional options)"),
              layout: Layout = typer.Option(None, help="bhnd = (batch, heads, n, d) as torch SDPA; "
                                                       "bnhd = (batch, n, heads, d) as flash-attn [default: bhnd]"),
              scale: float = typer.Option(None, help="s in exp(s·⟨q, k⟩) [default: 1/√d]"),
              causal: bool = typer.Option(None, "--causal/--no-causal", help="row i sees keys j ≤ i"),
              kind: Kind = typer.Option(None, help="attention kind [default: softmax]"),
              check_layout: bool = typer.Option(True, help="refuse when out fits the other layout far better")):
    """The exact max |out − exact| of any attention output, against a float64 blockwise reference.

    FILE holds ``torch.save({"out": out, "q": q, "k": k, "v": v})``; it may also hold ``scale``,
    ``is_causal``, ``attn_mask`` (bool True = takes part, or additive float, as torch SDPA), ``kind``,
    ``layout`` and ``enable_gqa``. Options given here override the file's.
    """
    import torch

    from attnbound.measure import measure_error

    data = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a dict with out, q, k, v; got {type(data).__name__}")
    missing = [key for key in ("out", "q", "k", "v") if key not in data]
    if missing:
        raise ValueError(f"{file} lacks {', '.join(missing)} (it has {', '.join(map(str, data)) or 'nothing'})")
    known = {"out", "q", "k", "v", "scale", "is_causal", "attn_mask", "kind", "layout", "enable_gqa"}
    unknown = sorted(set(map(str, data)) - known)
    if unknown:
        raise ValueError(f"{file} has unknown keys {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    opts = {key: data[key] for key in ("scale", "is_causal", "attn_mask", "kind", "layout", "enable_gqa") if key in data}
    for key, value in (("layout", layout and layout.value), ("scale", scale), ("is_causal", causal),
                       ("kind", kind and kind.value)):
        if value is not None:
            opts[key] = value
    with _progress("float64 reference…"):
        err = measure_error(data["out"], data["q"], data["k"], data["v"], check_layout=check_layout, **opts)
    lay = opts.get("layout", "bhnd")
    shape = "(batch, heads, n, d)" if lay == "bhnd" else "(batch, n, heads, d)"
    console.print(f"layout {lay} {shape}: out {tuple(data['out'].shape)}, q {tuple(data['q'].shape)}, "
                  f"k {tuple(data['k'].shape)}, v {tuple(data['v'].shape)}", soft_wrap=True)
    console.print(f"max |out − exact| = {err:.6e}", soft_wrap=True)


def main():  # pragma: no cover
    app()
