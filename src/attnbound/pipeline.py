"""The stages of one certified attention call: validate → statistics → plan → run → certify.

:func:`attnbound.attention` is these five named steps; :mod:`attnbound.distributed` and the Hugging Face
backend use the same ones.

1. :func:`validate` — every argument checked (TypeError/ValueError naming it) before any large
   allocation; masks normalised; nothing computed from the data yet.
2. :func:`statistics` — one pass of input statistics (norms, max|x|, value extremes, finiteness;
   :func:`attnbound.stats.input_stats`), the declared ``bound`` checked, keys no row can see zeroed:
   a :class:`~attnbound.run.Call`, the shared state of the call, computed once.
3. :func:`tries` — an explicit list of runs to attempt in order: for ``method="auto"`` the plan's
   choice (:func:`attnbound.plan`), then the cheapest candidate certified a priori, then exact; for a
   family its certified degree; for an exact method that method. Nothing rewrites ``method``.
4. :func:`execute` — each try on its engine (:mod:`attnbound.run`); a feature run whose a-posteriori
   certificate misses eps (:class:`~attnbound.certificate.CertificateMiss`) passes to the next try.
5. The certificate of the run that returned comes back with its output (``Certificate.engine`` says
   which engine computed it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from . import validation as val
from .centring import Split, splits
from .certificate import Certificate, CertificateMiss, _gamma
from .families import choose_certificate, family, fixed_degree
from .planner import CostModel, Variant, default_memory_budget, features_cannot_win, plan
from .run import Call, run_exact, run_features
from .stats import InputStats, input_stats, key_participation


@dataclass(frozen=True)
class Options:
    """The keyword options of :func:`attnbound.attention` (see its docstring)."""

    scale: float | None = None
    is_causal: bool = False
    kind: str = "softmax"
    method: str = "exact"
    block_size: int | None = None
    eps: float | None = None
    bound: float | None = None
    degree: int | None = None
    order: int | None = None
    memory_budget: int | None = None
    cost_model: CostModel | None = None
    strict: bool = True
    centre: bool | None = None
    heavy: int | None = None


@dataclass(frozen=True)
class Checked:
    """What :func:`validate` settles: the batch shape, the scale, eps, the bound, the budget and the mask."""

    batch: torch.Size
    scale: float
    eps: float | None
    bound: float | None
    budget: int
    attn_mask: torch.Tensor | None


@dataclass(frozen=True)
class Try:
    """One run to attempt: exact (``certificate`` None), or a family at a certificate's degree on a variant."""

    method: str
    certificate: Certificate | None = None
    variant: Variant | None = None
    split: Split | None = None


# ----------------------------------------------------------------------------------------------
# 1. validate


def check_options(opts: Options) -> None:
    """The options that do not depend on the tensors."""
    val.check_choice("kind", opts.kind, val.KINDS)
    val.check_choice("method", opts.method, val.METHODS)
    val.check_positive_int("block_size", opts.block_size)
    for name in ("is_causal", "strict"):
        if not isinstance(getattr(opts, name), bool):
            raise TypeError(f"{name} must be True or False, got {getattr(opts, name)!r}")
    if opts.cost_model is not None and not isinstance(opts.cost_model, CostModel):
        raise TypeError(f"cost_model must be an attnbound.CostModel or None, got {type(opts.cost_model).__name__}")
    _check_degree_options(opts)
    val.check_positive_int("memory_budget", opts.memory_budget)
    if opts.centre is not None and not isinstance(opts.centre, bool):
        raise TypeError(f"centre must be True, False or None, got {opts.centre!r}")
    h = opts.heavy
    if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 0):
        raise ValueError(f"heavy must be a non-negative int or None, got {h!r}")


def _check_degree_options(opts: Options) -> None:
    """A fixed degree only for a family, and under its own name (Taylor: ``order``; the others: ``degree``);
    centring and heavy tokens only for the approximate methods. Nothing given is silently ignored."""
    if opts.method in val.FEATURE_METHODS:
        fam = family(opts.method)
        other = "degree" if fam.degree_name == "order" else "order"
        if getattr(opts, other) is not None:
            raise ValueError(f"{other}: method={opts.method!r} takes {fam.degree_name}=, not {other}=")
        if fixed_degree(opts.method, opts.degree, opts.order) is not None:
            fam.check_degree(fixed_degree(opts.method, opts.degree, opts.order))
        return
    for name in ("degree", "order"):
        if getattr(opts, name) is not None:
            raise ValueError(f"{name}: fixes an approximation family's degree; method={opts.method!r} takes none "
                             "(use method='taylor', 'polynomial' or 'relative')")
    if opts.method in val.EXACT_METHODS and (opts.centre or opts.heavy):
        which = "centre" if opts.centre else "heavy"
        raise ValueError(f"{which}: centring and heavy tokens shrink an approximation's radius; method={opts.method!r} "
                         "is exact and takes neither")


