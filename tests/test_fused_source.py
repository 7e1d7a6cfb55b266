"""The generated source of the fused kernels (attnbound.engines.fused._source), checked as text and run as
plain Python.

* It compiles for every column count and defines the three kernels, and it is pinned: the numba disk cache
  is keyed by the source and the kernels are promised bit-identical, so any change to the text must be
  deliberate (update ``PINNED`` with it).
* Each kernel walks the five item cases of ``monomials.fused_items`` (the if/elif chain of its item loop),
  each case building its monomial vectors as the spec below says, in every pass over the tile.
* Executed as plain Python (``njit`` an identity decorator, ``prange`` the builtin ``range``) under
  ``sys.settrace`` on item tables where every case occurs, every statement of every kernel runs, and the
  results equal the torch engine (attnbound.engines.features) and the compiled kernels to ~1e-12.
"""

import ast
import builtins
import hashlib
import sys
import types

import numpy as np
import pytest
import torch

from attnbound.engines import features, fused, monomials

KERNELS = {  # name: the parameters the callers in fused.py pass, in order
    "key_partials": ["kk", "vv", "items", "g", "T", "part", "nseg", "per"],
    "readout": ["qq", "state", "items", "g", "T", "out"],
    "causal": ["qq", "kk", "vv", "w", "coef", "items", "g", "T", "sin", "nseg", "per", "out"],
}
# sha256(_source(C))[:16]: the text the disk cache and the compiled kernels of every user depend on
PINNED = {
    1: "fcaa178081d52f32", 2: "be374ba49f4c9fd5", 3: "bb98995054cfc789", 4: "a62b600fc94dba83",
    5: "9108b95fb910619f", 6: "0e2bb915ec4888ef", 7: "77b99da915fd8141", 8: "817e20995999cb34",
    9: "ef61505fb7f67898", 10: "9798b33810c1945d", 11: "ed8df839843ad938", 12: "3a31e80d8cbb74aa",
}
COLUMNS = range(1, fused.MAX_COLUMNS + 1)

# The five cases of an item row (a, j, i, a2, i2, ab, ib, ab2, ib2): the lines of a pass over the tile that
# build its monomial vectors ({f}, {h}, {e}: the first, second, third monomial, suffixed per pass) on the
# stack {S} from the tile's inputs {X}.
CASES = {
    "child pair": ["{f} = {S}[j - 1, t] * {X}[i, t]", "{S}[j, t] = {f}", "{h} = {f} * {X}[ib, t]",
                   "{e} = {f} * {X}[ib2, t]"],
    "interior child": ["{f} = {S}[j - 1, t] * {X}[i, t]", "{S}[j, t] = {f}", "{h} = {f} * {X}[ib, t]",
                       "{S}[j + 1, t] = {h}"],
    "leaf child": ["{f} = {S}[j - 1, t] * {X}[i, t]", "{S}[j, t] = {f}", "{h} = {f} * {X}[ib, t]"],
    "leaf pair": ["fp = {S}[j - 1, t]", "{f} = fp * {X}[i, t]", "{h} = fp * {X}[i2, t]"],
    "lone leaf": ["{f} = {S}[j - 1, t] * {X}[i, t]"],
}
PASSES = {  # per kernel: (stack, tile inputs, name suffix) of each pass over the tile, in order
    "key_partials": [("stack", "kt", "")],
    "readout": [("stack", "qt", "")],
    "causal": [("sq", "qt", "q"), ("sk", "kt", "k")],
}
# (d, degree) item tables: (3, 3) has all five cases; the others add degree 0 (no items), degree 1 (leaves
# straight off the constant), single variables and other mixes of the cases
TABLES = [(3, 3), (4, 2), (2, 4), (1, 3), (3, 1), (2, 0)]


def kernel_defs(src: str) -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in ast.parse(src).body if isinstance(node, ast.FunctionDef)}


