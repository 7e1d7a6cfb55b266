"""Fused, cache-resident feature kernels (float64, CPU): the key state, its readout and the causal pass.

They compute what :mod:`attnbound.engines.features` computes — with φ the bare monomials of degree ≤ g in
the engine order (:mod:`attnbound.engines.monomials`) and w the monomial weights,

    key_state(K, [V, 1])       S = diag(w)·φ(K)ᵀ[V, 1]                      (…, r, d_v + 1)
    state_readout(Q, S)        φ(Q)·S                                        (…, n_q, d_v + 1)
    causal_readout(Q, K, [V,1]) row i: φ(q_i)·(S_in + Σ_{j ≤ i} w ⊙ φ(k_j)[v_j, 1]ᵀ)

— without ever holding an r × chunk feature block in memory. The monomials are visited depth
first on the tree in which a degree-j monomial m with largest variable i has the children m·x_{i'}
(i' ≥ i): a tile of T rows keeps one T-vector per depth (a (g + 1) × T stack, in L1 cache), each
new monomial is one multiply of its parent's vector by x_{i'}, and it is used at once — summed into
the key state against the tile's [V, 1] (keys) or multiplied by the state's row into the tile's
outputs (queries); two sibling leaves (degree g, same parent) share one pass over the tile, and so do
an interior monomial and its first child (:func:`fused_items`; the causal pass too).
Work: n·r·(d_v + 1) multiply-adds per side plus n·r multiplies to build the monomials, the same as
the reference; memory beyond inputs and outputs: one r × (d_v + 1) partial state per parallel work
item (keys) and O((g + d + d_v)·T) per tile.

Parallelism: tiles are split over numba threads; each work item sums into a private partial state
and the partial states are added afterwards. The causal pass splits each sequence into segments:
a first pass computes every segment's key state in parallel, their exclusive prefix sums give each
segment its incoming state, and the segments then run their tiles in order, in parallel. Inside a
causal tile the exact lower triangle (keys j ≤ i of the same tile) is evaluated as
P(⟨q_i, k_j⟩) = Σ_{|α| ≤ g} w_α q_i^α k_j^α by Horner's rule in u = ⟨q_i, k_j⟩ (a_j recovered from w:
the weight of x_0^j is a_j), which is the same real number as the monomial sum and costs
O(T·(d + g + d_v)) per row instead of O(T·r). Weights not of the form w_α = a_{|α|}·|α|!/α! (the only
form the engine builds) are refused; the reference :func:`attnbound.engines.features.causal_readout` takes them.

Rounding: every output entry is a float64 sum of the same products as the reference, in a different
order (and the causal triangle by Horner), so results agree with the reference to within the usual
float64 summation bound γ_m·Σ|terms|; nothing here is exact beyond that.

The kernels are generated for each number of columns d_v + 1 (the per-column sums live in
registers), compiled by numba on first use and cached on disk (``ATTNBOUND_CACHE_DIR``, else
``$XDG_CACHE_HOME/attnbound`` or ``~/.cache/attnbound``), so later processes load them in well under a
second. Columns beyond ``MAX_COLUMNS`` are processed in groups of one width (the last zero-padded),
so a head of any width compiles one kernel set.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import pathlib
import sys
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .monomials import feature_rank, fused_items, polynomial_of_weights

try:  # numba is a declared dependency; without it the pure-torch engine is used
    import numba
    _NUMBA_ERROR = ""
except Exception as exc:  # pragma: no cover - depends on the environment
    numba = None
    _NUMBA_ERROR = f"numba is not importable ({type(exc).__name__}: {exc})"

KEY_TILE = 256  # keys per tile: (d + d_v + 1 + g + 1) rows of 256 float64, in L1 for d, d_v, g ≲ 8
QUERY_TILE = 128  # queries per tile: the (d_v + 1) × 128 output block is read and written per monomial
CAUSAL_TILE = 128  # rows per causal tile; the state is read and updated once per tile
MAX_COLUMNS = 12  # per-column sums held in registers; more columns are processed in groups
_POISON = False  # tests: fill every fresh kernel output with NaN so a missed write shows


def runtime_available() -> tuple[bool, str]:
    """(True, "") when numba is importable and no torch dispatch mode is active; else (False, why not)."""
    if numba is None:
        return False, _NUMBA_ERROR
    if _get_current_dispatch_mode() is not None:  # operation counting or tracing must see the torch engine
        return False, "a torch dispatch mode is active (it sees only torch ops; the reference engine is used)"
    return True, ""


def available(*tensors: torch.Tensor) -> tuple[bool, str]:
    """(True, "") when the fused kernels can compute on ``tensors``; else (False, why not).

    Requirements: numba importable, every tensor a float64 strided CPU tensor, and none requiring
    grad while autograd is on (the kernels themselves are forward only: with gradients they run inside
    :class:`attnbound.engines.fused_backward.FusedFeatures`, which checks its own :func:`~.fused_backward.applies`).
    """
    ok, why = runtime_available()
    if not ok:
        return ok, why
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            return False, f"not a tensor: {type(t).__name__}"
        if t.dtype != torch.float64:
            return False, f"dtype {t.dtype} (the fused kernels are float64 only)"
        if t.device.type != "cpu":
            return False, f"device {t.device} (the fused kernels run on the CPU)"
        if t.layout != torch.strided:
            return False, f"layout {t.layout}"
        if t.requires_grad and torch.is_grad_enabled():
            return False, "requires_grad (the bare kernels record no graph: engines.fused_backward wraps them)"
    return True, ""


# ----------------------------------------------------------------------------------------------
# kernel generation (one set per column count; the column sums are named locals)
#
# Each kernel is a text frame (its loops over batch rows, tiles and columns, written as the generated code
# reads) with the item walk spliced in where the frame says <items>. The walk over the rows of
# :func:`fused_items` is written once, in :func:`_item_walk`: its five cases (:data:`_CASES`) build the item's
# monomial vectors from the parent's, and the kernel says what happens around and inside each pass over
# the tile — what it loads or zeroes before a monomial, what it does with the monomial vectors at each row
# t (:class:`_Pass`), and what it stores after. Blocks are indented by :func:`_block` and spliced at the
# indentation of their marker (:func:`_frame`); no piece knows its own depth.

_TAB = "    "


def _block(head: str, *parts: list[str]) -> list[str]:
    """``head`` followed by the lines of ``parts``, in order, one level deeper."""
    return [head] + [_TAB + line for part in parts for line in part]


def _frame(text: str, C: int, **pieces: list[str]) -> list[str]:
    """The lines of the kernel frame ``text`` with {C} the column count and each line that is only
    ``<name>`` replaced by the lines of ``pieces[name]``, at that line's indentation."""
    out = []
    for line in text.strip("\n").split("\n"):
        body = line.lstrip(" ")
        if body.startswith("<") and body.endswith(">"):
            pad = line[:len(line) - len(body)]
            out += [pad + piece for piece in pieces[body[1:-1]]]
        else:
            out.append(line.replace("{C}", str(C)))
    return out


