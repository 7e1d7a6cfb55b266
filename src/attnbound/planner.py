"""The planner: the fastest method whose certificate meets a requested error.

For every candidate — exact attention, Taylor orders p = 0, 2, 4, … and Chebyshev degrees
g = 0, 1, 2, … — :func:`plan` computes the certified output error (docs/theory.md §3, via
:func:`attnbound.certificate.feature_certificate`), the rank r = C(d+g, g), the memory the
engine would allocate, and a predicted time from a cost model:

    exact       t = b·n_q·n_k·(c_pair + c_mac·(d + d_v))   (halved when causal)  + 20·c_op
    features    t = b·(n_q + n_k)·r·(c_feat + c_mac_feat·(d_v + 1))  [+ causal: b·n_q·(64·(r + d_v + 1) + 2r(d_v + 1))·c_mac_feat]
                  + c_op·(#chunks)·(g·d + 6)

The constants are *measured*, not guessed: :func:`attnbound.calibrate.calibrate` times the calls ``method="auto"``
would make — ``attention(method="exact")`` (torch's fused SDPA kernel on the CPU,
:mod:`attnbound.engines.sdpa`) at two head dims and ``attention(method="polynomial")`` at two value
widths — and solves for them. ``attnbound calibrate`` writes them to a JSON file
(:func:`cost_model_path`: ``$ATTNBOUND_COST_MODEL``, else ``~/.cache/attnbound/cost_model.json``)
that :func:`default_cost_model` reads whenever :func:`plan` gets no ``cost_model``; without a
file (or with a corrupt one: a warning) :data:`DEFAULT_COST_MODEL` holds the figures measured on
the 2-core reference machine. The choice is the cheapest candidate that is
certified (error ≤ eps) and fits the memory budget. Every candidate carries its real certificate:
exact's is its worst-case rounding bound (in float64 when the input precision's would exceed eps),
so exact qualifies only when that bound meets eps; when nothing does, :func:`plan` raises.
Approximations are skipped beyond R ≈ 700, where e^R leaves float64. A feature candidate whose
a-priori float64 rounding bound misses eps but whose approximation term is ≤ eps/2 is
*provisional*: the run measures its row sums and the a-posteriori rounding bound
(:func:`attnbound.certificate.feature_certificate`) decides; ``method="auto"`` falls back to exact
when that misses eps, so the returned certificate always meets it.

Engines are not the planner's to decide: each candidate asks :mod:`attnbound.engines.registry` which
engine would run it (``Candidate.engine``) and records why faster ones were passed over
(``Candidate.rejected``). The causal term models the torch engine's triangular tiles
(``registry.ENGINES["torch"].causal_tile``); the fused kernels' Horner triangle is cheaper, so causal
feature runs on them are over-estimated.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch

from . import validation as val
from .certificate import Certificate, exact_certificate, unit_roundoff
from .engines import registry
from .engines.reference import DEFAULT_BLOCK, use_dense
from .engines.flash import flash_candidate, flash_memory_bytes
from .engines.sdpa import sdpa_candidate, sdpa_memory_bytes
from .engines.monomials import feature_rank
from .engines.features import chunk_rows, feature_memory_bytes
from .families import FAMILIES, degree_certificate


@dataclass(frozen=True)
class CostModel:
    """Seconds per unit of work; see the module docstring for the formulas."""

    c_pair: float  # exact: per (query, key) pair (exp, max, sum)
    c_mac: float  # exact: per multiply-add of the score and value GEMMs
    c_feat: float  # features: per (row, monomial) built
    c_mac_feat: float  # features: per multiply-add of the thin float64 GEMMs
    c_op: float  # per torch op dispatched (Python overhead)

    def exact_seconds(self, batch, n_q, n_k, d, d_v, is_causal=False) -> float:
        """One fused SDPA call: per pair and per multiply-add, plus a few dispatched ops."""
        t = batch * n_q * n_k * (self.c_pair + self.c_mac * (d + d_v))
        return (0.5 if is_causal else 1.0) * t + self.c_op * 20

    def as_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        """Write the constants as JSON (with the torch version and thread count they were measured with)."""
        path = pathlib.Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"format": COST_MODEL_FORMAT, "version": 1, "constants": self.as_dict(), "torch": torch.__version__,
               "threads": torch.get_num_threads()}
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, path)  # readers never see half a file
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CostModel":
        """Read a file written by :meth:`save`; ValueError naming the file and what is wrong with it."""
        path = pathlib.Path(path).expanduser()
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cost model file {path}: cannot be read as JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != COST_MODEL_FORMAT or doc.get("version") != 1:
            raise ValueError(f"cost model file {path}: not a version-1 {COST_MODEL_FORMAT} file")
        consts = doc.get("constants")
        names = [f.name for f in fields(cls)]
        if not isinstance(consts, dict) or sorted(consts) != sorted(names):
            raise ValueError(f"cost model file {path}: 'constants' must hold exactly {', '.join(names)}")
        for name in names:
            x = consts[name]
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not (math.isfinite(x) and x > 0):
                raise ValueError(f"cost model file {path}: {name} must be a positive finite number, got {x!r}")
        return cls(**{name: float(consts[name]) for name in names})

    def feature_seconds(self, batch, n_q, n_k, d, d_v, degree, is_causal=False) -> float:
        r = feature_rank(d, degree)
        chunk = chunk_rows(batch, r)
        t = batch * (n_q + n_k) * r * (self.c_feat + self.c_mac_feat * (d_v + 1))
        ops = 0
        if is_causal:  # triangular tiles, plus the per-tile state readout and update: the torch engine's
            tile = min(registry.ENGINES["torch"].causal_tile, n_q)  # model (an over-estimate for the fused pass)
            t += batch * n_q * (tile * (r + d_v + 1) + 2 * r * (d_v + 1)) * self.c_mac_feat
            ops = 6 * math.ceil(n_q / tile)
        chunks = math.ceil(n_q / chunk) + math.ceil(n_k / chunk)
        return t + self.c_op * (chunks * (degree * d + 6) + ops)


# Measured with `attnbound calibrate` (torch 2.13 CPU, 2 threads, exact through SDPA) on the project's
# reference machine, a shared 2-core machine: one run, figures within a factor of about 2.
DEFAULT_COST_MODEL = CostModel(c_pair=4.7e-10, c_mac=9.3e-12, c_feat=8.6e-10, c_mac_feat=1.7e-11, c_op=9.0e-07)

COST_MODEL_FORMAT = "attnbound-cost-model"
COST_MODEL_ENV = "ATTNBOUND_COST_MODEL"


def cost_model_path() -> pathlib.Path:
    """Where ``attnbound calibrate`` writes and :func:`default_cost_model` reads the measured constants:
    ``$ATTNBOUND_COST_MODEL`` if set, else ``$XDG_CACHE_HOME/attnbound/cost_model.json`` (``~/.cache``)."""
    env = os.environ.get(COST_MODEL_ENV)
    if env:
        return pathlib.Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(cache) / "attnbound" / "cost_model.json"


_LOADED: dict = {}


def default_cost_model() -> CostModel:
    """The measured cost model at :func:`cost_model_path` if there is one, else :data:`DEFAULT_COST_MODEL`.

    A file that cannot be used (not JSON, another format, a missing or non-positive constant) gives a
    RuntimeWarning naming it and the built-in model. Files are re-read when they change.
    """
    path = cost_model_path()
    try:
        stat = path.stat()
    except OSError:
        return DEFAULT_COST_MODEL
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _LOADED:
        try:
            _LOADED[key] = CostModel.load(path)
        except ValueError as exc:
            warnings.warn(f"{exc}; planning with the built-in cost model (`attnbound calibrate` rewrites it)",
                          RuntimeWarning, stacklevel=2)
            return DEFAULT_COST_MODEL
    return _LOADED[key]


@dataclass(frozen=True)
class Candidate:
    method: str  # "exact", "taylor", "polynomial"
    degree: int | None
    rank: int | None
    error_bound: float
    seconds: float
    memory_bytes: int
    certified: bool
    fits_memory: bool
    certificate: Certificate | None = None
    provisional: bool = False  # approximation ≤ eps/2; the run's own a-posteriori rounding bound must do the rest
    variant: str = ""  # how the radius was shrunk (centring, heavy tokens exact), for feature candidates
    engine: str | None = None  # the engine that would run it (attnbound.engines.registry)
    rejected: dict = field(default_factory=dict)  # faster engines passed over: name -> reasons


# measured (n = 2^17, d = 8, rank 3003, one thread): the torch causal engine 4.5 s against the fused kernel's 0.53 s
CAUSAL_WEIGHTED_SLOWDOWN = 8.0


@dataclass(frozen=True)
class Variant:
    """One way to shrink the radius the polynomial must cover (see :mod:`attnbound.centring`)."""

    label: str  # e.g. "plain", "centred", "centred + 8 heavy"
    radius: float
    centre: bool = False
    heavy: int = 0  # keys and queries computed exactly
    key_log_weight: float | None = None  # bound on the per-key log-weights' rounding argument
    exact_eta: float = 0.0  # relative rounding of the exactly computed heavy weights


@dataclass(frozen=True)
class Plan:
    choice: Candidate
    candidates: list[Candidate] = field(default_factory=list)
    eps: float = 0.0
    radius: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


_RAM_READ: list = [-1.0, 0]  # (monotonic time, budget) of the last /proc/meminfo read


def default_memory_budget(device: torch.device | str = "cpu") -> int:
    """Half of the memory available now (RAM, read at most every 0.2 s, or free GPU memory on CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    now = time.monotonic()
    if now - _RAM_READ[0] < 0.2:
        return _RAM_READ[1]
    _RAM_READ[:] = [now, _ram_budget()]
    return _RAM_READ[1]


def _ram_budget() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // 2)


def exact_memory_bytes(batch_numel: int, n_q: int, n_k: int, d_v: int, block: int | None, itemsize: int) -> int:
    """Peak bytes of exact attention beyond its inputs: about three score-sized temporaries (dense: n_q×n_k;
    blockwise: block×block per query chunk) plus the running statistics and the output."""
    rows, cols = (n_q, n_k) if block is None else (min(block, n_q), min(block, n_k))
    return batch_numel * (3 * rows * cols + 3 * n_q * (d_v + 2)) * itemsize


def exact_candidate(*, kind: str, logit_bound: float, mask_span: float, d: int, n_k: int, block: int | None,
                    value_range: float, max_abs_value: float, out_dtype: torch.dtype, eps: float | None,
                    norms_product: float = 0.0, scale: float = 0.0) -> Certificate:
    """The exact method's certificate in the input dtype's compute precision, or in float64 when that one's
    logits, the unscaled products or the scale itself could overflow, or (with ``eps``) its rounding bound
    would exceed eps."""
    cd = val.compute_dtype(out_dtype)

    def cert(dtype):
        blocks = -(-n_k // block) if block else 1
        return exact_certificate(kind=kind, logit_bound=logit_bound, mask_span=mask_span, d=d, n_k=n_k,
                                 blocks=blocks, block=block, value_range=value_range, max_abs_value=max_abs_value,
                                 compute_dtype=dtype, out_dtype=out_dtype, scale=scale, eps=eps)

    if cd != torch.float64:
        c = cert(cd)
        overflow = max(logit_bound, norms_product, scale) * 8.0 > float(torch.finfo(cd).max)
        if not overflow and (eps is None or c.output_error_bound <= eps):
            return c
    return cert(torch.float64)


def dtype_eps_reason(max_abs_value: float, eps: float, dtype: torch.dtype) -> str | None:
    """The reason no method can meet eps in ``dtype`` output (its rounding alone exceeds eps), or None."""
    u_out = unit_roundoff(dtype)
    if dtype != torch.float64 and u_out * max_abs_value > eps:
        return (f"eps: {str(dtype).replace('torch.', '')} output cannot carry eps={eps:g}: its rounding alone is "
                f"2^{math.log2(u_out):.0f}·max|v| = {u_out * max_abs_value:.3g}; pass "
                f"{'float64' if dtype == torch.float32 else 'float32/float64'} inputs or a larger eps")
    return None


def exact_eps_reason(cert: Certificate, eps: float, dtype: torch.dtype) -> str:
    """Why exact attention cannot certify eps: the output dtype's own rounding, or the worst-case bound."""
    why = dtype_eps_reason(cert.max_abs_value, eps, dtype)
    if why:
        return why
    return (f"eps: exact attention's worst-case rounding bound is {cert.output_error_bound:.3g} > eps={eps:g} "
            f"even in {cert.compute_dtype} (logits up to the data's s·max‖q‖·max‖k‖, value range "
            f"{cert.value_range:.3g}); pass a larger eps or smaller inputs")


def plan(
    n_q: int,
    n_k: int,
    d: int,
    d_v: int,
    radius: float,
    eps: float,
    is_causal: bool = False,
    *,
    batch: int = 1,
    kind: str = "softmax",
    value_range: float = 2.0,
    max_abs_value: float = 1.0,
    memory_budget: int | None = None,
    requires_grad: bool = False,
    cost_model: CostModel | None = None,
    out_dtype: torch.dtype = torch.float32,
    logit_bound: float | None = None,
    scale: float | None = None,
    mask_span: float = 0.0,
    key_log_weight: float | None = None,
    radius_source: str = "data",
    variants: list[Variant] | None = None,
    device: torch.device | str = "cpu",
) -> Plan:
    """Plan the ``method="auto"`` run: every candidate's real certificate, rank, engine and predicted cost.

    ``radius`` bounds |s⟨q,k⟩| over all pairs; ``value_range``/``max_abs_value`` describe V
    (defaults: entries in [−1, 1]); ``logit_bound`` bounds |logit| for the exact candidate's
    rounding certificate (default: ``radius``; ℓ2 attention needs s·(max‖q‖ + max‖k‖)²), and
    ``key_log_weight`` the ℓ2 key log-weights (s·max‖k‖²). Returns a :class:`Plan` whose ``choice``
    is the cheapest candidate with error ≤ eps that fits ``memory_budget`` bytes. Exact is computed
    in float64 when the input precision's rounding bound would exceed eps (and costs twice as
    much); when no candidate is certified, raises ValueError saying why. Each candidate names the
    engine that would run it and why faster engines were passed over (:mod:`attnbound.engines.registry`).
    """
    _check_plan_args(n_q=n_q, n_k=n_k, d=d, d_v=d_v, batch=batch, radius=radius, value_range=value_range,
                     max_abs_value=max_abs_value, eps=eps)
    if logit_bound is None:
        if kind == "l2":
            raise ValueError("logit_bound: ℓ2 attention needs the exact logit bound s·(max‖q‖ + max‖k‖)²")
        logit_bound = radius
    shape = _Shape(batch, n_q, n_k, d, d_v, is_causal, kind, str(torch.device(device).type), requires_grad)
    cm = cost_model or default_cost_model()
    budget = memory_budget if memory_budget is not None else default_memory_budget()
    exact = _exact_candidate(shape, cm, budget, eps=eps, logit_bound=float(logit_bound), mask_span=mask_span,
                             scale=scale, value_range=value_range, max_abs_value=max_abs_value, out_dtype=out_dtype)
    candidates = [exact]
    for var in variants or [Variant("plain", float(radius), key_log_weight=key_log_weight)]:
        candidates += _feature_candidates(shape, cm, budget, var, exact, eps=eps, value_range=value_range,
                                          max_abs_value=max_abs_value, out_dtype=out_dtype,
                                          radius_source=radius_source)
    usable = [c for c in candidates if (c.certified or c.provisional) and c.fits_memory]
    if not usable:
        raise ValueError(_nothing_certified(exact, eps, budget, float(radius), max_abs_value, out_dtype))
    choice = min(usable, key=lambda c: (c.seconds, c.provisional))
    return Plan(choice=choice, candidates=candidates, eps=float(eps), radius=float(radius))


@dataclass(frozen=True)
class _Shape:
    batch: int
    n_q: int
    n_k: int
    d: int
    d_v: int
    is_causal: bool
    kind: str
    device: str
    requires_grad: bool


def _check_plan_args(*, eps, **sizes) -> None:
    for name in ("n_q", "n_k", "d", "d_v", "batch"):
        v = sizes[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    for name in ("radius", "value_range", "max_abs_value"):
        v = sizes[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be positive and finite, got {eps!r}")


def _exact_candidate(shape: _Shape, cm: CostModel, budget: int, *, eps, logit_bound, mask_span, scale,
                     value_range, max_abs_value, out_dtype) -> Candidate:
    """The exact candidate, as the run stage chooses: the flash kernel in its pinned order (float32) when its
    certificate meets eps; else SDPA with its any-order certificate when that meets eps; else the blockwise
    (or dense) kernel, whose bound is tighter, in the input precision or float64."""
    b, n_q, n_k, d, d_v = shape.batch, shape.n_q, shape.n_k, shape.d, shape.d_v
    common = dict(kind=shape.kind, logit_bound=logit_bound, mask_span=mask_span, d=d, n_k=n_k,
                  scale=float(scale) if scale is not None else 1.0 / math.sqrt(d), value_range=value_range,
                  max_abs_value=max_abs_value, out_dtype=out_dtype, eps=eps)
    cost = cm.exact_seconds(b, n_q, n_k, d, d_v, shape.is_causal)
    req = registry.Request("exact", shape.device, val.compute_dtype(out_dtype), "none", shape.is_causal,
                           shape.requires_grad)
    fc, chunk = flash_candidate(**common)
    rejected = {"flash": registry.ENGINES["flash"].not_supported_reasons(req)}
    if not rejected["flash"] and logit_bound * 8.0 > float(torch.finfo(torch.float32).max):
        rejected["flash"].append("its float32 logits could overflow")
    if not fc.output_error_bound <= eps:
        rejected["flash"].append(f"its pinned-order float32 bound {fc.output_error_bound:.3g} > eps={eps:g}")
    flash_mem = flash_memory_bytes(b, n_q, n_k, d, d_v, chunk=chunk)
    if flash_mem > budget:
        rejected["flash"].append(f"needs about {flash_mem / 2**20:.1f} MiB (budget {budget / 2**20:.1f} MiB)")
    if not rejected["flash"]:
        return Candidate("exact", None, None, fc.output_error_bound, cost, flash_mem, True, True, fc,
                         engine=fc.engine, rejected={})
    ex = sdpa_candidate(**common)
    rejected["sdpa"] = registry.ENGINES["sdpa"].not_supported_reasons(req)
    if not ex.output_error_bound <= eps:
        rejected["sdpa"].append(f"its any-order bound {ex.output_error_bound:.3g} > eps={eps:g}")
    sdpa_mem = sdpa_memory_bytes(b, n_q, n_k, d_v, 8 if ex.compute_dtype == "float64" else 4)
    if sdpa_mem > budget:  # as the run stage: then the project's kernel, which may fit
        rejected["sdpa"].append(f"needs about {sdpa_mem / 2**20:.1f} MiB (budget {budget / 2**20:.1f} MiB)")
    on_sdpa = not rejected["sdpa"]
    if not on_sdpa:  # then the project's kernel, whose bound is tighter: dense where it fits (as the run decides)
        dense = use_dense(b, n_q, n_k) and exact_memory_bytes(b, n_q, n_k, d_v, None, 8) <= budget
        ex = exact_candidate(block=None if dense else DEFAULT_BLOCK, **common)
    else:
        del rejected["sdpa"]
    item = 8 if ex.compute_dtype == "float64" else 4
    slow = 2.3 if ex.compute_dtype == "float64" and val.compute_dtype(out_dtype) != torch.float64 else 1.0
    mem = sdpa_memory_bytes(b, n_q, n_k, d_v, item) if on_sdpa else exact_memory_bytes(
        b, n_q, n_k, d_v, None if ex.engine == "dense" else DEFAULT_BLOCK, item)
    return Candidate("exact", None, None, ex.output_error_bound, slow * cost,
                     mem, ex.output_error_bound <= eps, mem <= budget, ex, engine=ex.engine, rejected=rejected)


def _feature_candidates(shape: _Shape, cm: CostModel, budget: int, var: Variant, exact: Candidate, *, eps,
                        value_range, max_abs_value, out_dtype, radius_source) -> list[Candidate]:
    """Each family's degrees on one variant, from 0 up to the first certified (or provisional) one, one over
    the budget, or one predicted 10× slower than exact."""
    b, n_q, n_k, d, d_v, causal = shape.batch, shape.n_q, shape.n_k, shape.d, shape.d_v, shape.is_causal
    if not (var.radius <= 700.0 and var.radius + math.log(n_k + 1.0) + 4.0 < 709.0):
        return []
    mask = "none" if var.key_log_weight is None and not var.centre else "key weights"
    engine, rejected = registry.choose(registry.Request("features", shape.device, torch.float64, mask, causal,
                                                        shape.requires_grad))
    # heavy tokens: h key columns for every query row and h query rows against every key, exactly
    extra = (cm.exact_seconds(b, n_q, var.heavy, d, d_v) + cm.exact_seconds(b, var.heavy, n_k, d, d_v)
             if var.heavy else 0.0) + (cm.c_op * 8 if var.centre else 0.0)
    out = []
    for fam in FAMILIES.values():
        for g in fam.degrees():
            r = feature_rank(d, g)
            mem = feature_memory_bytes(b, n_q, n_k, d, d_v, r, chunk_rows(b, r), is_causal=causal,  # the fused
                                       requires_grad=shape.requires_grad and engine != "fused")  # backward saves none
            cert = degree_certificate(fam.name, var.radius, g, d=d, n_k=n_k, value_range=value_range,
                                      max_abs_value=max_abs_value, kind=shape.kind, radius_source=radius_source,
                                      out_dtype=out_dtype, eps=eps, key_log_weight=var.key_log_weight,
                                      exact_eta=var.exact_eta)
            err = cert.output_error_bound
            provisional = not err <= eps and cert.eta < 1.0 and cert.approximation_bound <= eps / 2.0
            secs = cm.feature_seconds(b, n_q, n_k, d, d_v, g, causal)
            if causal and (var.centre or var.key_log_weight is not None):
                secs *= CAUSAL_WEIGHTED_SLOWDOWN  # per-key weights under is_causal: the torch engine's weighted walk
            cand = Candidate(fam.name, g, r, err, secs + extra, mem, err <= eps, mem <= budget, cert, provisional,
                             var.label, engine=engine, rejected=rejected)
            out.append(cand)
            if cand.certified or provisional or not cand.fits_memory or cand.seconds > 10 * exact.seconds:
                break
    return out


def features_cannot_win(n_q: int, n_k: int, d: int, d_v: int, radius_floor: float, eps: float, is_causal: bool, *,
                        batch: int, kind: str, value_range: float, max_abs_value: float, out_dtype: torch.dtype,
                        logit_bound: float, scale: float, mask_span: float, memory_budget: int,
                        requires_grad: bool, cost_model: CostModel | None = None, device="cpu") -> bool:
    """True when no feature candidate of any variant could be :func:`plan`'s choice, so ``auto`` may run
    exact without planning the variants: exact is certified and fits, and every family's every degree
    predicted faster than exact misses eps (and eps/2 in its approximation term) even at ``radius_floor``,
    a lower bound on every variant's radius, without per-key weights or heavy-pair rounding (each only adds
    error; every family's bound grows with the radius). A planning shortcut: it decides which runs are
    tried, never a certificate."""
    shape = _Shape(batch, n_q, n_k, d, d_v, is_causal, kind, str(torch.device(device).type), requires_grad)
    cm = cost_model or default_cost_model()
    exact = _exact_candidate(shape, cm, memory_budget, eps=eps, logit_bound=float(logit_bound), mask_span=mask_span,
                             scale=scale, value_range=value_range, max_abs_value=max_abs_value, out_dtype=out_dtype)
    if not (exact.certified and exact.fits_memory):
        return False
    for fam in FAMILIES.values():
        for g in fam.degrees():
            if cm.feature_seconds(batch, n_q, n_k, d, d_v, g, is_causal) >= exact.seconds:
                break  # this degree and every higher one is slower than exact
            cert = degree_certificate(fam.name, radius_floor, g, d=d, n_k=n_k, value_range=value_range,
                                      max_abs_value=max_abs_value, kind=kind, radius_source="data",
                                      out_dtype=out_dtype, eps=eps)
            if cert.output_error_bound <= eps or (cert.eta < 1.0 and cert.approximation_bound <= eps / 2.0):
                return False
    return True


def _nothing_certified(exact: Candidate, eps: float, budget: int, radius: float, max_abs_value: float,
                       out_dtype: torch.dtype) -> str:
    dtype_why = dtype_eps_reason(max_abs_value, eps, out_dtype)
    if dtype_why:
        return dtype_why
    why = (f"exact attention's worst-case rounding bound is {exact.error_bound:.3g} even in "
           f"{exact.certificate.compute_dtype}" if not exact.certified else
           f"exact attention needs about {exact.memory_bytes / 2**20:.1f} MiB (budget {budget / 2**20:.1f} MiB)")
    return (f"eps={eps:g}: no candidate is certified within the memory budget: {why}, and no "
            f"approximation up to the degree caps meets eps at radius R={radius:.4g}; pass a larger "
            f"eps or memory_budget")
