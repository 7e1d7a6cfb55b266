"""Print (measured peak bytes, estimated bytes) of one feature-method call: run in a fresh process."""

import sys

import torch

import attnbound
from attnbound.engines.features import chunk_rows, feature_memory_bytes
from attnbound.engines.monomials import feature_rank


def status(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) * 1024


n, d, g, causal = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, n, d, generator=gen) * 0.3 for _ in range(3))
attnbound.attention(q[:, :64], k[:, :64], v[:, :64], method="polynomial", degree=g, is_causal=causal)  # warm up
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the high-water mark
attnbound.attention(q, k, v, method="polynomial", degree=g, is_causal=causal)
r = feature_rank(d, g)
print(status("VmHWM") - base, feature_memory_bytes(1, n, n, d, d, r, chunk_rows(1, r), is_causal=causal,
                                                    requires_grad=False))
