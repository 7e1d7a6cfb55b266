"""The fused kernels' disk cache heals: an entry that cannot be read is discarded with one warning and
rebuilt, writes are atomic, and several processes starting together on one cold cache all succeed.

Each case runs a fresh Python process on its own copy of a cache directory (ATTNBOUND_CACHE_DIR), so the
kernels really are loaded from (or rebuilt into) that directory.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

SCRIPT = r"""
import warnings
import torch
import attnbound
warnings.simplefilter("always")
g = torch.Generator().manual_seed(0)
q = torch.rand(2, 70, 3, generator=g, dtype=torch.float64) * 0.2
with warnings.catch_warnings(record=True) as caught:
    out, c = attnbound.attention(q, q, q[..., :2], method="relative", eps=1e-6, return_certificate=True)
    outc, cc = attnbound.attention(q, q, q[..., :2], method="relative", eps=1e-6, is_causal=True,
                                   return_certificate=True)
ref = torch.softmax(q @ q.transpose(-1, -2) / 3 ** 0.5, -1) @ q[..., :2]
assert float((out - ref).abs().max()) <= c.output_error_bound, "outside the certificate"
print("ENGINES", c.engine, cc.engine)
print("HEALED", sum("discarded an unreadable kernel cache entry" in str(w.message) for w in caught))
"""


def _run(cache: pathlib.Path, *, wait: bool = True):
    env = {**os.environ, "ATTNBOUND_CACHE_DIR": str(cache), "PYTHONWARNINGS": "default"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    return _result(proc) if wait else proc


def _result(proc) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    return {"engines": lines["ENGINES"].split(), "healed": int(lines["HEALED"])}


@pytest.fixture(scope="module")
def warm(tmp_path_factory) -> pathlib.Path:
    """A cache directory filled by four processes that started together on it while it was empty."""
    cache = tmp_path_factory.mktemp("cold")
    procs = [_run(cache, wait=False) for _ in range(4)]
    results = [_result(p) for p in procs]
    assert all(r == {"engines": ["fused", "fused"], "healed": 0} for r in results), results
    return cache


def _entries(cache: pathlib.Path, pattern: str) -> list[pathlib.Path]:
    return sorted((cache / "__pycache__").glob(pattern)) if pattern != "*.py" else sorted(cache.glob("*.py"))


def test_four_processes_share_one_cold_cache(warm):
    assert len(_entries(warm, "*.py")) == 1  # one generated file, whole (written atomically)
    assert not list(warm.glob(".*.tmp"))  # no temporary file left behind
    assert _entries(warm, "*.nbi") and _entries(warm, "*.nbc")  # numba's index and data files
    assert _run(warm) == {"engines": ["fused", "fused"], "healed": 0}  # and the next process just loads them


@pytest.mark.parametrize("kind,damage", [("*.nbc", "truncated"), ("*.nbi", "random bytes")])
def test_an_unreadable_numba_entry_is_discarded_and_rebuilt(warm, tmp_path, kind, damage):
    cache = tmp_path / "cache"
    shutil.copytree(warm, cache)
    files = _entries(cache, kind)
    assert files
    for f in files:
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 3] if damage == "truncated" else os.urandom(len(data)))
    first = _run(cache)
    assert first["engines"] == ["fused", "fused"] and 1 <= first["healed"] <= 3  # one warning per kernel at most
    assert _run(cache) == {"engines": ["fused", "fused"], "healed": 0}  # rebuilt: the next process loads it


def test_random_bytes_in_the_generated_source_are_replaced(warm, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(warm, cache)
    files = _entries(cache, "*.py")
    assert files
    for f in files:
        f.write_bytes(os.urandom(f.stat().st_size))
    assert _run(cache)["engines"] == ["fused", "fused"]
    assert _run(cache) == {"engines": ["fused", "fused"], "healed": 0}
