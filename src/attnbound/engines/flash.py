"""Exact attention through torch's CPU flash kernel in its pinned order, over key chunks, with a
certificate that charges that order.

The function is :mod:`attnbound.engines.sdpa`'s (same logits, masks, ℓ2 key column and padding);
only the way it is computed, and so the rounding bound, differ.

**The kernel and its order.** ``aten::_scaled_dot_product_flash_attention_for_cpu`` (the kernel behind
torch's CPU SDPA for float32) returns the output and each row's log-sum-exp. For float32 inputs in the
torch versions of :data:`PINNED_KV_SPLIT` it walks the keys in blocks of exactly ``K`` = 512 (the last
one shorter), and for each query row and block:

* the logits by a matrix product (any order of the d products), times the scale, plus the mask;
* the block maximum, the running maximum m_t, each weight once by its vectorised ``exp_u20`` of
  fl(x̂ − m_t), and the block's sum (vector lanes, then a tree: any order of ≤ K terms);
* the running sum and output rescaled once by std::exp(m_{t−1} − m_t), the block's sum added, and the
  block's products p·v added to the running output by a matrix product (any order of its K + 1 terms);
* at the end one reciprocal of the sum and one product; lse = m_T + log(sum).

So a call over c keys makes ⌈c/K⌉ rescales, not up to c as :func:`attnbound.engines.sdpa.sdpa_certificate`
must assume for an unknown kernel. The block length is read from the installed version's kernel source
and probed by ``tests/test_flash.py`` (float32 sums that round differently when a block boundary moves);
for any torch version not in :data:`PINNED_KV_SPLIT` the bound falls back to the any-order model (K = 1).

**Chunks.** The running output of one call is a sum of up to c + ⌈c/K⌉ roundings per term (a matrix
product may add the earlier output first), which at n_k = 2^14 would cost γ_{n_k}·max|v| ≈ 4·10^{−3}. So
:func:`flash_attention` cuts the keys into chunks of C (default :data:`DEFAULT_CHUNK` = 2048; 1024, 512, 256 or 128
when eps asks for more, :data:`CHUNKS`), runs the
kernel once per chunk, and combines the partial outputs by their log-sum-exps, two at a time in a binary
tree (a binary counter over the chunks, so at most ⌊log₂ G⌋ + 1 partial results are held at once):

    R = logaddexp(R_a, R_b),   acc = acc_a·fl32(e^{R_a − R}) + acc_b·fl32(e^{R_b − R})   (R in float64)

With causal attention, chunk c (keys [c0, c1)) is asked only of queries c0.. with the kernel's own
top-left causal mask, which is then exactly the global one; rows that see no key of a chunk (a mask
kills them) get l_c = −∞. The result's row log-sum-exp R is kept for the backward pass, which is the
kernel's own backward on the whole row (:class:`_FlashChunks`).

**The certificate** (:func:`flash_certificate`). Write the combined output as one weighted average over
all keys: chunk c's output is N̂_c/D̂_c and e^{l̂_c} = e^{m_c}·D̂_c·e^{δ_c}, so

    out = Σ_j w_j (1 + η_j)(1 + δ_{c(j)})(1 + α_j) v_j / Σ_j w_j (1 + η_j)(1 + δ_{c(j)})(1 + β_j)

with w_j the exact weights. The shared factors — logit and exponential errors η (as in the SDPA model,
with ⌈C/K⌉ exponentials per weight path) and the log-sum-exp's rounding |δ| ≤ ν — move the output by
≤ η'/(1 − η')·range with 1 + η' = (1 + η)·e^ν; ν ≤ 2u(ln C + 1) + u(1 + u)(2L + T + ln C + 1) (std::log to
1 ulp, one addition; |l_c| ≤ 2L + T + ln C + 1 for chunks with a near key). The float64 combine's own
rounding, ν₆₄ ≤ 16·u₆₄·G·(2L + T + ln n_k + 2), leaves its factors summing to 1 only within e^{±ν₆₄}: a
numerator-only perturbation, charged as 2(e^{ν₆₄} − 1)·max|v|. The separate factors have paths of ≤ C + ⌈C/K⌉ + 4 roundings inside a
chunk and 3 per merge in the combine (the float32 factor's cast, the product, the addition), at most
2⌊log₂ G⌋ merges on any path (:func:`combine_depth`), so γ_m with m = C + ⌈C/K⌉ + 6⌊log₂ G⌋ + 4 moves the
output by ≤ (2γ_m/(1 − γ_m) + 3u)·max|v|. The subnormal and
far-key terms are :func:`attnbound.engines.sdpa.sdpa_certificate`'s, plus ≤ 3G·tiny·max|v| from factors
that underflow float32 in the combine. At G = 1 this is the SDPA certificate with ⌈n_k/K⌉ blocks. The
bound grows with n_k only through the combine's 6⌊log₂ G⌋ roundings: on Gaussian d = 64 heads (L ≈ 15)
≈ 1.88·10^{−3} at n_k = 2^14 and 1.90·10^{−3} at 2^20 (C = 2048); 0.99·10^{−3} to 1.01·10^{−3} with C = 512.

On Gaussian data (d = 64, n = 2^14, float32) the bound is ≈ 1.9·10^{−3} with C = 2048 (1.3·10^{−3} with
1024, 1.0·10^{−3} with 512) against the any-order bound's 0.41; the true error is ≈ 10^{−7}. A theorem of floating-point arithmetic under the stated model
of the kernel (its block length pinned, its exponential's 20-ulp accuracy an assumption about torch's
kernel, as in :mod:`attnbound.engines.sdpa`).

Cost: the kernel's Θ(b·n_q·n_k·(d + d_v)) plus the combine's Θ(b·n_q·d_v·G), two in-place passes over a
partial result per merge (a few per cent at C = 2048; smaller chunks cost more); memory
O(b·n_q·(d_v + 2)·log₂ G) beyond the inputs, plus two float copies of a mask.
"""