# The five item cases of a fused_items row (a, j, i, a2, i2, ab, ib, ab2, ib2), as the lines of one pass
# over the tile that build the item's monomial vectors — named f, h, e for its first, second and third
# monomial — from the parent's vector {S}[j − 1] and the tile's inputs {X}, and that keep on the stack
# {S} the vectors later items start from.
CHILD_PAIR = "interior monomial and its child pair"  # ab ≥ 0, ab2 ≥ 0: a, ab, ab2
INTERIOR_CHILD = "interior monomial and its interior child"  # ab ≥ 0, j + 1 < g: a, ab (both kept)
LEAF_CHILD = "interior monomial and its leaf child"  # ab ≥ 0, otherwise: a, ab
LEAF_PAIR = "two sibling leaves"  # a2 ≥ 0: a, a2
LONE_LEAF = "a lone leaf"  # otherwise: a
_CASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    CHILD_PAIR: (("f", "h", "e"), ("{f} = {S}[j - 1, t] * {X}[i, t]", "{S}[j, t] = {f}",
                                   "{h} = {f} * {X}[ib, t]", "{e} = {f} * {X}[ib2, t]")),
    INTERIOR_CHILD: (("f", "h"), ("{f} = {S}[j - 1, t] * {X}[i, t]", "{S}[j, t] = {f}",
                                  "{h} = {f} * {X}[ib, t]", "{S}[j + 1, t] = {h}")),
    LEAF_CHILD: (("f", "h"), ("{f} = {S}[j - 1, t] * {X}[i, t]", "{S}[j, t] = {f}", "{h} = {f} * {X}[ib, t]")),
    LEAF_PAIR: (("f", "h"), ("fp = {S}[j - 1, t]", "{f} = fp * {X}[i, t]", "{h} = fp * {X}[i2, t]")),
    LONE_LEAF: (("f",), ("{f} = {S}[j - 1, t] * {X}[i, t]",)),
}
_ACC = "xyz"  # per-column accumulators of an item's first, second and third monomial (keys): x{c}, y{c}, z{c}
_WEIGHT = {"a": "wa", "a2": "wa2", "ab": "wb", "ab2": "wb2"}  # causal: the local holding w[index]


