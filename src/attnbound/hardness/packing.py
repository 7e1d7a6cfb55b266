"""L·H independent hard instances in one transformer (seed 002: Saha, Xu, Ye, Yu).

Given L·H reductions with the same shapes (n queries, n+1 keys, dimension d_p), the residual
stream of N = n+1 tokens holds, for instance p = l·H + h, its query coordinates, key
coordinates, value coordinate and one output coordinate (token t carries row t of q_p, k_p,
v_p; the last token's query is zero and its output is ignored). Head h of layer l gets W_Q,
W_K, W_V that select instance p's blocks (W_Q also rescales by s_p·√head_dim, so the module's
default scale 1/√head_dim becomes the instance's s_p); W_O writes the head's first value channel
into p's output coordinate. LayerNorms are dropped, MLPs and biases are zero, and the residual
stream carries every input untouched to later layers, so one forward pass computes every
instance's attention exactly — and thus decides all L·H instances. Computing them cannot be
cheaper than L·H separate heads in general: that is the seed's L·H·n^{2−o(1)} lower bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..nn import Transformer
from .instances import GapHammingInstance, OVInstance
from .reductions import Reduction, gap_hamming_to_attention, ov_to_attention


def _as_reduction(x, i) -> Reduction:
    if isinstance(x, Reduction):
        red = x
    elif isinstance(x, OVInstance):
        red = ov_to_attention(x)
    elif isinstance(x, GapHammingInstance):
        red = gap_hamming_to_attention(x)
    else:
        raise TypeError(f"instances[{i}] must be an OVInstance, GapHammingInstance or Reduction, got {type(x).__name__}")
    if red.kind != "softmax":
        raise ValueError(f"instances[{i}] is an {red.kind!r} reduction; the transformer computes softmax attention")
    return red


@dataclass
class PackedTransformer:
    model: Transformer
    x: torch.Tensor  # (1, N, E)
    reductions: list[Reduction]
    out_coords: list[int]
    n_queries: int

    def outputs(self, method: str = "exact", **attention_kwargs) -> list[torch.Tensor]:
        """One forward pass; each instance's attention output column (n, 1)."""
        with torch.no_grad():
            y = self.model(self.x, method=method, **attention_kwargs)
        return [y[0, : self.n_queries, c : c + 1] for c in self.out_coords]

    def decide(self, method: str = "exact", **attention_kwargs) -> list[bool]:
        """One forward pass; the answer of every instance, in the order given."""
        return [red.decide(o) for red, o in zip(self.reductions, self.outputs(method, **attention_kwargs))]


def pack_transformer(instances, num_layers: int, num_heads: int, *, dtype=torch.float64) -> PackedTransformer:
    """Pack ``num_layers·num_heads`` instances (OV, gap-Hamming or built reductions) into one transformer."""
    for name, val in (("num_layers", num_layers), ("num_heads", num_heads)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    instances = list(instances)
    if len(instances) != num_layers * num_heads:
        raise ValueError(f"instances must hold num_layers*num_heads = {num_layers * num_heads} instances, "
                         f"got {len(instances)}")
    reds = [_as_reduction(x, i) for i, x in enumerate(instances)]
    shapes = {(r.q.shape[0], r.k.shape[0], r.q.shape[1]) for r in reds}
    if len(shapes) != 1:
        raise ValueError(f"instances must all have the same size (n queries, n_k keys, dim); got {sorted(shapes)}")
    (n_q, n_k, dim), = shapes
    if n_k < n_q:
        raise ValueError("instances need at least as many keys as queries to share tokens")
    per = 2 * dim + 2  # q block, k block, value, output
    head_dim = max(dim, math.ceil(len(reds) * per / num_heads))
    E = head_dim * num_heads
    model = Transformer(num_layers, E, num_heads, mlp_ratio=1, norm=False, dtype=dtype)
    x = torch.zeros(1, n_k, E, dtype=dtype)
    out_coords = []
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for p, red in enumerate(reds):
            layer, head = divmod(p, num_heads)
            base = p * per
            qc, kc, vc, oc = base, base + dim, base + 2 * dim, base + 2 * dim + 1
            x[0, :n_q, qc : qc + dim] = red.q.to(dtype)
            x[0, :, kc : kc + dim] = red.k.to(dtype)
            x[0, :, vc] = red.v[:, 0].to(dtype)
            attn = model.blocks[layer].attn
            rows = head * head_dim
            w = attn.in_proj_weight
            factor = red.scale * math.sqrt(head_dim)
            w[rows : rows + dim, qc : qc + dim] = factor * torch.eye(dim, dtype=dtype)
            w[E + rows : E + rows + dim, kc : kc + dim] = torch.eye(dim, dtype=dtype)
            w[2 * E + rows, vc] = 1.0
            attn.out_proj.weight[oc, rows] = 1.0
            out_coords.append(oc)
    return PackedTransformer(model, x, reds, out_coords, n_q)