def validate(q, k, v, attn_mask, opts: Options) -> Checked:
    """Check every argument (naming it) before anything large is allocated; normalise the mask."""
    batch = val.check_qkv(q, k, v, is_causal=opts.is_causal, finite=False)  # NaN/Inf: in the statistics pass
    val.check_choice("kind", opts.kind, val.KINDS)
    val.check_choice("method", opts.method, val.METHODS)
    val.check_positive_int("block_size", opts.block_size)
    s = val.resolve_scale(opts.scale, q.shape[-1])
    eps = val.check_eps(opts.eps, required=(opts.method == "auto"))
    bound = val.check_bound(opts.bound)
    check_options(opts)
    budget = opts.memory_budget if opts.memory_budget is not None else default_memory_budget(q.device)
    if attn_mask is not None and attn_mask.dim() < 2:  # (n_k,) or a scalar: one row for every query
        attn_mask = attn_mask.reshape((1,) * (2 - attn_mask.dim()) + tuple(attn_mask.shape))
    val.check_mask(attn_mask, q, k)
    if attn_mask is not None and attn_mask.is_floating_point() and not val.check_empty(q, v, batch):
        # the statistics shift the mask by its row maximum over the keys each row can see: a float64 copy
        full = math.prod(torch.broadcast_shapes(attn_mask.shape, (q.shape[-2], k.shape[-2])))
        if 3 * 8 * full > budget:
            raise ValueError(f"memory_budget: the additive attn_mask needs about {3 * 8 * full / 2**20:.1f} MiB of "
                             f"working copies (budget {budget / 2**20:.1f} MiB)")
        if opts.is_causal:  # shift over the keys a causal row can see, never over keys after it
            n = q.shape[-2]
            attn_mask = attn_mask.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), -math.inf)
    return Checked(batch, s, eps, bound, budget, attn_mask)


def is_key_padding(attn_mask) -> bool:
    return attn_mask.dtype == torch.bool and (attn_mask.dim() < 2 or attn_mask.shape[-2] == 1)


def key_padding(attn_mask) -> torch.Tensor:
    """The (..., n_k) key mask of a boolean key-padding mask; ValueError for any other mask."""
    if not is_key_padding(attn_mask):
        raise ValueError(
            "attn_mask: the taylor/polynomial/relative methods support only boolean key-padding masks "
            f"broadcastable to (..., 1, n_k) (and is_causal); got dtype {attn_mask.dtype}, shape "
            f"{tuple(attn_mask.shape)}. Use method='exact' for general masks."
        )
    return attn_mask if attn_mask.dim() == 1 else attn_mask.squeeze(-2)


# ----------------------------------------------------------------------------------------------
# 2. statistics


def statistics(q, k, v, checked: Checked, opts: Options) -> Call:
    """The call's shared state: input statistics (one pass per tensor), the bound checked, hidden keys zeroed."""
    attn_mask, key_mask = checked.attn_mask, None
    if attn_mask is not None and (opts.method in val.FEATURE_METHODS or is_key_padding(attn_mask)):
        key_mask = key_padding(attn_mask)  # raises for a general mask with an approximate method
    st = input_stats(q, k, v, attn_mask=attn_mask, key_mask=key_mask, check_finite=True,
                     entries=checked.bound is not None)
    if checked.bound is not None:
        for name, top in (("q", st.q_abs), ("k", st.k_abs)):
            if top > checked.bound:
                raise ValueError(f"{name} has an entry of magnitude {top:.6g} above the declared bound="
                                 f"{checked.bound:g}")
    if not (opts.method in val.EXACT_METHODS and _hidden_logits_safe(st, checked.scale, opts.kind)):
        k, v = _drop_hidden_keys(k, v, key_mask if key_mask is not None else key_participation(attn_mask))
    return Call(q=q, k=k, v=v, stats=st, scale=checked.scale, kind=opts.kind, is_causal=opts.is_causal,
                attn_mask=attn_mask, key_mask=key_mask, bound=checked.bound, eps=checked.eps, batch=checked.batch,
                budget=checked.budget, block_size=opts.block_size, requires_grad=needs_grad(q, k, v))


def needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


HIDDEN_LOGIT_SAFE = 1e30  # far below float32's 3.4e38: a hidden key's logit stays finite, its weight exactly 0


def _hidden_logits_safe(st: InputStats, scale: float, kind: str) -> bool:
    """Whether the keys no row sees can stay as given for an exact engine: their logits (at most
    s·max‖q‖·max‖k_hidden‖, ℓ2 s·(max‖q‖ + max‖k_hidden‖)²) are finite in float32, so the mask's −∞ makes
    their weights exactly 0, and their values are finite (checked), so 0·v = 0 — no copy of k and v."""
    hk = st.hidden_k_norm
    if hk == 0.0:
        return True
    top = scale * (st.q_norm + hk) * (st.q_norm + hk) if kind == "l2" else scale * st.q_norm * hk
    return top < HIDDEN_LOGIT_SAFE


def _drop_hidden_keys(k, v, keys):
    """Zero the keys and values no row can see: they get weight 0 whatever they hold, and a huge one must not
    overflow a logit (inf − inf) or a feature on its way to that 0."""
    if keys is None or bool(keys.all()):
        return k, v
    keep = keys.unsqueeze(-1)
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    return torch.where(keep, k, zero), torch.where(keep, v, zero)


# ----------------------------------------------------------------------------------------------
# 3. plan: the list of tries


def variants(call: Call, centre: bool | None, heavy: int | None, *, auto: bool) -> list[tuple[Variant, Split]]:
    """The ways to shrink this call's radius that are worth weighing: plain, centred, and (under ``auto``)
    2 or 8 heavy tokens exact, each with its radius and the rounding its extra terms bring
    (:mod:`attnbound.centring`). A declared ``bound`` fixes the radius: plain only."""
    st, s, d = call.stats, call.scale, call.q.shape[-1]
    if call.bound is not None:
        radius, _ = st.radius(s, call.kind, bound=call.bound, d=d)
        return [(Variant("plain", radius, key_log_weight=_key_log_weight_bound(st, s, call.kind)),
                 Split(None, None, None, None, st.q_norm, st.k_norm))]
    n_tokens = min(call.q.shape[-2], call.k.shape[-2])
    centres_ = [centre] if centre is not None else ([False, True] if auto else [False])
    heavies = [heavy] if heavy is not None else ([0, 2, HEAVY_MOST] if auto else [0])
    out = []
    for c in centres_:
        hs = sorted({min(h, n_tokens - 1) for h in heavies})  # at least one light token is left
        for h, sp in splits(call.q, call.k, call.key_mask, centre=c, heavies=hs, rows=st.rows).items():
            out.append((_variant(call, bool(c), h, sp), sp))
    # a variant that does more work (centres, or more heavy tokens) for no smaller radius is never the choice
    return [(v, sp) for v, sp in out if not any(
        w is not v and w.radius <= v.radius and w.heavy <= v.heavy and w.centre <= v.centre
        and (w.heavy, w.centre) != (v.heavy, v.centre) for w, _ in out)]


def _variant(call: Call, centred: bool, h: int, sp: Split) -> Variant:
    st, s_eff = call.stats, call.s_eff
    base = call.scale * st.k_norm * st.k_norm if call.kind == "l2" else 0.0
    # rounding charged to the per-key weights: the cross term s_eff⟨c_q, k_j⟩ and the subtractions
    # q − c_q, k − c_k move a logit by ≤ 2u·s_eff·(‖q‖+‖c_q‖)(‖k‖+‖c_k‖) ≤ 8u·s_eff·max‖q‖·max‖k‖
    # (means have norms ≤ the largest), charged as 2γ_{d+2}·klw by key_weight_error
    klw = base + (8.0 * s_eff * st.q_norm * st.k_norm if centred else 0.0)
    # heavy pairs are exact up to the rounding of their logit y + b − ref (|y| ≤ 4·s_eff·‖q‖‖k‖ centred)
    heavy_logit = 4.0 * s_eff * st.q_norm * st.k_norm + 2.0 * klw
    lam = 2.0 * _gamma(call.q.shape[-1] + 4, 2.0**-53) * heavy_logit + 4.0 * 2.0**-53
    exact_eta = (math.expm1(lam) if lam < 700.0 else math.inf) if h else 0.0
    label = ("centred" if centred else "plain") + (f" + {h} heavy" if h else "")
    return Variant(label, s_eff * sp.q_norm * sp.k_norm, centre=centred, heavy=h,
                   key_log_weight=klw if (klw > 0 or call.kind == "l2") else None, exact_eta=exact_eta)