@dataclass(frozen=True)
class _Pass:
    """One pass over the tile per item: the monomial vectors of ``rows`` (the tile's d × T inputs) built on
    ``stack``, named with the suffix ``tag``, and ``use`` (the item's vector names, first monomial first)
    giving the lines run with them at each row t."""

    stack: str
    rows: str
    tag: str
    use: Callable[[list[str]], list[str]]

    def lines(self, case: str) -> list[str]:
        names, build = _CASES[case]
        vec = {name: name + self.tag for name in names}
        return _block("for t in range(tl):", [line.format(S=self.stack, X=self.rows, **vec) for line in build],
                      self.use([vec[name] for name in names]))


def _item_walk(passes: list[_Pass], before: Callable[[int, str], list[str]],
               after: Callable[[int, str], list[str]]) -> list[str]:
    """The loop over the item rows: each of the five cases runs ``passes`` in order; ``before(slot, index)``
    and ``after(slot, index)`` give the lines ahead of and behind the passes for the item's monomial in
    ``slot`` (0, 1, 2: first, second, third), whose engine index is the local ``index``."""
    def case(name: str) -> list[str]:
        return [line for p in passes for line in p.lines(name)]

    return _block(
        "for m in range(items.shape[0]):",
        ["a = items[m, 0]", "j = items[m, 1]", "i = items[m, 2]", "a2 = items[m, 3]"],
        before(0, "a"),
        ["ab = items[m, 5]"],
        # an interior monomial and its first child (or child pair): one pass for both
        _block("if ab >= 0:",
               ["ib = items[m, 6]", "ab2 = items[m, 7]"],
               before(1, "ab"),
               _block("if ab2 >= 0:", ["ib2 = items[m, 8]"], before(2, "ab2"), case(CHILD_PAIR), after(2, "ab2")),
               _block("elif j + 1 < g:", case(INTERIOR_CHILD)),
               _block("else:", case(LEAF_CHILD)),
               after(1, "ab")),
        # two sibling leaves: one parent load and one pass for both
        _block("elif a2 >= 0:", ["i2 = items[m, 4]"], before(1, "a2"), case(LEAF_PAIR), after(1, "a2")),
        # a lone leaf: an interior monomial always travels with its first child
        _block("else:", case(LONE_LEAF)),
        after(0, "a"))


def _zeros(C: int, acc: str) -> str:
    return "; ".join(f"{acc}{c} = 0.0" for c in range(C))


def _loads(C: int, name: str, source: str) -> str:
    """``name``{c} = ``source`` (with {c} the column) for every column, on one line."""
    return "; ".join(f"{name}{c} = " + source.format(c=c) for c in range(C))


def _key_sums(C: int) -> Callable[[list[str]], list[str]]:
    """Keys: add each monomial vector times the tile's [V, 1] column into its accumulator; with two or three
    monomials each column v = vvt[c, t] is loaded once."""
    def use(vecs: list[str]) -> list[str]:
        if len(vecs) == 1:
            return [f"{_ACC[0]}{c} += {vecs[0]} * vvt[{c}, t]" for c in range(C)]
        return [line for c in range(C)
                for line in [f"v = vvt[{c}, t]"] + [f"{acc}{c} += {vec} * v" for acc, vec in zip(_ACC, vecs)]]
    return use


def _query_sums(C: int, coef: str) -> Callable[[list[str]], list[str]]:
    """Queries: add Σ vector·(its state row, loaded into ``coef[slot]``{c}) into the tile's outputs."""
    def use(vecs: list[str]) -> list[str]:
        return [f"acc[{c}, t] += " + " + ".join(f"{vec} * {k}{c}" for vec, k in zip(vecs, coef)) for c in range(C)]
    return use


# the lines the two segmented kernels (keys, causal) share: a work item per (batch row, segment), and its tiles
_SEGMENTS = ["for p in prange(B * nseg):", _TAB + "b = p // nseg", _TAB + "sgi = p % nseg"]
_SEGMENT_TILES = ["for tile in range(sgi * per, min(ntiles, (sgi + 1) * per)):", _TAB + "t0 = tile * T",
                  _TAB + "tl = min(T, n - t0)"]