from __future__ import annotations

import math

import torch

from ..certificate import Certificate, underflow_unit
from ..validation import broadcast_shapes
from .sdpa import _fold, _fold_mask, sdpa_certificate

PINNED_KV_SPLIT = {"2.13": 512}  # torch version (major.minor) -> the kernel's key block for float32
DEFAULT_CHUNK = 2048
U64 = 2.0 ** -53


def _op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def available() -> tuple[bool, str]:
    """Whether this torch has the CPU flash kernel as an operator."""
    try:
        ok = _op() is not None and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
    except (AttributeError, RuntimeError):
        ok = False
    return (True, "") if ok else (False, "this torch has no _scaled_dot_product_flash_attention_for_cpu")


def kv_split(version: str | None = None) -> int:
    """The kernel's key block for this torch version, or 1 (any order) when the version is not pinned."""
    v = torch.__version__ if version is None else version
    major_minor = ".".join(v.split("+")[0].split(".")[:2])
    return PINNED_KV_SPLIT.get(major_minor, 1)


def combine_depth(chunks: int) -> int:
    """Merges on any term's path in the combine of ``chunks`` partial results: a binary counter builds
    subtrees of depth ≤ ⌊log₂ G⌋, and the final collapse of its ≤ ⌊log₂ G⌋ + 1 subtrees adds at most
    ⌊log₂ G⌋ more: ≤ 2⌊log₂ G⌋ (0 for one chunk)."""
    return 2 * (chunks.bit_length() - 1) if chunks > 1 else 0