def radius_source(call: Call, var: Variant) -> str:
    if call.bound is not None:
        return "bound"
    return "data" + (", centred" if var.centre else "") + (f", {var.heavy} heavy tokens exact" if var.heavy else "")


def _key_log_weight_bound(st: InputStats, s: float, kind: str) -> float | None:
    """|log| of the engine's per-key weights: s·max‖k‖² for ℓ2 attention, None for softmax (masks are 0/1)."""
    return s * st.k_norm * st.k_norm if kind == "l2" else None  # (× not **: inf, not OverflowError)


HEAVY_MOST = 8  # the most heavy tokens ``auto`` weighs (variants)


def _radius_floor(call: Call, heavy: int | None, heads_dim: int | None = None) -> float | None:
    """A lower bound on the radius of every variant :func:`variants` can build, or None (not known cheaply:
    a declared bound, a general mask, no per-row norms). For any centre c, max_i ‖q_i − c‖ ≥
    (max_i ‖q_i‖ − min_i ‖q_i‖)/2; with any h rows set aside (h ≤ the most heavy tokens weighed) the rest
    still span from the (h+1)-th largest row norm to the (h+1)-th smallest; the same for the keys that take
    part (a batch entry with too few counts 0); the radius is s_eff times the two maxima over batch entries.
    The row norms are rounded up by a factor ≤ (1 + γ)² with γ ≤ (d + 3)·2^-24
    (:func:`attnbound.stats.row_norms`), so the larger one is first shrunk by that much. With ``heads_dim``
    (a batch dim of q and k holding heads, each to be its own call), the smallest of the heads' floors."""
    rows = call.stats.rows
    if call.bound is not None or (call.attn_mask is not None and call.key_mask is None) or rows is None:
        return None
    shrink = 1.0 - 2.0 * (call.q.shape[-1] + 3) * 2.0**-23
    if shrink <= 0.0:
        return None
    j = max(HEAVY_MOST, heavy or 0)
    half = []
    for norms, keys in ((rows[0], None), (rows[1], call.key_mask)):
        n = norms.shape[-1]
        if n <= 2 * j + 1:
            return None
        top = torch.topk(norms, j + 1, dim=-1).values[..., j]  # hidden keys hold norm 0: never above
        if keys is None:
            low = torch.topk(norms, j + 1, dim=-1, largest=False).values[..., j]
            ok = torch.ones_like(top, dtype=torch.bool)
        else:
            keys = keys.expand(norms.shape)
            low = torch.topk(torch.where(keys, norms, math.inf), j + 1, dim=-1, largest=False).values[..., j]
            ok = keys.sum(-1) > 2 * j + 1
        spread = torch.where(ok, top * shrink - low, 0.0).clamp(min=0.0) / 2.0
        if heads_dim is None:
            half.append(spread.max())
        else:  # each head: the largest over its batch entries
            half.append(spread.movedim(heads_dim, 0).reshape(spread.shape[heads_dim], -1).amax(-1))
    return call.s_eff * float((half[0] * half[1]).min())


def _no_feature_can_win(call: Call, opts: Options, heads_dim: int | None = None) -> bool:
    """``auto``'s shortcut: True when no variant's feature run could be the plan's choice (see
    :func:`attnbound.planner.features_cannot_win`), decided from the radius floor without the variants (with
    ``heads_dim``: for any one head of that batch dim run on its own)."""
    st, q, k, v = call.stats, call.q, call.k, call.v
    floor = _radius_floor(call, opts.heavy, heads_dim)
    return floor is not None and features_cannot_win(
        q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1], floor, call.eps, call.is_causal,
        batch=call.batch_numel, kind=call.kind, value_range=st.value_range, max_abs_value=st.max_abs_value,
        out_dtype=q.dtype, logit_bound=st.logit_bound(call.scale, call.kind), scale=call.scale,
        mask_span=st.mask_span, memory_budget=call.budget, requires_grad=call.requires_grad,
        cost_model=opts.cost_model, device=q.device)