_KEYS = """
@njit(parallel=True, fastmath=FM, boundscheck=False, cache=CACHE)
def key_partials(kk, vv, items, g, T, part, nseg, per):
    B, n, d = kk.shape
    r = part.shape[1]
    ntiles = (n + T - 1) // T
    <segments>
        for a in range(r):
            for c in range({C}):
                part[p, a, c] = 0.0
        kt = np.empty((d, T)); vvt = np.empty(({C}, T)); stack = np.empty((g + 1, T))
        <segment_tiles>
            for t in range(tl):
                for i in range(d):
                    kt[i, t] = kk[b, t0 + t, i]
                for c in range({C}):
                    vvt[c, t] = vv[b, t0 + t, c]
                stack[0, t] = 1.0
            for c in range({C}):
                s = 0.0
                for t in range(tl):
                    s += vvt[c, t]
                part[p, 0, c] += s
            <items>
"""


def _lines_keys(C: int) -> list[str]:
    """key_partials: the unweighted φ(K)ᵀ[V, 1] of each (batch row, segment), summed into ``part``."""
    walk = _item_walk([_Pass("stack", "kt", "", _key_sums(C))],
                      before=lambda slot, idx: [_zeros(C, _ACC[slot])],
                      after=lambda slot, idx: [f"part[p, {idx}, {c}] += {_ACC[slot]}{c}" for c in range(C)])
    return _frame(_KEYS, C, items=walk, segments=_SEGMENTS, segment_tiles=_SEGMENT_TILES)


_READOUT = """
@njit(parallel=True, fastmath=FM, boundscheck=False, cache=CACHE)
def readout(qq, state, items, g, T, out):
    B, n, d = qq.shape
    ntiles = (n + T - 1) // T
    for p in prange(B * ntiles):
        b = p // ntiles
        tile = p % ntiles
        qt = np.empty((d, T)); acc = np.empty(({C}, T)); stack = np.empty((g + 1, T))
        t0 = tile * T
        tl = min(T, n - t0)
        for t in range(tl):
            for i in range(d):
                qt[i, t] = qq[b, t0 + t, i]
            stack[0, t] = 1.0
        for c in range({C}):
            s = state[b, 0, c]
            for t in range(tl):
                acc[c, t] = s
        <items>
        for t in range(tl):
            for c in range({C}):
                out[b, t0 + t, c] = acc[c, t]
"""


def _lines_readout(C: int) -> list[str]:
    """readout: φ(Q)·S per tile of queries, the state rows of each item loaded once."""
    coef = "suw"  # the state rows of an item's first, second and third monomial: s{c}, u{c}, w{c}
    walk = _item_walk([_Pass("stack", "qt", "", _query_sums(C, coef))],
                      before=lambda slot, idx: [_loads(C, coef[slot], f"state[b, {idx}, {{c}}]")],
                      after=lambda slot, idx: [])
    return _frame(_READOUT, C, items=walk)


_CAUSAL = """
@njit(parallel=True, fastmath=FM, boundscheck=False, cache=CACHE)
def causal(qq, kk, vv, w, coef, items, g, T, sin, nseg, per, out):
    B, n, d = qq.shape
    r = w.shape[0]
    ntiles = (n + T - 1) // T
    <segments>
        S = np.empty((r, {C}))
        for a in range(r):
            for c in range({C}):
                S[a, c] = sin[p, a, c]
        qt = np.empty((d, T)); kt = np.empty((d, T)); vvt = np.empty(({C}, T))
        sq = np.empty((g + 1, T)); sk = np.empty((g + 1, T)); acc = np.empty(({C}, T)); pv = np.empty(T)
        <segment_tiles>
            for t in range(tl):
                for i in range(d):
                    qt[i, t] = qq[b, t0 + t, i]
                    kt[i, t] = kk[b, t0 + t, i]
                for c in range({C}):
                    vvt[c, t] = vv[b, t0 + t, c]
                sq[0, t] = 1.0
                sk[0, t] = 1.0
            for c in range({C}):
                s = S[0, c]
                x = 0.0
                for t in range(tl):
                    acc[c, t] = s
                    x += vvt[c, t]
                S[0, c] = s + w[0] * x
            <items>
            for t in range(tl):
                for s in range(t + 1):
                    pv[s] = 0.0
                for i in range(d):
                    qi = qt[i, t]
                    for s in range(t + 1):
                        pv[s] += qi * kt[i, s]
                for s in range(t + 1):
                    u = pv[s]
                    h = coef[g]
                    for jj in range(g - 1, -1, -1):
                        h = h * u + coef[jj]
                    pv[s] = h
                for c in range({C}):
                    x = 0.0
                    for s in range(t + 1):
                        x += pv[s] * vvt[c, s]
                    acc[c, t] += x
            for t in range(tl):
                for c in range({C}):
                    out[b, t0 + t, c] = acc[c, t]
"""


