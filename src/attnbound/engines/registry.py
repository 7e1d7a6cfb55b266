"""One record per engine: what it supports and, when it declines a call, why.

An *engine* computes a method's numbers; a *family* (:mod:`attnbound.families`) says which polynomial
and what certificate. Each record below states its dtypes, devices, masks, causal support and
autograd, and the naive reference its tests compare it with; :meth:`Engine.not_supported_reasons`
answers a :class:`Request` with the list of reasons it cannot take the call (empty: it can). The
feature engines are chosen by :func:`choose` — the first engine of a kind, in order of preference, with
no reason against it — in the planner and the run stage alike, instead of copying these rules; the
certificate records the engine that ran (``Certificate.engine``), and :func:`attnbound.plan` shows each
candidate's engine and the reasons the faster ones were passed over.

Exact engines, fastest first: ``flash`` (torch's CPU flash kernel in its pinned order over key chunks,
float32, :mod:`attnbound.engines.flash`), ``sdpa`` (torch's fused kernel, any order,
:mod:`attnbound.engines.sdpa`), then
``dense`` and ``blockwise`` (:mod:`attnbound.engines.reference`). SDPA's record says which calls it
cannot take at all; whether its any-order certificate meets eps and whether it fits the memory budget
depend on the input's statistics, which the run stage adds (:func:`attnbound.run.sdpa_declines`); dense
or blockwise then follows from the size and the budget. Feature engines, fastest first: ``fused`` (the numba
kernels, :mod:`attnbound.engines.fused`) and ``torch`` (:mod:`attnbound.engines.features`, the
autograd path and the reference of the fused kernels); both are compared with
:func:`attnbound.engines.naive.feature_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import flash, fused

MASKS = ("none", "0/1 key weights", "key weights", "bool", "float")
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Request:
    """What a call asks of an engine: where and in which dtype it computes, which mask, causal, gradients.

    ``mask``: "none"; "0/1 key weights" (key padding, heavy keys left to an exact pass); "key weights"
    (per-key log-weights: ℓ2, centring); "bool" or "float" (a general (n_q, n_k) mask)."""

    computes: str  # "exact" or "features"
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    mask: str = "none"
    causal: bool = False
    requires_grad: bool = False

    @classmethod
    def of(cls, computes: str, x: torch.Tensor, *, dtype: torch.dtype | None = None, mask: str = "none",
           causal: bool = False, requires_grad: bool = False) -> "Request":
        return cls(computes, x.device.type, dtype or x.dtype, mask, causal, requires_grad)


@dataclass(frozen=True)
class Engine:
    name: str
    computes: str  # "exact" or "features"
    dtypes: tuple[torch.dtype, ...]
    devices: tuple[str, ...] | None  # device types; None: any
    masks: tuple[str, ...]
    causal_masks: tuple[str, ...]  # the masks it also takes with is_causal
    autograd: bool
    reference: str  # what its tests compare it with
    summary: str
    causal_tile: int | None = None  # rows per causal tile (feature engines): its triangle's block
    available: object = field(default=None, compare=False)  # () -> (bool, why) for a runtime requirement

    def not_supported_reasons(self, req: Request) -> list[str]:
        """Why this engine cannot take ``req`` (empty when it can)."""
        why = []
        if req.computes != self.computes:
            why.append(f"computes {self.computes}, not {req.computes}")
        if req.dtype not in self.dtypes:
            why.append(f"dtype {str(req.dtype).replace('torch.', '')} (takes "
                       f"{', '.join(str(t).replace('torch.', '') for t in self.dtypes)})")
        if self.devices is not None and req.device not in self.devices:
            why.append(f"device {req.device} (runs on {', '.join(self.devices)})")
        masks = self.causal_masks if req.causal else self.masks
        if req.mask not in masks:
            why.append(f"{req.mask} mask{' with is_causal' if req.causal else ''}")
        if req.requires_grad and not self.autograd:
            why.append("requires_grad (no backward)")
        if self.available is not None:
            ok, reason = self.available()
            if not ok:
                why.append(reason)
        return why


KEY_WEIGHTS = ("none", "0/1 key weights", "key weights")

ENGINES: dict[str, Engine] = {e.name: e for e in (
    Engine("flash", "exact", (torch.float32,), ("cpu",), MASKS, MASKS, True,
           "engines.reference.dense_attention", "torch's CPU flash kernel in its pinned order, over key chunks "
           "(known-order certificate)", available=lambda: flash.available()),
    Engine("sdpa", "exact", (torch.float32, torch.float64), ("cpu",), MASKS, MASKS, True,
           "engines.reference.dense_attention", "torch's fused scaled_dot_product_attention (any-order certificate)"),
    Engine("dense", "exact", FLOATS, None, MASKS, MASKS, True,
           "the long-double reference of the tests", "the explicit n_q × n_k softmax"),
    Engine("blockwise", "exact", FLOATS, None, MASKS, MASKS, True,
           "engines.reference.dense_attention", "query chunks × key blocks, online softmax"),
    Engine("fused", "features", (torch.float64,), ("cpu",), KEY_WEIGHTS, ("none", "0/1 key weights"), True,
           "engines.features (torch engine)", "numba kernels: key state, readout, causal pass (Horner triangle); "
           "backward by reverse mode through the monomial map (engines.fused_backward)",
           causal_tile=fused.CAUSAL_TILE, available=lambda: fused.available()),  # late-bound: patchable
    Engine("torch", "features", FLOATS, None, KEY_WEIGHTS, KEY_WEIGHTS, True,
           "engines.naive.feature_attention", "chunked torch feature engine (autograd)", causal_tile=64),
)}

EXACT_ORDER = ("flash", "sdpa", "dense", "blockwise")
FEATURE_ORDER = ("fused", "torch")


def choose(req: Request, names: tuple[str, ...] | None = None) -> tuple[str, dict[str, list[str]]]:
    """(the first engine of ``names`` — default: all of req's kind, fastest first — with no reason against
    it, the reasons of each engine passed over before it). The last engine of each kind takes every request
    of its kind, so there is always one."""
    names = names or (EXACT_ORDER if req.computes == "exact" else FEATURE_ORDER)
    passed = {}
    for n in names:
        why = ENGINES[n].not_supported_reasons(req)
        if not why:
            return n, passed
        passed[n] = why
    raise ValueError(f"no engine takes this call: " + "; ".join(f"{n}: {', '.join(w)}" for n, w in passed.items()))