def item_cases(kernel: ast.FunctionDef) -> dict[str, list[ast.stmt]]:
    """The bodies of the five cases in the kernel's item loop, found by the shape of its if/elif chain."""
    loops = [node for node in ast.walk(kernel) if isinstance(node, ast.For)
             and ast.unparse(node.iter) == "range(items.shape[0])"]
    assert len(loops) == 1, f"{kernel.name}: {len(loops)} item loops"
    ifs = [s for s in loops[0].body if isinstance(s, ast.If)]
    assert len(ifs) == 1, f"{kernel.name}: the item loop should hold one if/elif chain"
    joined = ifs[0]
    assert ast.unparse(joined.test) == "ab >= 0"
    inner = [s for s in joined.body if isinstance(s, ast.If)]
    assert len(inner) == 1 and ast.unparse(inner[0].test) == "ab2 >= 0", kernel.name
    assert len(inner[0].orelse) == 1 and isinstance(inner[0].orelse[0], ast.If), kernel.name
    interior = inner[0].orelse[0]
    assert ast.unparse(interior.test) == "j + 1 < g" and interior.orelse, kernel.name
    assert len(joined.orelse) == 1 and isinstance(joined.orelse[0], ast.If), kernel.name
    pair = joined.orelse[0]
    assert ast.unparse(pair.test) == "a2 >= 0" and pair.orelse, kernel.name
    return {"child pair": inner[0].body, "interior child": interior.body, "leaf child": interior.orelse,
            "leaf pair": pair.body, "lone leaf": pair.orelse}


@pytest.mark.parametrize("C", COLUMNS)
def test_source_compiles_and_defines_the_kernels(C):
    src = fused._source(C)
    compile(src, f"<fused source, {C} columns>", "exec")
    defs = kernel_defs(src)
    assert {name: [a.arg for a in node.args.args] for name, node in defs.items()} == KERNELS
    for node in defs.values():
        assert [ast.unparse(d) for d in node.decorator_list] == [
            "njit(parallel=True, fastmath=FM, boundscheck=False, cache=CACHE)"]
        assert f"np.empty(({C}, T))" in ast.unparse(node)  # the column count is compiled in


def test_source_is_pinned():
    """The generated text is the numba cache key and the kernels are promised bit-identical: a change to
    it must be deliberate (then update PINNED)."""
    got = {C: hashlib.sha256(fused._source(C).encode()).hexdigest()[:16] for C in COLUMNS}
    assert got == PINNED


@pytest.mark.parametrize("C", COLUMNS)
def test_every_kernel_walks_the_five_cases(C):
    """Each kernel's item loop has the five cases, each running one pass over the tile per operand, which
    builds the case's monomial vectors and then uses every one of them."""
    defs = kernel_defs(fused._source(C))
    for name, passes in PASSES.items():
        cases = item_cases(defs[name])
        assert list(cases) == list(CASES)
        for case, body in cases.items():
            loops = [s for s in body if isinstance(s, ast.For) and ast.unparse(s.iter) == "range(tl)"]
            assert len(loops) == len(passes), f"{name}, {case}: {len(loops)} passes over the tile"
            build = CASES[case]
            for loop, (stack, rows, tag) in zip(loops, passes):
                vec = {"f": "f" + tag, "h": "h" + tag, "e": "e" + tag}
                want = [line.format(S=stack, X=rows, **vec) for line in build]
                assert [ast.unparse(s) for s in loop.body[:len(build)]] == want, f"{name}, {case}"
                built = {n.id for s in loop.body[:len(build)] for n in ast.walk(s)
                         if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)} - {"fp"}
                used = {n.id for s in loop.body[len(build):] for n in ast.walk(s)
                        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
                assert built and built <= used, f"{name}, {case}: built {sorted(built)}, used {sorted(used)}"


# ----------------------------------------------------------------------------------------------
# the generated kernels as plain Python, traced


def python_kernels(C: int):
    """The generated source executed as plain Python: (key_partials, readout, causal), the code's file name
    and the source. ``from numba import njit, prange`` gets an identity decorator and ``range``."""
    fake = types.ModuleType("numba")
    fake.njit = lambda *args, **kwargs: (lambda f: f)
    fake.prange = range

    def import_(name, *args, **kwargs):
        return fake if name == "numba" else builtins.__import__(name, *args, **kwargs)

    src = fused._source(C)
    filename = f"<fused source as python, {C} columns>"
    ns = {"__builtins__": {**vars(builtins), "__import__": import_}}
    exec(compile(src, filename, "exec"), ns)
    return ns["key_partials"], ns["readout"], ns["causal"], filename, src


class LineTrace:
    """sys.settrace on the code of one file name: the line numbers executed there."""

    def __init__(self, filename: str):
        self.filename, self.lines = filename, set()

    def _local(self, frame, event, arg):
        if event == "line":
            self.lines.add(frame.f_lineno)
        return self._local

    def _global(self, frame, event, arg):
        return self._local if frame.f_code.co_filename == self.filename else None

    def __enter__(self):
        self.previous = sys.gettrace()
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc):
        sys.settrace(self.previous)