def _lines_causal(C: int) -> list[str]:
    """causal: per tile, each item's queries read the state (keys before the tile), then its keys update
    it (the state row += w·φ(k)ᵀ[V, 1]); the exact triangle of the tile by Horner's rule at the end."""
    coef = "suo"  # the state rows of an item's first, second and third monomial: s{c}, u{c}, o{c}

    def store(slot: int, idx: str) -> list[str]:
        wname = _WEIGHT[idx]
        return [f"{wname} = w[{idx}]"] + [f"S[{idx}, {c}] = {coef[slot]}{c} + {wname} * {_ACC[slot]}{c}"
                                          for c in range(C)]

    walk = _item_walk([_Pass("sq", "qt", "q", _query_sums(C, coef)), _Pass("sk", "kt", "k", _key_sums(C))],
                      before=lambda slot, idx: [_loads(C, coef[slot], f"S[{idx}, {{c}}]"), _zeros(C, _ACC[slot])],
                      after=store)
    return _frame(_CAUSAL, C, segments=_SEGMENTS, segment_tiles=_SEGMENT_TILES, items=walk)


_NAMES = ("key_partials", "readout", "causal")


def header(title: str) -> list[str]:
    """The first lines of a generated kernel module: ``title`` (a comment), the imports, the fastmath flags and the
    ``CACHE = True`` that :func:`_in_memory` turns off."""
    return [title, "import numpy as np", "from numba import njit, prange", "FM = {'reassoc', 'contract', 'nsz'}",
            "CACHE = True", ""]


def _source(C: int) -> str:
    # the header names the module's old path: changing it would change every kernel's hash and cache key
    head = header("# generated by attnbound.fused: kernels for %d columns" % C)
    return "\n".join(head + _lines_keys(C) + [""] + _lines_readout(C) + [""] + _lines_causal(C)) + "\n"


def _cache_dir() -> pathlib.Path:
    env = os.environ.get("ATTNBOUND_CACHE_DIR")
    if env:
        return pathlib.Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "attnbound"


def _module_name(C: int, src: str) -> str:
    return f"attnbound_fused_c{C}_{hashlib.sha256((src + numba.__version__).encode()).hexdigest()[:16]}"


def _cache_roots() -> list[pathlib.Path]:
    return [_cache_dir(), pathlib.Path(tempfile.gettempdir()) / f"attnbound-{os.getuid()}"]


def _write_source(root: pathlib.Path, name: str, src: str) -> pathlib.Path:
    """``root/name.py`` holding ``src``, rewritten atomically (a temporary file, then a rename) unless it
    already holds exactly these bytes: several processes may write it at once, readers never see half."""
    path = root / f"{name}.py"
    try:
        current = path.read_bytes()
    except OSError:
        current = None
    if current != src.encode():
        tmp = root / f".{name}.{os.getpid()}.tmp"
        try:
            tmp.write_bytes(src.encode())
            os.replace(tmp, path)
        finally:  # a failed write (a full disk) leaves no partial file behind
            tmp.unlink(missing_ok=True)
    return path


def _purge(root: pathlib.Path, name: str) -> None:
    """Delete every cache entry numba or Python made of the generated file (``__pycache__``); the file itself
    is checked byte by byte at each load and stays (rewriting it would stale its siblings' numba indexes)."""
    for path in (root / "__pycache__").glob(f"{name}*"):
        try:
            path.unlink()
        except OSError:
            pass


def _load(C: int, source: Callable[[int], str] | None = None, names: tuple[str, ...] = ()):
    """The kernels ``names`` of ``source(C)`` (default: this module's three for C columns), imported from a generated
    file so numba can cache them on disk. The first writable cache directory is used; without one they compile in
    memory, uncached."""
    source, names = source or _source, names or _NAMES
    src = source(C)
    name = _module_name(C, src)
    for root in _cache_roots():
        try:
            root.mkdir(parents=True, exist_ok=True)
            path = _write_source(root, name, src)
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            try:
                spec.loader.exec_module(mod)
            except (ValueError, EOFError, ImportError, SyntaxError):  # an unreadable bytecode cache: rebuild once
                _purge(root, name)
                spec.loader.exec_module(mod)
            return tuple(getattr(mod, k) for k in names), (root, name)
        except OSError:
            continue
    return _in_memory(C, source, names), None


