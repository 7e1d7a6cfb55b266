"""Autoregressive decoding with a certified constant-size state (docs/theory.md §2, §3, §6).

With P(x) = Σ_j a_j (x/R)^j approximating exp on [−R, R] (an approximation family of
:mod:`attnbound.families`), the feature engine writes P(s⟨q, k⟩) = ⟨φ(q'), w ⊙ φ(k')⟩ with q' = α_q·q,
k' = α_k·k and α_q α_k = s/R, φ the r = C(d+g, g) monomials of degree ≤ g. Every key seen so far
enters the output of a new query q only through the state

    S_t = Σ_{j≤t} diag(w)·φ(k'_j)·[v_j, 1]ᵀ        (r × (d_v + 1)),

so ``out(q) = φ(q')ᵀ S_{:, :d_v} / φ(q')ᵀ S_{:, d_v}``. Appending a key costs O(r·d_v) (plus O(r)
to build its features) and the state holds r·(d_v + 1) numbers whatever the context length n; a
KV cache holds n·(d + d_v) and an exact query over it costs O(n·(d + d_v)).

**The radius must hold for keys not yet seen.** The state fixes P (hence R) when it is built, so R
comes from a declaration made up front, never from the data: an entry bound B on |q|, |k|
(R = s·d·B², as ``attention(bound=B)``), or Euclidean norm bounds ‖q‖ ≤ Q, ‖k‖ ≤ K (R = s·Q·K;
``radius=R`` declares Q = K = √(R/s)). Every appended key and every query is checked against the
declaration (in float64) and a violation raises ``ValueError`` before anything changes.

**The certificate** of every answer is :func:`attnbound.certificate.feature_certificate` at that
radius and degree, with n_k the number of keys appended so far and the value range / max|v| of
those keys, tracked as they arrive (running per-(batch, column) minimum and maximum). The
theorem (real numbers, plus the float64 rounding term): each weight P(x_ij) is e^{x_ij}(1 + η_ij)
with |η_ij| ≤ η(R, g) < 1 because |x_ij| ≤ R for every pair the declaration admits, so
|out_ic − exact_ic| ≤ η/(1−η)·(max_j v_jc − min_j v_jc) + rounding, exact being the attention of
the query over every key appended so far. Outputs are clamped to each column's running
[min, max] (where every exact output lies), which can only move them closer.

**KV cache first.** While n·(d + d_v) < r·(d_v + 1) the object keeps the keys and values (in the
input dtype) and answers by exact attention over them (:func:`attnbound.attention`, whose
certificate is the exact one); at the first append that reaches the threshold it builds S from the
cached keys (O(n·r·d_v) once), frees the cache and never goes back.

**Degree.** A fixed ``degree`` (even Taylor order) or the smallest one certified for ``eps``
(``method="auto"``: the family of smallest rank; exact forever when none is certified or the
state would never be smaller). The degree is the smallest whose approximation term η/(1−η)·range
is ≤ eps/2, leaving the other half to the float64 rounding term, which grows with n (about
n·2^−53·Σ|a_j|·e^R·2·max|v|: far below eps/2 at any practical length unless R is large). The range
is that of the declared ``value_bound`` M (range 2M) or, without one, of M = twice the largest |v|
seen so far (re-chosen while the cache is kept; fixed when the state is built). Every answer's
certificate is recomputed for the keys actually seen, and a query whose bound would exceed ``eps``
(values beyond M, or a length where rounding takes the other half) raises ``ValueError``.

Causal prefill: :meth:`DecodingState.step` takes t new tokens' queries, keys and values at once;
query i sees every earlier key and the new keys up to i (the chunked prefix sum of the engine
with the state as its incoming prefix; up to one engine tile of t rows, the new keys' features are
built once, by one gather and multiply per degree, and serve both the readout and the update). :meth:`append` followed by :meth:`query` lets every
query see every appended key.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from . import validation as val
from .api import attention
from .certificate import Certificate
from .eager import eager_only
from .engines.monomials import feature_rank, few_row_features, gather_plan, monomial_weights
from .families import MAX_FEATURE_RADIUS, certified_degree, degree_certificate, family, polynomial_setup
from .engines.features import (CAUSAL_TILE, causal_readout_on, chunk_rows, engine_for, key_state_on,
                               normalize_readout, readout_on, weighted_values)

VALUE_MARGIN = 2.0  # without value_bound, the degree is chosen for this multiple of the largest |v| seen so far
DECODING_METHODS = ("auto", "exact") + val.FEATURE_METHODS


def _atomic(method):
    """Compute, then commit: a call that raises leaves the state exactly as it was.

    The attributes are restored from a shallow copy taken on entry; nothing here mutates a tensor the
    state already holds (the key state is replaced, never added to in place; the cache writes only rows
    past ``n``, which no answer reads until ``n`` moves), so the copy is the whole state."""
    @functools.wraps(method)
    def atomic(self, *args, **kwargs):
        saved = dict(self.__dict__)
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise
    return atomic


class DecodingState:
    """Keys and values of a growing sequence, answered with certified attention in O(r·d_v) memory.

    Args:
        d, d_v: key/query and value widths.
        scale: s (``None``: 1/√d).
        bound: declared entry bound B on every |q| and |k| entry: R = s·d·B².
        norms: declared (Q, K) with ‖q‖₂ ≤ Q and ‖k‖₂ ≤ K for every query and key: R = s·Q·K.
        radius: declared R, meaning norms (√(R/s), √(R/s)).
            Exactly one of bound / norms / radius is needed unless ``method="exact"``.
        eps: target ‖out − exact‖∞ (required for ``"auto"``; with ``degree`` it is checked).
        method: ``"auto"``, ``"exact"`` (a KV cache forever) or an approximation family
            (``"polynomial"``, ``"taylor"``, ``"relative"``).
        degree: fixed degree (even order for Taylor) instead of ``eps``.
        value_bound: declared max |v|; the degree chosen for ``eps`` then holds for any values.
        keep_cache: keep a KV cache while it is smaller than the state (default); False builds
            the state at the first append (needs ``degree`` or ``value_bound`` with ``eps``).
        batch_shape: leading dims of every key and value; queries' leading dims broadcast to it.
        dtype, device: of keys, values, queries and outputs (the state itself is float64).

    Cost: :meth:`append` of t keys is O(t·r·d_v) in state mode and O(t·(d + d_v)) amortised in
    cache mode; :meth:`query` of t_q queries is O(t_q·r·d_v) in state mode and O(t_q·n·(d + d_v))
    in cache mode. Memory: the state r·(d_v + 1) float64 numbers per batch entry, or the cache.
    """

    def __init__(self, d: int, d_v: int, *, scale: float | None = None, bound: float | None = None,
                 norms: tuple[float, float] | None = None, radius: float | None = None, eps: float | None = None,
                 method: str = "auto", degree: int | None = None, value_bound: float | None = None,
                 keep_cache: bool = True, batch_shape=(), dtype: torch.dtype = torch.float32, device=None):
        for name, x in (("d", d), ("d_v", d_v)):
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise ValueError(f"{name} must be a positive int, got {x!r}")
        val.check_choice("method", method, DECODING_METHODS)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        try:
            self.batch_shape = torch.Size(batch_shape)
        except (TypeError, ValueError) as err:
            raise TypeError(f"batch_shape must be a tuple of ints, got {batch_shape!r}") from err
        self.d, self.d_v, self.dtype = d, d_v, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.scale = val.resolve_scale(scale, d)
        self.eps = val.check_eps(eps, required=(method == "auto"))
        self.method = method
        if value_bound is not None:
            value_bound = float(value_bound)
            if not (math.isfinite(value_bound) and value_bound >= 0):
                raise ValueError(f"value_bound must be a finite number ≥ 0, got {value_bound!r}")
        self.value_bound = value_bound
        self.keep_cache = bool(keep_cache)
        self._declare_radius(bound, norms, radius)
        if method in val.FEATURE_METHODS:
            fam = family(method)
            if degree is not None:
                fam.check_degree(degree)
            elif self.eps is None:
                raise ValueError(f"method={method!r} needs eps (target error) or degree (fixed)")
            if self.radius is None:
                raise ValueError(f"method={method!r} needs a declared bound, norms or radius: the radius must "
                                 "hold for keys not yet seen")
            if not self.radius <= MAX_FEATURE_RADIUS:
                raise ValueError(f"radius R = {self.radius:.4g} is beyond what float64 features can represent")
            if degree is not None and not fam.eta(self.radius, degree) < 1.0:
                raise ValueError(f"cannot certify {method} {fam.degree_name} {degree} at radius R={self.radius:.4g} "
                                 "(η ≥ 1); raise the degree or use method='exact'")
        elif degree is not None:
            raise ValueError(f"degree is for an approximation family, not method={method!r}")
        if not keep_cache and (method == "exact" or (degree is None and value_bound is None)):
            raise ValueError("keep_cache=False needs an approximation family with a degree, or eps with value_bound "
                             "(the state's degree must be known before the first values arrive)")
        if method == "auto" and self.radius is None:
            raise ValueError("method='auto' needs a declared bound, norms or radius (or use method='exact')")
        self.degree = degree
        self.n = 0
        self._hi = torch.full((*self.batch_shape, d_v), -math.inf, dtype=torch.float64, device=self.device)
        self._lo = torch.full((*self.batch_shape, d_v), math.inf, dtype=torch.float64, device=self.device)
        self._k = self._v = None  # cache buffers (capacity ≥ n)
        self._state = None
        self._plan = None  # (method, degree, rank) of the state to build, or None: exact
        self._planned_for = -1.0  # the max|v| the current plan covers
        self._replan()

    # -- declarations ---------------------------------------------------------------------------
    def _declare_radius(self, bound, norms, radius):
        given = [x is not None for x in (bound, norms, radius)]
        if sum(given) > 1:
            raise ValueError("declare only one of bound, norms, radius")
        self.bound, self.norms, self.radius, self.radius_source = None, None, None, None
        if bound is not None:
            b = val.check_bound(bound)
            if not b > 0:
                raise ValueError(f"bound must be positive, got {bound!r}")
            self.bound = b
            self.radius = self.scale * self.d * b * b
            self.radius_source = "bound"
        elif norms is not None or radius is not None:
            if radius is not None:
                r = float(radius)
                if not (math.isfinite(r) and r > 0):
                    raise ValueError(f"radius must be positive and finite, got {radius!r}")
                qn = kn = math.sqrt(r / self.scale)
            else:
                try:
                    qn, kn = (float(x) for x in norms)
                except (TypeError, ValueError) as err:
                    raise ValueError(f"norms must be a pair (max ‖q‖, max ‖k‖), got {norms!r}") from err
                if not all(math.isfinite(x) and x > 0 for x in (qn, kn)):
                    raise ValueError(f"norms must be positive and finite, got {norms!r}")
            self.norms = (qn, kn)
            self.radius = self.scale * qn * kn
            self.radius_source = "bound"

    def _check_declared(self, name: str, x: torch.Tensor, which: int) -> None:
        if self.bound is not None:
            top = float(x.detach().abs().max()) if x.numel() else 0.0
            if top > self.bound:
                raise ValueError(f"{name} has an entry of magnitude {top:.6g} above the declared bound={self.bound:g}")
        elif self.norms is not None:
            top = float(torch.linalg.vector_norm(x.detach().double(), dim=-1).max()) if x.numel() else 0.0
            if top > self.norms[which]:
                raise ValueError(f"{name} has a row of norm {top:.6g} above the declared norm bound "
                                 f"{self.norms[which]:g} (radius R = {self.radius:.4g})")

    def _check(self, name: str, x, width: int, *, exact_batch: bool) -> torch.Size:
        val.check_tensor(name, x)
        if x.dtype != self.dtype:
            raise TypeError(f"{name} must have dtype {self.dtype}, got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"{name} must be on {self.device}, got {x.device}")
        if x.shape[-1] != width:
            raise ValueError(f"{name} must have last dim {width}, got shape {tuple(x.shape)}")
        if exact_batch and x.shape[:-2] != self.batch_shape:
            raise ValueError(f"{name} must have leading dims {tuple(self.batch_shape)}, got shape {tuple(x.shape)}")
        try:
            batch = torch.broadcast_shapes(x.shape[:-2], self.batch_shape)
        except RuntimeError as err:
            raise ValueError(f"{name}'s leading dims {tuple(x.shape[:-2])} do not broadcast with "
                             f"batch_shape {tuple(self.batch_shape)}") from err
        val.check_finite(name, x)
        return batch

    # -- planning ---------------------------------------------------------------------------------
    def _value_stats(self, hi=None, lo=None) -> tuple[float, float]:
        """(max over batch and columns of max_j v_jc − min_j v_jc, max|v|) of the values appended so far."""
        hi = self._hi if hi is None else hi
        lo = self._lo if lo is None else lo
        if hi.numel() == 0 or not bool(torch.isfinite(hi).all()):
            return 0.0, 0.0
        return float((hi - lo).max()), float(torch.maximum(hi.abs(), lo.abs()).max())

    def _replan(self) -> None:
        """Choose (method, degree, rank) for the state, for the values seen so far (cache mode only)."""
        if self.method == "exact" or self.radius is None or self._state is not None:
            self._plan = None
            return
        if self.degree is not None:
            self._plan = (self.method, self.degree, feature_rank(self.d, self.degree))
            self._planned_for = math.inf
            return
        if self.value_bound is not None:
            spread, top = 2.0 * self.value_bound, self.value_bound
            cover = math.inf
        else:
            top = VALUE_MARGIN * self._value_stats()[1]
            spread, cover = 2.0 * top, top
            if top == 0.0:  # no nonzero value yet: nothing to plan for, keep the cache
                self._plan, self._planned_for = None, 0.0
                return
        methods = val.FEATURE_METHODS if self.method == "auto" else (self.method,)
        best = None
        for m in methods:
            c = certified_degree(m, self.radius, self.eps / 2.0, d=self.d, n_k=1, value_range=spread,
                                 max_abs_value=top, radius_source=self.radius_source, out_dtype=self.dtype,
                                 rounding=False)
            if c is not None and (best is None or (c.rank, c.output_error_bound) < (best.rank, best.output_error_bound)):
                best = c
        if best is None and self.method != "auto":
            raise ValueError(f"eps={self.eps:g} cannot be certified by method={self.method!r} at radius "
                             f"R={self.radius:.4g} for values of range {spread:.4g}; use method='exact' or 'auto'")
        self._plan = None if best is None else (best.method, best.degree, best.rank)
        self._planned_for = cover

    def _state_is_smaller(self, n: int) -> bool:
        if self._plan is None:
            return False
        return not self.keep_cache or n * (self.d + self.d_v) >= self._plan[2] * (self.d_v + 1)

    # -- properties -------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """``"cache"`` (exact attention over the kept keys) or ``"state"``."""
        return "state" if self._state is not None else "cache"

    @property
    def approximation(self) -> tuple[str, int, int] | None:
        """(family, degree, rank) of the state (built, or planned for the values seen), None: exact only."""
        return self._plan

    @property
    def rank(self) -> int | None:
        """r of the state (built or planned), None when it will never be built."""
        return self._plan[2] if self._plan is not None else None

    @property
    def nbytes(self) -> int:
        """Bytes held: the state (or the cache buffers, at their capacity) and the running value extremes."""
        held = self._hi.nbytes + self._lo.nbytes
        for t in (self._state, self._k, self._v):
            if t is not None:
                held += t.nbytes
        return held

    # -- updates ----------------------------------------------------------------------------------
    def _admit(self, k, v):
        """Validate new keys and values; return the running value extremes including them (nothing changes)."""
        self._check("k", k, self.d, exact_batch=True)
        self._check("v", v, self.d_v, exact_batch=True)
        if k.shape[-2] != v.shape[-2]:
            raise ValueError(f"k and v must hold the same number of new tokens, got {k.shape[-2]} and {v.shape[-2]}")
        self._check_declared("k", k, 1)
        vd = v.detach().double()
        if vd.shape[-2] == 0:
            return self._hi, self._lo
        return torch.maximum(self._hi, vd.amax(-2)), torch.minimum(self._lo, vd.amin(-2))

    def _commit_values(self, hi, lo) -> None:
        self._hi, self._lo = hi, lo
        if self._state is None and self.value_bound is None and self.degree is None and \
                self._value_stats()[1] > self._planned_for:
            self._replan()

    def _cache_put(self, k: torch.Tensor, v: torch.Tensor) -> None:
        t, need = k.shape[-2], self.n + k.shape[-2]
        if self._k is None or need > self._k.shape[-2]:
            cap = max(need, 2 * (self._k.shape[-2] if self._k is not None else 0), 16)
            nk = torch.empty((*self.batch_shape, cap, self.d), dtype=self.dtype, device=self.device)
            nv = torch.empty((*self.batch_shape, cap, self.d_v), dtype=self.dtype, device=self.device)
            if self.n:
                nk[..., : self.n, :] = self._k[..., : self.n, :]
                nv[..., : self.n, :] = self._v[..., : self.n, :]
            self._k, self._v = nk, nv
        self._k[..., self.n: self.n + t, :] = k
        self._v[..., self.n: self.n + t, :] = v

    def _to_state(self) -> None:
        """Build S from the cached keys and drop the cache (cache → state, once)."""
        method, g, r = self._plan
        coeffs, aq, ak = polynomial_setup(method, self.radius, g, d=self.d, bound=self.bound, norms=self.norms)
        w = torch.as_tensor(monomial_weights(coeffs, self.d), dtype=torch.float64, device=self.device)
        self._fixed = (method, len(coeffs) - 1, w, aq, ak, chunk_rows(max(1, math.prod(self.batch_shape)), r))
        self._rows = gather_plan(self.d, len(coeffs) - 1, self.device)
        self._state = torch.zeros((*self.batch_shape, r, self.d_v + 1), dtype=torch.float64, device=self.device)
        if self.n:
            self._add_keys(self._k[..., : self.n, :], self._v[..., : self.n, :])
        self._k = self._v = None

    def _add_keys(self, k: torch.Tensor, v: torch.Tensor) -> None:
        _, g, w, _, ak, chunk = self._fixed
        kd, vv = k.double() * ak, weighted_values(v.double())
        self._state = self._state + key_state_on(engine_for(kd, vv, is_causal=False), kd, vv, degree=g, weights=w,
                                                 chunk=chunk)

    @eager_only
    @_atomic
    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add t keys ``(*batch_shape, t, d)`` and values ``(*batch_shape, t, d_v)``.

        Raises ValueError (and changes nothing) when a key breaks the declared bound.
        """
        hi, lo = self._admit(k, v)
        t = k.shape[-2]
        self._commit_values(hi, lo)
        if self._state is None and self._state_is_smaller(self.n + t):
            self._to_state()
        if self._state is None:
            self._cache_put(k, v)
        else:
            self._add_keys(k, v)
        self.n += t

    # -- answers ----------------------------------------------------------------------------------
    def _certificate(self, out_dtype: torch.dtype, n: int, hi, lo) -> Certificate:
        method, g = self._plan[0], self._plan[1]
        spread, top = self._value_stats(hi, lo)
        cert = degree_certificate(method, self.radius, g, d=self.d, n_k=n, value_range=spread,
                                  max_abs_value=top, radius_source=self.radius_source, out_dtype=out_dtype,
                                  eps=self.eps)
        if self.eps is not None and not cert.output_error_bound <= self.eps:
            raise ValueError(f"eps: the values appended so far (range {spread:.4g}) take the {method} "
                             f"degree-{g} bound to {cert.output_error_bound:.3g} > eps={self.eps:g}; declare "
                             "value_bound up front so that the degree is chosen for every value")
        return cert

    def _finish(self, num: torch.Tensor) -> torch.Tensor:
        out = normalize_readout(num, self.d_v)
        out = torch.minimum(torch.maximum(out, self._lo.unsqueeze(-2)), self._hi.unsqueeze(-2))
        return out.to(self.dtype)

    @eager_only
    @_atomic
    def query(self, q: torch.Tensor) -> tuple[torch.Tensor, Certificate]:
        """Queries ``(..., t_q, d)`` (leading dims broadcast to batch_shape) attending to every key so far.

        Returns ``(out (..., t_q, d_v), certificate)``.
        """
        self._check("q", q, self.d, exact_batch=False)
        if self.n == 0:
            raise ValueError("q: no keys appended yet (append(k, v) first)")
        self._check_declared("q", q, 0)
        if self._state is None:
            return attention(q, self._k[..., : self.n, :], self._v[..., : self.n, :], scale=self.scale,
                             method="exact", eps=self.eps, return_certificate=True)
        cert = self._certificate(q.dtype, self.n, self._hi, self._lo)
        _, g, _, aq, _, chunk = self._fixed
        qd = q.double() * aq
        engine = engine_for(qd, self._state, is_causal=False)
        out = self._finish(readout_on(engine, qd, self._state, degree=g, chunk=chunk))
        return out, dataclasses.replace(cert, engine=engine)

    @eager_only
    @_atomic
    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, Certificate]:
        """Causal decoding of t new tokens: append their keys and values, answer their t queries.

        Query i (of t) sees every earlier key and the new keys 0..i; t = 1 is one decoding step,
        a whole prompt is a prefill. ``q`` is ``(..., t, d)`` with leading dims broadcasting to
        batch_shape. Returns ``(out (..., t, d_v), certificate)``. A declaration or ``eps`` that
        fails raises before the new tokens are added.
        """
        self._check("q", q, self.d, exact_batch=False)
        hi, lo = self._admit(k, v)
        if q.shape[-2] != k.shape[-2]:
            raise ValueError(f"step needs one query per new key, got {q.shape[-2]} queries and {k.shape[-2]} keys")
        self._check_declared("q", q, 0)
        t, n0 = k.shape[-2], self.n
        if t == 0:
            raise ValueError("step needs at least one new token (k has 0 rows)")
        self._commit_values(hi, lo)
        if self._state is not None or self._state_is_smaller(n0 + t):
            cert = self._certificate(q.dtype, n0 + t, hi, lo)
            if self._state is None:
                self._to_state()
        if self._state is None:
            self._cache_put(k, v)
            self.n += t
            keys, vals = self._k[..., : self.n, :], self._v[..., : self.n, :]
            if n0 == 0 or t == 1:  # a first chunk is plainly causal; one new query sees every key
                return attention(q, keys, vals, scale=self.scale, method="exact", eps=self.eps, is_causal=n0 == 0,
                                 return_certificate=True)
            mask = torch.ones(t, self.n, dtype=torch.bool, device=self.device).tril(n0)
            return attention(q, keys, vals, scale=self.scale, method="exact", eps=self.eps, attn_mask=mask,
                             return_certificate=True)
        _, g, w, aq, ak, chunk = self._fixed
        kd, vv = k.double() * ak, weighted_values(v.double())
        if t <= CAUSAL_TILE:  # one tile: the features of the new keys serve both the readout and the update
            fq = few_row_features(q.double() * aq, self._rows).transpose(-1, -2)
            fkw = few_row_features(kd, self._rows) * w.unsqueeze(-1)
            num = torch.tril(fq @ fkw) @ vv + fq @ self._state
            self._state = self._state + fkw @ vv
            engine = "torch"
        else:
            qd = q.double() * aq
            engine = engine_for(qd, kd, vv, is_causal=True)
            num = causal_readout_on(engine, qd, kd, vv, degree=g, weights=w, chunk=chunk,
                                    state=self._state if n0 else None)
            self._state = self._state + key_state_on(engine, kd, vv, degree=g, weights=w, chunk=chunk)
        self.n += t
        return self._finish(num), dataclasses.replace(cert, engine=engine)

    @eager_only
    @_atomic
    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch entries ``index`` (along the first batch dim, as beam search reorders its beams).

        Everything per sequence — the state or the cached keys and values, the running value range — is
        indexed; O(batch·r·(d_v + 1)) work. The declaration, the plan and the key count are shared.
        """
        if not self.batch_shape:
            raise ValueError("index: a DecodingState without batch dims has nothing to reorder")
        index = torch.as_tensor(index, device=self.device)
        if index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"index must be a 1-D integer tensor, got {tuple(index.shape)} {index.dtype}")
        if index.numel() != self.batch_shape[0] or (index.numel() and not (
                0 <= int(index.min()) and int(index.max()) < self.batch_shape[0])):
            raise ValueError(f"index must hold {self.batch_shape[0]} entries in 0..{self.batch_shape[0] - 1}")
        pick = lambda x: None if x is None else x.index_select(0, index.to(x.device))  # noqa: E731
        self._hi, self._lo = pick(self._hi), pick(self._lo)
        self._k, self._v, self._state = pick(self._k), pick(self._v), pick(self._state)

    def __repr__(self) -> str:
        plan = f"{self._plan[0]} degree {self._plan[1]}, rank {self._plan[2]}" if self._plan else "exact"
        return (f"DecodingState(d={self.d}, d_v={self.d_v}, n={self.n}, mode={self.mode}, {plan}, "
                f"R={self.radius}, {self.nbytes} bytes)")
