"""``attnbound reproduce``: run the experiments and write index.html, PNGs, results.json and CSVs."""

from __future__ import annotations

import csv
import datetime as dt
import html
import json
import math
import os
import pathlib
import platform
import time

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import EXPERIMENTS
from .common import SCALES, VERDICT_MEANING

COLORS = {"PASS": "#1a7f37", "FAIL": "#cf222e", "INCONCLUSIVE": "#9a6700", "SKIPPED": "#6e7781"}


def provenance() -> dict:
    """attnbound's version, the git commit of the checkout it runs from (if any, with '+dirty' when
    tracked files differ from it) and the UTC date."""
    import subprocess

    import attnbound

    here = pathlib.Path(attnbound.__file__).resolve().parent
    commit = "unknown (not a git checkout)"
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10)
        if head.returncode == 0:
            commit = head.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=10)
            if dirty.returncode == 0 and dirty.stdout.strip():
                commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"version": attnbound.__version__, "commit": commit,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def environment() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform()}


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_csv(path: pathlib.Path, rows: list[dict]):
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def write_html(out: pathlib.Path, results, env, scale, seed, seconds, prov=None):
    prov = prov or provenance()
    legend = "".join(f"<tr><td><span class='v' style='background:{COLORS[k]}'>{k}</span></td><td>{html.escape(v)}</td></tr>"
                     for k, v in VERDICT_MEANING.items())
    parts = [f"""<!doctype html><html><head><meta charset="utf-8"><title>attnbound reproduction report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1f2328}}
.v{{display:inline-block;padding:.15em .6em;border-radius:1em;color:#fff;font-weight:600}}
table{{border-collapse:collapse}}td,th{{border:1px solid #d0d7de;padding:.3em .6em;font-size:.9em}}
img{{max-width:100%;border:1px solid #d0d7de}}section{{margin:2.5em 0}}.claim{{color:#57606a}}</style></head><body>
<h1>attnbound — reproduction report</h1>
<p>attnbound {html.escape(prov['version'])}, commit <code>{html.escape(prov['commit'])}</code>, {html.escape(prov['date'])}.
Scale <b>{html.escape(scale)}</b>, seed {seed}, {seconds:.0f} s on {html.escape(env['cpu'])}
({env['threads']} torch threads), torch {html.escape(env['torch'])}. Machine-readable: <a href="results.json">results.json</a>.</p>
<p>What is reproduced: that the hardness reductions compute what they claim, that the algorithms cost what
the upper bounds say, and the polynomial method's rank threshold. The SETH lower bounds themselves are
conditional, worst-case statements about all algorithms; no measurement reproduces them. Verdicts about
operations are decided by counted operations (deterministic); wall times are illustrations.
The mathematics is summarised in <code>docs/theory.md</code> of the source tree.</p>
<table><tr><th>verdict</th><th>meaning</th></tr>{legend}</table>
<h2>Summary</h2>
<table><tr><th>experiment</th><th>verdict</th><th>reason</th></tr>"""]
    for r in results:
        parts.append(f"<tr><td><a href='#{r.name}'>{r.name}</a></td><td><span class='v' style='background:"
                     f"{COLORS[r.verdict]}'>{r.verdict}</span></td><td>{html.escape(r.reason)}</td></tr>")
    parts.append("</table>")
    for r in results:
        parts.append(f"<section id='{r.name}'><h2>{r.name} <span class='v' style='background:{COLORS[r.verdict]}'>"
                     f"{r.verdict}</span></h2><p class='claim'>{html.escape(r.claim)}</p><p>{html.escape(r.reason)}</p>")
        for stem in r.figures:
            parts.append(f"<img src='{stem}.png' alt='{stem}'>")
        if r.rows:
            parts.append(f"<p><a href='{r.name}.csv'>{r.name}.csv</a></p>")
        parts.append("</section>")
    parts.append("</body></html>")
    (out / "index.html").write_text("\n".join(parts))


def reproduce(scale: str = "small", out: str | os.PathLike | None = None, only: list[str] | None = None,
              seed: int = 0, console: Console | None = None) -> pathlib.Path:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    # experiments with DEFAULT = False (long benchmarks) run only when named with --only
    names = [n for n, m in EXPERIMENTS.items() if getattr(m, "DEFAULT", True)] if not only else list(only)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    console = console or Console()
    out = pathlib.Path(out) if out else pathlib.Path("reports") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    results = []
    t_start = time.perf_counter()
    with Progress(TextColumn("{task.description:<14}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:
        for name in names:
            mod = EXPERIMENTS[name]
            task = progress.add_task(name, total=mod.steps(scale))
            t_exp = time.perf_counter()
            res = mod.run(scale, seed, lambda: progress.advance(task))
            res.numbers["seconds"] = time.perf_counter() - t_exp
            progress.update(task, completed=mod.steps(scale))
            for stem, fig in res.figures.items():
                fig.tight_layout()
                fig.savefig(out / f"{stem}.png", dpi=110)
                import matplotlib.pyplot as plt

                plt.close(fig)
            if res.rows:
                write_csv(out / f"{name}.csv", res.rows)
            results.append(res)
    seconds = time.perf_counter() - t_start
    prov = provenance()
    payload = {"scale": scale, "seed": seed, "seconds": seconds, "environment": env, **prov,
               "verdict_meaning": VERDICT_MEANING,
               "experiments": {r.name: {"claim": r.claim, "verdict": r.verdict, "reason": r.reason,
                                        "numbers": r.numbers, "rows": r.rows, "figures": [f"{s}.png" for s in r.figures]}
                               for r in results}}
    (out / "results.json").write_text(json.dumps(_clean(payload), indent=1))
    write_html(out, results, env, scale, seed, seconds, prov)
    table = Table(title=f"attnbound {prov['version']} ({prov['commit']}) reproduce --scale {scale}, {prov['date']} "
                        f"({seconds:.0f} s)")
    table.add_column("experiment"), table.add_column("verdict"), table.add_column("reason", overflow="fold")
    for r in results:
        table.add_row(r.name, f"[{COLORS[r.verdict]}]{r.verdict}[/]", r.reason)
    console.print(table)
    console.print(f"report: {(out / 'index.html').resolve()}")
    return out