def close(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.isfinite(got).all(), f"{what}: an output entry was never written"
    err = float(np.abs(got - want).max()) if want.size else 0.0
    scale = float(np.abs(want).max()) if want.size else 1.0
    assert err <= 1e-12 * max(scale, 1.0), f"{what}: max error {err:.3e} at scale {scale:.3e}"


def run_kernels(kernels, C, d, degree, seed):
    """Every kernel on a small problem (2 batch rows, 5 rows in tiles of 2, 2 segments) against the torch
    engine; returns the kernels' outputs."""
    key_partials, readout, causal = kernels
    B, n, T = 2, 5, 2
    g = torch.Generator().manual_seed(seed)
    q = 0.7 * torch.randn(B, n, d, generator=g, dtype=torch.float64)
    k = 0.7 * torch.randn(B, n, d, generator=g, dtype=torch.float64)
    vv = torch.randn(B, n, C, generator=g, dtype=torch.float64)
    r = monomials.feature_rank(d, degree)
    s_in = torch.randn(B, r, C, generator=g, dtype=torch.float64)
    coeffs = np.random.default_rng(seed).standard_normal(degree + 1)
    w = monomials.monomial_weights(coeffs, d)
    coef = monomials.polynomial_of_weights(w, d, degree)
    items = monomials.fused_items(d, degree)
    qq, kk, vvn = q.numpy(), k.numpy(), vv.numpy()
    ntiles = -(-n // T)
    nseg, per = 2, -(-ntiles // 2)
    outputs = {}

    part = np.full((B * nseg, r, C), np.nan)
    key_partials(kk, vvn, items, degree, T, part, nseg, per)
    want = features.key_state(k, vv, degree=degree, weights=torch.ones(r, dtype=torch.float64), chunk=n)
    close(part.reshape(B, nseg, r, C).sum(1), want, f"key_partials d={d} degree={degree}")
    outputs["key_partials"] = part

    out = np.full((B, n, C), np.nan)
    readout(qq, s_in.numpy(), items, degree, T, out)
    close(out, features.state_readout(q, s_in, degree=degree, chunk=n), f"readout d={d} degree={degree}")
    outputs["readout"] = out

    wt = torch.as_tensor(w)
    first = per * T  # segment 1 starts after the keys of segment 0
    s1 = s_in + features.key_state(k[:, :first], vv[:, :first], degree=degree, weights=wt, chunk=n)
    sin = np.ascontiguousarray(torch.stack([s_in, s1], 1).reshape(B * nseg, r, C).numpy())
    out = np.full((B, n, C), np.nan)
    causal(qq, kk, vvn, w, coef, items, degree, T, sin, nseg, per, out)
    want = features.causal_readout(q, k, vv, degree=degree, weights=wt, chunk=n, state=s_in)
    close(out, want, f"causal d={d} degree={degree}")
    outputs["causal"] = out
    return outputs


def test_the_tables_hold_every_case():
    seen = set()
    for d, degree in TABLES:
        for a, j, i, a2, i2, ab, ib, ab2, ib2 in monomials.fused_items(d, degree).tolist():
            if ab >= 0:
                seen.add("child pair" if ab2 >= 0 else "interior child" if j + 1 < degree else "leaf child")
            else:
                seen.add("leaf pair" if a2 >= 0 else "lone leaf")
    assert seen == set(CASES)


@pytest.mark.parametrize("C", [1, 3])
def test_every_statement_runs_and_the_results_are_right(C):
    """The kernels as plain Python on TABLES: every statement of every kernel runs (so every branch of the
    item walk), and each result equals the torch engine — and, for C = 3 (the width tests/test_fused.py
    compiles), the compiled kernels on the same inputs."""
    *kernels, filename, src = python_kernels(C)
    with LineTrace(filename) as trace:
        results = [run_kernels(kernels, C, d, degree, seed) for seed, (d, degree) in enumerate(TABLES)]
    text = src.split("\n")
    for name, node in kernel_defs(src).items():
        statements = {s.lineno for s in ast.walk(node) if isinstance(s, ast.stmt) and s is not node}
        missed = sorted(statements - trace.lines)
        assert not missed, f"{name}: never ran " + "; ".join(f"{ln}: {text[ln - 1].strip()}" for ln in missed)
    if C == 3 and fused.runtime_available()[0]:
        compiled = fused._kernels(C)
        for seed, (d, degree) in enumerate(TABLES):
            got = run_kernels(compiled, C, d, degree, seed)
            for name, out in results[seed].items():
                close(got[name], out, f"compiled {name} d={d} degree={degree}")