def _in_memory(C: int, source: Callable[[int], str] | None = None, names: tuple[str, ...] = ()):
    """The kernels ``names`` of ``source(C)`` compiled in this process only, without a disk cache."""
    source, names = source or _source, names or _NAMES
    src = source(C)
    ns: dict = {}
    exec(compile(src.replace("CACHE = True", "CACHE = False"), f"<{_module_name(C, src)}>", "exec"), ns)
    return tuple(ns[k] for k in names)


class _Healing:
    """A kernel loaded from the disk cache whose first call, should it raise, is retried once on a compilation
    in memory. If that one succeeds, the cache entry could not be read (truncated or corrupted by a killed
    process or a full disk, written by another numba or CPU): it is discarded with one warning (the next
    process rebuilds it) and this process keeps the fresh kernel. If it raises too, the error is the
    caller's: it propagates and the cache is left alone. Either way the check is made once."""

    def __init__(self, C: int, which: int, kern, where, source=None, names=()):
        self.C, self.which, self.kern, self.where, self.checked = C, which, kern, where, False
        self.source, self.names = source, names

    def __call__(self, *args):
        if self.checked or self.where is None:
            return self.kern(*args)
        try:
            out = self.kern(*args)
        except Exception as exc:  # noqa: BLE001 - decided below: only a fresh compile that succeeds blames the cache
            self.checked = True
            fresh = _in_memory(self.C, self.source, self.names)[self.which]
            out = fresh(*args)  # raises (the caller's error) if the cache was not the cause
            _purge(*self.where)
            warnings.warn(f"attnbound: discarded an unreadable kernel cache entry {self.where[1]} in "
                          f"{self.where[0]} ({type(exc).__name__}: {exc}); the next process rebuilds it",
                          RuntimeWarning, stacklevel=3)
            self.kern = fresh
        self.checked = True
        return out


@lru_cache(maxsize=None)
def generated(C: int, source: Callable[[int], str] | None = None, names: tuple[str, ...] = ()):
    """The kernels ``names`` of the generated module ``source(C)`` (default: this module's key_partials, readout
    and causal), loaded once per process from the disk cache, each healing an unreadable cache entry once."""
    kerns, where = _load(C, source, names)
    return tuple(_Healing(C, i, k, where, source, names) for i, k in enumerate(kerns))


def _kernels(C: int):
    """The three kernels for C columns (key_partials, readout, causal), loaded once per process."""
    return generated(C)


# ----------------------------------------------------------------------------------------------
# argument handling


def _check(name: str, x, ndim_min: int = 2) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dimensions, got shape {tuple(x.shape)}")
    ok, why = available(x)
    if not ok:
        raise ValueError(f"{name}: the fused kernels cannot run on it: {why}")
    return x


def _check_degree(degree) -> int:
    if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)):
        raise TypeError(f"degree must be an int, got {type(degree).__name__}")
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    return int(degree)


def _check_weights(weights, r: int) -> np.ndarray:
    w = torch.as_tensor(weights)
    if w.shape != (r,):
        raise ValueError(f"weights must have shape ({r},) (the rank), got {tuple(w.shape)}")
    return np.ascontiguousarray(w.detach().to(device="cpu", dtype=torch.float64).numpy())


def _as3(x: torch.Tensor, batch: tuple[int, ...]) -> np.ndarray:
    """(batch..., n, m) → contiguous float64 numpy (B, n, m) (a copy only where needed)."""
    x = x.detach().expand(*batch, *x.shape[-2:])
    return np.ascontiguousarray(x.reshape(-1, *x.shape[-2:]).numpy())


def _alloc(shape) -> np.ndarray:
    return np.full(shape, np.nan) if _POISON else np.empty(shape)