def auto_runs_exact(q, k, v, attn_mask, opts: Options, *, heads_dim: int | None = None) -> bool:
    """Whether ``auto`` (``opts.method == "auto"``) would try exact alone on these inputs — with ``heads_dim``,
    on each head of that batch dim run as its own call — decided without the feature plan: a general mask,
    logits beyond float64, or :func:`_no_feature_can_win`. False means only the full plan can tell. Raises as
    :func:`attnbound.attention` would for bad input."""
    checked = validate(q, k, v, attn_mask, opts)
    return _exact_only(statistics(q, k, v, checked, opts), opts, heads_dim)


def _exact_only(call: Call, opts: Options, heads_dim: int | None = None) -> bool:
    """``auto`` tries exact alone: a general mask (only exact methods take one), logits beyond float64 (exact
    says so), or no feature run that could win (:func:`_no_feature_can_win`)."""
    if (call.attn_mask is not None and call.key_mask is None) or \
            not math.isfinite(call.stats.logit_bound(call.scale, call.kind)):
        return True
    return _no_feature_can_win(call, opts, heads_dim)


def tries(call: Call, opts: Options) -> list[Try]:
    """The runs to attempt, in order (see the module docstring)."""
    if opts.method in val.EXACT_METHODS:
        return [Try(opts.method)]
    if opts.method in val.FEATURE_METHODS:
        return [_family_try(call, opts)]
    return _auto_tries(call, opts)


def _family_try(call: Call, opts: Options) -> Try:
    """A fixed family: its certified degree for eps, or the fixed degree (refused when uncertifiable)."""
    var, sp = variants(call, opts.centre, opts.heavy, auto=False)[0]
    st, q = call.stats, call.q
    cert = choose_certificate(opts.method, var.radius, radius_source(call, var), eps=call.eps,
                              degree=fixed_degree(opts.method, opts.degree, opts.order), d=q.shape[-1],
                              n_k=call.k.shape[-2], value_range=st.value_range, max_abs_value=st.max_abs_value,
                              kind=call.kind, out_dtype=q.dtype, strict=opts.strict,
                              key_log_weight=var.key_log_weight, exact_eta=var.exact_eta)
    return Try(opts.method, cert, var, sp)


def _auto_tries(call: Call, opts: Options) -> list[Try]:
    """The plan's choice; should a provisional choice miss eps on this input, the cheapest other candidate
    certified a priori (a cheaper feature run is often still there before exact); exact last."""
    st, logit = call.stats, call.stats.logit_bound(call.scale, call.kind)
    if _exact_only(call, opts):
        return [Try("exact")]
    q, k, v = call.q, call.k, call.v
    vs = variants(call, opts.centre, opts.heavy, auto=True)
    p = plan(q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1], vs[0][0].radius, call.eps, call.is_causal,
             batch=call.batch_numel, kind=call.kind, value_range=st.value_range, max_abs_value=st.max_abs_value,
             memory_budget=call.budget, requires_grad=call.requires_grad, cost_model=opts.cost_model,
             out_dtype=q.dtype, logit_bound=logit, scale=call.scale, mask_span=st.mask_span,
             radius_source="bound" if call.bound is not None else "data", variants=[x for x, _ in vs],
             device=q.device)
    usable = sorted((c for c in p.candidates if (c.certified or c.provisional) and c.fits_memory),
                    key=lambda c: (c.seconds, c.provisional))
    chosen = [p.choice] + [c for c in usable if c.certified and c is not p.choice][:1]
    out = []
    for cand in chosen:
        if cand.method == "exact":
            break
        var, sp = next(x for x in vs if x[0].label == cand.variant)
        out.append(Try(cand.method, dataclasses.replace(cand.certificate, radius_source=radius_source(call, var)),
                       var, sp))
    return out + [Try("exact")]


# ----------------------------------------------------------------------------------------------
# 4. run (and 5. certify: each run returns its certificate)


def execute(call: Call, attempts: list[Try]) -> tuple[torch.Tensor, Certificate]:
    """Run the tries in order; a feature run whose a-posteriori certificate misses eps passes to the next
    (the last one's miss is raised: a ValueError saying why)."""
    for i, t in enumerate(attempts):
        if t.certificate is None:
            return run_exact(call, t.method)
        try:
            return run_features(call, t.method, t.certificate, t.variant, t.split)
        except CertificateMiss:
            if i == len(attempts) - 1:
                raise
    raise AssertionError("no try")  # tries() always returns at least one