def flash_certificate(*, kind: str, logit_bound: float, d: int, n_k: int, value_range: float,
                      max_abs_value: float, out_dtype: torch.dtype, mask_span: float = 0.0, scale: float = 0.0,
                      chunk: int = DEFAULT_CHUNK, block: int | None = None, eps: float | None = None
                      ) -> Certificate:
    """The rounding bound of :func:`flash_attention` in float32 with key chunks of ``chunk`` and the kernel's
    key block ``block`` (default: :func:`kv_split`; 1 = any order). See the module docstring."""
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    K = kv_split() if block is None else block
    C = min(chunk, n_k)
    G = -(-n_k // C)
    blocks = -(-C // K)
    u = 2.0 ** -24
    L, T = float(logit_bound), float(mask_span)
    cut = 2.0 * (2.0 * L + 1.0 + math.log(n_k) + 40.0)
    T_near = min(T, cut)
    nu = nu64 = 0.0
    if G > 1:  # the float32 log-sum-exps' rounding (shared by a chunk's numerator and denominator terms), and
        # the float64 combine's (its factors need not sum to exactly 1: a numerator-only perturbation)
        nu = 2.0 * u * (math.log(C) + 1.0) + u * (1.0 + u) * (2.0 * L + T_near + math.log(C) + 1.0)
        nu64 = 16.0 * U64 * G * (2.0 * L + T_near + math.log(n_k) + 2.0)
    extra = 3 * combine_depth(G)
    c = sdpa_certificate(kind=kind, logit_bound=L, d=d, n_k=n_k, value_range=value_range,
                         max_abs_value=max_abs_value, compute_dtype=torch.float32, out_dtype=out_dtype,
                         mask_span=T, key_blocks=blocks, scale=scale, eps=eps,
                         log_extra=nu, sum_terms=C + blocks + 4 + extra)
    # float32 combine factors and products in the subnormal range: absolute errors; each chunk's own rescales
    combine_under = (3.0 * G * float(torch.finfo(torch.float32).tiny) * max_abs_value
                     + G * (blocks + 5) * underflow_unit(torch.float32)) if G > 1 else 0.0
    bound = c.output_error_bound + combine_under + 2.0 * math.expm1(nu64) * max_abs_value
    if not math.isfinite(bound):
        bound = math.inf
    return Certificate(method="exact", kind=kind, eta=c.eta, value_range=value_range, max_abs_value=max_abs_value,
                       approximation_bound=0.0, rounding_bound=bound, output_error_bound=bound, eps=eps,
                       compute_dtype="float32", engine="flash" if G == 1 else f"flash ({G} chunks of {C})")


CHUNKS = (DEFAULT_CHUNK, 1024, 512, 256, 128)  # tried in order when eps asks for more than the default chunk's bound


def flash_candidate(*, eps: float | None, **common) -> tuple[Certificate, int]:
    """(certificate, chunk): the default chunk's, or with ``eps`` the first of :data:`CHUNKS` whose bound meets
    it (else the tightest); ``common`` as :func:`flash_certificate`'s keywords."""
    best = None
    for chunk in CHUNKS:
        c = flash_certificate(chunk=chunk, eps=eps, **common)
        if eps is None or c.output_error_bound <= eps:
            return c, chunk
        if best is None or c.output_error_bound < best[0].output_error_bound:
            best = (c, chunk)
    return best


def flash_memory_bytes(batch_numel: int, n_q: int, n_k: int, d: int, d_v: int, *, chunk: int = DEFAULT_CHUNK,
                       mask_rows: int = 0, threads: int | None = None) -> int:
    """Peak bytes beyond the inputs: the combine's partial results (≤ ⌊log₂ G⌋ + 2 chunk outputs with their
    row statistics, float32 at the padded head width, log-sum-exps in float64), the kernel's per-thread tiles
    (≤ 256 queries × 512 keys, three of them) and, with a mask of ``mask_rows`` rows (× its batch), two float
    copies of it at full key length (the row shift of an additive mask, or a bool mask as 0/−∞; one more
    per-chunk liveness test)."""
    threads = threads or torch.get_num_threads()
    width = max(d, d_v) + 1
    G = -(-n_k // min(chunk, n_k))
    parts = G.bit_length() + 1
    return (batch_numel * n_q * (width + 2) * parts + threads * 3 * 256 * 512 + 2 * mask_rows * n_k) * 4 \
        + mask_rows * min(chunk, n_k) + batch_numel * n_q * 8 * parts


class _FlashChunks(torch.autograd.Function):
    """Forward: chunks and the log-sum-exp combine; backward: the kernel's own backward on whole rows."""

    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal: bool, scale: float, chunk: int):
        out, lse = _chunks(q, k, v, mask, is_causal, scale, chunk)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, mask = ctx.saved_tensors
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.contiguous(), q, k, v, out, lse, 0.0, ctx.is_causal, attn_mask=mask, scale=ctx.scale)
        return gq, gk, gv, None, None, None, None


def _alive(mask_c: torch.Tensor, is_causal: bool) -> torch.Tensor:
    """(B1, B2, rows) True where a row sees at least one key of this chunk (mask and causal)."""
    dead = torch.isneginf(mask_c)
    if is_causal:
        rows, cols = mask_c.shape[-2:]
        dead = dead | ~torch.ones(rows, cols, dtype=torch.bool, device=mask_c.device).tril()
    return ~dead.all(-1)


def _chunks(q, k, v, mask, is_causal: bool, scale: float, chunk: int):
    """(out, lse): (B1, B2, n_q, d) float32 and the rows' log-sum-exps (0 where a row sees no key)."""
    op = _op()
    n_q, n_k = q.shape[-2], k.shape[-2]
    if n_k <= chunk:
        out, lse = op(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
        return out, lse
    minus_inf = torch.tensor(-math.inf, dtype=torch.float64, device=q.device)
    stack = []  # (level, (r0, out, lse)): partial results over 2^level chunks, levels strictly decreasing
    for c0 in range(0, n_k, chunk):
        r0 = c0 if is_causal else 0
        if r0 >= n_q:
            break
        c1 = min(c0 + chunk, n_k)
        mc = None
        if mask is not None:
            mc = mask[..., r0:, c0:c1] if mask.shape[-2] > 1 else mask[..., c0:c1]
        o, lse = op(q[..., r0:, :], k[..., c0:c1, :], v[..., c0:c1, :], 0.0, is_causal, attn_mask=mc, scale=scale)
        lse = lse.double()
        if mc is not None:
            alive = _alive(mc if mc.shape[-2] > 1 else mc.expand(*mc.shape[:-2], n_q - r0, mc.shape[-1]), is_causal)
            lse = torch.where(alive, lse, minus_inf)
        part, level = (r0, o, lse), 0
        while stack and stack[-1][0] == level:  # a binary counter: merge equal halves, a tree of depth log2 G
            part, level = _merge(stack.pop()[1], part), level + 1
        stack.append((level, part))
    part = stack.pop()[1]
    while stack:
        part = _merge(stack.pop()[1], part)
    _, acc, run = part  # r0 = 0: the first chunk covers every row
    return acc, torch.where(torch.isneginf(run), 0.0, run).to(torch.float32)


def _merge(left, right):
    """Two partial results over consecutive key ranges (rows from r0 on; the right one's r0 ≥ the left one's),
    combined by their log-sum-exps in the left one's buffers: acc·fl(a) + fl(o·fl(b)), three float32 roundings
    on each term's path, the factors from float64 log-sum-exps."""
    (r0, acc, run), (r0b, out_b, run_b) = left, right
    off = r0b - r0
    old = run[..., off:]
    new = torch.logaddexp(old, run_b)
    empty = torch.isneginf(new)
    a = torch.where(empty, 1.0, torch.exp(old - new)).to(acc.dtype).unsqueeze(-1)
    b = torch.where(empty, 0.0, torch.exp(run_b - new)).to(acc.dtype).unsqueeze(-1)
    acc[..., off:, :].mul_(a).addcmul_(out_b, b)
    run[..., off:] = new
    return r0, acc, run


def flash_attention(q, k, v, *, scale: float, kind: str = "softmax", is_causal: bool = False, attn_mask=None,
                    chunk: int = DEFAULT_CHUNK):
    """Exact attention by the CPU flash kernel over key chunks (float32 inputs, validated, additive masks
    row-shifted; bool masks True = take part). Returns (..., n_q, d_v) float32. Same function as
    :func:`attnbound.engines.sdpa.sdpa_attention`; autograd through the kernel's backward."""
    if q.dtype != torch.float32:
        raise TypeError(f"q: flash_attention computes in float32, got {q.dtype}")
    batch = broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    n_q = q.shape[-2]
    s = float(scale)
    if kind == "l2":  # the key-shift identity as one more feature column, as in engines.sdpa
        s = 2.0 * float(scale)
        q = torch.cat([q, torch.ones((*q.shape[:-1], 1), dtype=q.dtype, device=q.device)], dim=-1)
        k = torch.cat([k, -0.5 * (k * k).sum(-1, keepdim=True)], dim=-1)
    d_v = v.shape[-1]
    width = max(q.shape[-1], d_v)
    if q.shape[-1] < width:
        q, k = (torch.nn.functional.pad(x, (0, width - x.shape[-1])) for x in (q, k))
    elif d_v < width:
        v = torch.nn.functional.pad(v, (0, width - d_v))
    mask = None
    if attn_mask is not None:
        mask = _fold_mask(attn_mask, batch)
        mask = mask.expand(*mask.shape[:-1], k.shape[-2])  # a key dim of 1 must still slice into chunks
        mask = torch.where(mask, 0.0, -math.inf).to(q.dtype) if mask.dtype == torch.bool else mask.to(q.dtype)
    # the raw kernel reads each row as contiguous: a last dim with stride ≠ 1 (a transposed k, a column-major
    # or fused-QKV view) is copied first (the public SDPA checks this; the operator does not)
    qf, kf, vf = (x if x.stride(-1) == 1 else x.contiguous() for x in (_fold(q, batch), _fold(k, batch),
                                                                       _fold(v, batch)))
    if torch.is_grad_enabled() and (qf.requires_grad or kf.requires_grad or vf.requires_grad):
        out = _FlashChunks.apply(qf, kf, vf, mask, bool(is_causal), s, int(chunk))
    else:  # no graph to record: the forward alone
        out = _chunks(qf, kf, vf, mask, bool(is_causal), s, int(chunk))[0]
    return out[..., :d_v].reshape(*batch, n_q, d_v)
