"""Sequence-parallel attention on gloo (loopback), 2 and 3 processes, against single-process results."""

import datetime
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnbound
from attnbound import distributed

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")

CASES = [  # (method, options, is_causal)
    ("exact", {}, False),
    ("exact", {}, True),
    ("exact", {"block_size": 3}, True),
    ("polynomial", {"eps": 1e-6}, False),
    ("polynomial", {"eps": 1e-6}, True),
    ("polynomial", {"degree": 5}, True),
    ("taylor", {"eps": 1e-4}, False),
    ("taylor", {"order": 6}, True),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, lengths):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        n = sum(lengths)
        lo, hi = sum(lengths[:rank]), sum(lengths[:rank + 1])
        g = torch.Generator().manual_seed(7)
        q, k, v = (torch.randn(2, n, 4, generator=g, dtype=torch.float64) * 0.5 for _ in range(3))
        v = v[..., :3]
        for method, opts, causal in CASES:
            single_kw = dict(opts)
            if "block_size" in opts:
                single_kw["method"] = "blockwise"
            else:
                single_kw["method"] = method
            ref, ref_cert = attnbound.attention(q, k, v, is_causal=causal, return_certificate=True, **single_kw)
            out, cert = distributed.attention(q[..., lo:hi, :], k[..., lo:hi, :], v[..., lo:hi, :], method=method,
                                              is_causal=causal, return_certificate=True, **opts)
            err = float((out - ref[..., lo:hi, :]).abs().max())
            assert err <= 1e-12, (method, opts, causal, err)
            if method != "exact":
                # the same certificate as one process (the a-posteriori rounding term reads the computed row sums,
                # whose last bits depend on the summation order)
                same = {f: getattr(cert, f) for f in cert.__dataclass_fields__} | dict(
                    rounding_bound=pytest.approx(ref_cert.rounding_bound, rel=1e-9),
                    output_error_bound=pytest.approx(ref_cert.output_error_bound, rel=1e-9))
                assert {f: getattr(ref_cert, f) for f in cert.__dataclass_fields__} == same, (cert, ref_cert)
            certs = [None] * world
            dist.all_gather_object(certs, cert)
            assert all(c == cert for c in certs)  # and identical on every rank
            # against the float64 truth, within the certificate
            truth = torch.softmax(q @ k.transpose(-1, -2) / 2.0 + (torch.full((n, n), float("-inf")).triu(1)
                                                                   if causal else 0.0), -1) @ v
            assert float((out - truth[..., lo:hi, :]).abs().max()) <= cert.output_error_bound
        # bytes on the wire are what the module docstring says: the state for polynomial, K and V for exact
        distributed.attention(q[..., lo:hi, :], k[..., lo:hi, :], v[..., lo:hi, :], method="polynomial", degree=5)
        stats = (4 + 2 * 2 * 3) * 8  # max‖q‖, max‖k‖, max|q|, max|k| and per-(batch, column) max / −min of v
        # the state (sum-reduced), the statistics, and the smallest row sum for the a-posteriori rounding bound
        assert distributed.last_communication()["bytes_sent"] == 2 * math.comb(4 + 5, 5) * (3 + 1) * 8 + stats + 8
        distributed.attention(q[..., lo:hi, :], k[..., lo:hi, :], v[..., lo:hi, :], method="exact")
        sent = sum(lengths[(rank - t) % world] for t in range(world - 1)) * 2 * (4 + 3) * 8
        assert distributed.last_communication()["bytes_sent"] == sent + stats
        # float32 inputs go through float32 on the exact path, float64 on the feature path
        out32 = distributed.attention(q[..., lo:hi, :].float(), k[..., lo:hi, :].float(), v[..., lo:hi, :].float())
        assert out32.dtype == torch.float32
        assert float((out32.double() - attnbound.attention(q, k, v)[..., lo:hi, :]).abs().max()) < 1e-5
        # a NaN on the last rank: every rank raises, naming that rank, and nobody hangs
        bad = q[..., lo:hi, :].clone()
        if rank == world - 1:
            bad[0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match=rf"rank {world - 1}: .*NaN"):
            distributed.attention(bad, k[..., lo:hi, :], v[..., lo:hi, :])
        # ranks that disagree on the head dim
        width = 4 if rank == 0 else 3
        with pytest.raises(ValueError, match="disagree"):
            distributed.attention(q[..., lo:hi, :width], k[..., lo:hi, :width], v[..., lo:hi, :])
        # an uncertifiable request fails on every rank alike
        with pytest.raises(ValueError, match="cannot be certified"):
            distributed.attention(q[..., lo:hi, :] * 8, k[..., lo:hi, :] * 8, v[..., lo:hi, :], method="polynomial",
                                  eps=1e-6)
        # a memory budget too small on one rank only: every rank raises, naming that rank
        small = 1 << 10 if rank == 0 else None
        with pytest.raises(ValueError, match=r"memory_budget: .*rank 0 needs"):
            distributed.attention(q[..., lo:hi, :], k[..., lo:hi, :], v[..., lo:hi, :], method="polynomial", degree=4,
                                  memory_budget=small)
        # ranks that disagree on any option: every rank raises (no wrong answer, no abort, no hang)
        mine = [dict(scale=0.5 if rank == 0 else 0.25), dict(eps=1e-3 if rank == 0 else 1e-4, method="polynomial"),
                dict(method="polynomial" if rank == 0 else "taylor", eps=1e-3), dict(is_causal=rank == 0),
                dict(method="polynomial", degree=4 + (rank == 0)), dict(method="taylor", order=2 * (1 + (rank == 0)))]
        for opts in mine:
            with pytest.raises(ValueError, match="disagree on the call's options"):
                distributed.attention(q[..., lo:hi, :], k[..., lo:hi, :], v[..., lo:hi, :], **opts)
        for bad_bound in (0.0, True, float("nan")):
            with pytest.raises(ValueError, match="bound"):
                distributed.attention(q[..., lo:hi, :], k[..., lo:hi, :], v[..., lo:hi, :], method="polynomial",
                                      eps=1e-3, bound=bad_bound)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("lengths", [[7, 12], [5, 1, 9]], ids=["2 ranks uneven", "3 ranks uneven"])
def test_sharded_attention_matches_one_process(lengths):
    mp.spawn(_worker, args=(len(lengths), _free_port(), lengths), nprocs=len(lengths), join=True)


def test_needs_a_process_group():
    q = torch.randn(4, 2)
    with pytest.raises(RuntimeError, match="process group"):
        distributed.attention(q, q, q)


def _dying_worker(rank, world, port, timeout_s, queue):
    """Rank 1 dies right after joining the group; rank 0 then calls attention and must not hang."""
    import os
    import time

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    if rank == 1:
        os._exit(0)  # a crash: no destroy_process_group, no goodbye
    q = torch.randn(6, 4, dtype=torch.float64)
    t0 = time.monotonic()
    try:
        distributed.attention(q, q, q)
        queue.put(("returned", time.monotonic() - t0))
    except Exception as exc:  # noqa: BLE001 - whichever error the process group raises is the point
        queue.put((type(exc).__name__, time.monotonic() - t0))


def test_a_dead_rank_makes_the_others_raise_within_the_group_timeout():
    timeout_s = 5
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_dying_worker, args=(r, 2, port, timeout_s, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        what, seconds = queue.get(timeout=120)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert what != "returned", "the surviving rank returned an answer without its peer"
    assert seconds <= timeout_s + 30, (what, seconds)  # the group's timeout (plus start-up), never a hang