def _column_groups(C: int) -> tuple[int, list[int]]:
    """(width, first columns): C columns in groups of one width ≤ MAX_COLUMNS (the last one padded
    with zero columns), so a wide [V, 1] compiles one kernel width, not two."""
    groups = -(-C // MAX_COLUMNS)
    size = -(-C // groups)
    return size, list(range(0, C, size))


def _take(x: np.ndarray, c0: int, size: int) -> np.ndarray:
    """Columns c0 … c0 + size − 1 of x, contiguous, zero past its last column."""
    part = x[..., c0:c0 + size]
    if part.shape[-1] < size:
        part = np.concatenate([part, np.zeros((*part.shape[:-1], size - part.shape[-1]))], -1)
    return np.ascontiguousarray(part)


def _run_groups(inputs: list[np.ndarray], out: np.ndarray, call) -> None:
    """call(each input's column group, a fresh output of the group's width) for every column group
    of ``out``, the group's result written into ``out``."""
    C = out.shape[-1]
    size, starts = _column_groups(C)
    if size == C:
        call(*(np.ascontiguousarray(x) for x in inputs), out)
        return
    for c0 in starts:
        o = _alloc((*out.shape[:-1], size))
        call(*(_take(x, c0, size) for x in inputs), o)
        out[..., c0:c0 + size] = o[..., :min(size, C - c0)]


def _threads() -> int:
    return int(numba.get_num_threads())


def _key_partials(kk: np.ndarray, vv: np.ndarray, degree: int, nseg: int, per: int, tile: int) -> np.ndarray:
    """Unweighted φ(K)ᵀ[V, 1] of each (batch row, segment of ``per`` tiles of ``tile`` keys): (B·nseg, r, C)."""
    B, n, d = kk.shape
    C = vv.shape[-1]
    r = feature_rank(d, degree)
    items = fused_items(d, degree)
    out = _alloc((B * nseg, r, C))
    kern = _kernels(_column_groups(C)[0])[0]
    _run_groups([vv], out, lambda x, o: kern(kk, x, items, degree, tile, o, nseg, per))
    return out


# ----------------------------------------------------------------------------------------------
# public kernels


def key_state(k: torch.Tensor, vv: torch.Tensor, *, degree: int, weights: torch.Tensor,
              segments: int | None = None) -> torch.Tensor:
    """S = diag(w)·φ(K)ᵀ[V, 1] of shape (…, r, C) for k (…, n, d), vv (…, n, C), w (r,).

    The reference is :func:`attnbound.engines.features.key_state`. Cost n·r·C multiply-adds plus n·r
    multiplies, in tiles of ``KEY_TILE`` keys; ``segments`` (default: enough for every thread)
    splits each sequence into that many parallel partial sums, added at the end.
    """
    _check("k", k), _check("vv", vv)
    degree = _check_degree(degree)
    d, n, C = k.shape[-1], k.shape[-2], vv.shape[-1]
    if vv.shape[-2] != n:
        raise ValueError(f"vv must have as many rows as k ({n}), got {vv.shape[-2]}")
    r = feature_rank(d, degree)
    w = _check_weights(weights, r)
    batch = torch.broadcast_shapes(k.shape[:-2], vv.shape[:-2])
    B = math.prod(batch)
    if n == 0 or B == 0:
        return torch.zeros(*batch, r, C, dtype=torch.float64)
    ntiles = -(-n // KEY_TILE)
    nseg = segments or max(1, min(ntiles, -(-_threads() // B)))
    nseg = max(1, min(int(nseg), ntiles))
    per = -(-ntiles // nseg)
    nseg = -(-ntiles // per)
    part = _key_partials(_as3(k, batch), _as3(vv, batch), degree, nseg, per, KEY_TILE)
    state = part.reshape(B, nseg, r, C).sum(1) * w[:, None]
    return torch.from_numpy(state).reshape(*batch, r, C)


def state_readout(q: torch.Tensor, state: torch.Tensor, *, degree: int) -> torch.Tensor:
    """φ(Q)·S of shape (…, n, C) for q (…, n, d) and a key state S (…, r, C).

    The reference is :func:`attnbound.engines.features.state_readout`. Cost n·r·C multiply-adds plus n·r
    multiplies, in parallel tiles of ``QUERY_TILE`` queries.
    """
    _check("q", q), _check("state", state)
    degree = _check_degree(degree)
    d, n, C = q.shape[-1], q.shape[-2], state.shape[-1]
    r = feature_rank(d, degree)
    if state.shape[-2] != r:
        raise ValueError(f"state must have {r} rows (the rank for d={d}, degree={degree}), got {state.shape[-2]}")
    batch = torch.broadcast_shapes(q.shape[:-2], state.shape[:-2])
    B = math.prod(batch)
    if n == 0 or B == 0:
        return torch.zeros(*batch, n, C, dtype=torch.float64)
    qq, st = _as3(q, batch), _as3(state, batch)
    items = fused_items(d, degree)
    out = _alloc((B, n, C))
    kern = _kernels(_column_groups(C)[0])[1]
    _run_groups([st], out, lambda x, o: kern(qq, x, items, degree, QUERY_TILE, o))
    return torch.from_numpy(out).reshape(*batch, n, C)


def causal_readout(q: torch.Tensor, k: torch.Tensor, vv: torch.Tensor, *, degree: int,
                   weights: torch.Tensor, state: torch.Tensor | None = None,
                   segments: int | None = None) -> torch.Tensor:
    """Row i: φ(q_i)·(S_in + Σ_{j ≤ i} diag(w) φ(k_j)[v_j, 1]ᵀ), shape (…, n, C).

    ``state`` S_in (…, r, C), already weighted, holds the keys before this sequence (None: none).
    The reference is :func:`attnbound.engines.features.causal_readout` (without ``key_log_weight``).
    Cost: one key-state pass over all but the last segment (parallel), then per row
    2·r·C multiply-adds and 2·r multiplies plus O(CAUSAL_TILE·(d + g + C)) for the triangle.
    """
    _check("q", q), _check("k", k), _check("vv", vv)
    if state is not None:
        _check("state", state)
    degree = _check_degree(degree)
    d, n, C = q.shape[-1], q.shape[-2], vv.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"k must have the feature size of q ({d}), got {k.shape[-1]}")
    if k.shape[-2] != n or vv.shape[-2] != n:
        raise ValueError(f"causal attention needs as many keys and vv rows as queries ({n}), "
                         f"got k {k.shape[-2]}, vv {vv.shape[-2]}")
    r = feature_rank(d, degree)
    if state is not None and (state.shape[-2] != r or state.shape[-1] != C):
        raise ValueError(f"state must have shape (..., {r}, {C}), got {tuple(state.shape)}")
    w = _check_weights(weights, r)
    coef = polynomial_of_weights(w, d, degree)
    if coef is None:  # the triangle is evaluated by Horner's rule in ⟨q, k⟩, which needs the engine's weights
        raise ValueError("weights: the fused causal kernel needs weights of the form w_α = a_{|α|}·|α|!/α! "
                         "(monomials.monomial_weights); the reference engine (features.causal_readout) takes any")
    shapes = [q.shape[:-2], k.shape[:-2], vv.shape[:-2]] + ([state.shape[:-2]] if state is not None else [])
    batch = torch.broadcast_shapes(*shapes)
    B = math.prod(batch)
    if n == 0 or B == 0:
        return torch.zeros(*batch, n, C, dtype=torch.float64)
    qq, kk, vvn = _as3(q, batch), _as3(k, batch), _as3(vv, batch)
    ntiles = -(-n // CAUSAL_TILE)
    nseg = segments or max(1, min(ntiles // 4, -(-_threads() // B)))
    nseg = max(1, min(int(nseg), ntiles))
    sub = max(1, -(-_threads() // (B * (nseg - 1)))) if nseg > 1 else 1  # pass-1 splits per segment
    per = -(-ntiles // nseg)
    per = -(-per // sub) * sub  # whole pass-1 splits per segment
    nseg = -(-ntiles // per)
    sin = np.zeros((B, nseg, r, C)) if state is None else _as3(state, batch).reshape(B, 1, r, C).repeat(nseg, 1)
    if nseg > 1:  # each segment's incoming state: the weighted key states of the segments before it
        m = (nseg - 1) * per * CAUSAL_TILE
        parts = _key_partials(np.ascontiguousarray(kk[:, :m]), np.ascontiguousarray(vvn[:, :m]), degree,
                              (nseg - 1) * sub, per // sub, CAUSAL_TILE)
        sin[:, 1:] += np.cumsum(parts.reshape(B, nseg - 1, sub, r, C).sum(2) * w[:, None], axis=1)
    sin = sin.reshape(B * nseg, r, C)
    items = fused_items(d, degree)
    out = _alloc((B, n, C))
    kern = _kernels(_column_groups(C)[0])[2]
    _run_groups([vvn, sin], out,
                lambda x, s_in, o: kern(qq, kk, x, w, coef, items, degree, CAUSAL_TILE, s_in, nseg, per, o))
    return torch.from_numpy(out).reshape(*batch, n, C)
