"""The peers benchmark machinery at a tiny size (Performer needs the peers extra)."""

import math

import pytest
import torch

from attnbound.experiments import peers


def test_error_stats_on_a_known_answer():
    ref = torch.zeros(1, 1, 3, 2, dtype=torch.float64)
    out = torch.zeros(1, 1, 10, 2)
    rows = torch.tensor([2, 5, 7])
    out[0, 0, 5, 1] = 0.25
    out[0, 0, 4, 0] = 9.0  # not a sampled row: must not count
    mx, mean = peers.error_stats(out, ref, rows)
    assert mx == 0.25 and mean == pytest.approx(0.25 / 6)


def test_reference_rows_on_a_known_answer():
    # every key identical: attention is the plain mean of the values, whatever the query
    q = torch.randn(1, 1, 6, 4)
    k = torch.ones(1, 1, 5, 4)
    v = torch.arange(10.0).reshape(1, 1, 5, 2)
    ref = peers.reference_rows(q, k, v, torch.tensor([0, 3]))
    assert torch.allclose(ref, v.double().mean(-2, keepdim=True).expand(1, 1, 2, 2), atol=1e-14)


@pytest.mark.parametrize("family,radius", [("gaussian", 1.0), ("peaked", 16.0)])
def test_inputs_have_the_declared_radius(family, radius):
    q, k, v, measured = peers.inputs(family, 256, 8, radius, seed=0)
    assert q.shape == k.shape == v.shape == (1, 1, 256, 8)
    assert measured == pytest.approx(radius, rel=1e-5)
    if family == "peaked":  # a few keys carry most of each query's softmax mass
        w = torch.softmax(q[0, 0].double() @ k[0, 0].double().T / math.sqrt(8), -1)
        assert float(w.topk(8, -1).values.sum(-1).median()) > 0.9


def test_equal_time_picks_the_best_certified_point_no_slower():
    base = {"family": "gaussian", "R": 1.0, "d": 8, "n": 1024, "mean_err": 0.0, "max_err_worst_seed": 0.0}
    pts = [
        {**base, "method": "performer", "param": 64, "seconds": 1.0, "max_err": 1e-3, "bound": None, "certified": False},
        {**base, "method": "attnbound polynomial", "param": 2, "seconds": 0.5, "max_err": 1e-5, "bound": 1e-2,
         "certified": True},
        {**base, "method": "attnbound polynomial", "param": 3, "seconds": 0.9, "max_err": 1e-6, "bound": 1e-3,
         "certified": True},
        {**base, "method": "attnbound polynomial", "param": 4, "seconds": 2.0, "max_err": 1e-9, "bound": 1e-5,
         "certified": True},
        {**base, "method": "attnbound polynomial", "param": 1, "seconds": 0.1, "max_err": 1e-9, "bound": math.inf,
         "certified": False},
    ]
    (row,) = peers.equal_time(pts)
    assert row["attnbound"] == "attnbound polynomial 3" and row["as_fast"]
    assert row["error_ratio"] == pytest.approx(1e3)


def test_measure_runs_every_method_at_a_tiny_size():
    pytest.importorskip("performer_pytorch", reason="the peers extra is not installed: pip install 'attnbound[peers]'")
    rows = peers.measure("gaussian", 0.5, 4, 128, features=(16, 32), seeds=2, repeats=1, max_rank=100, seed=3)
    methods = {r["method"] for r in rows}
    assert methods == {"sdpa", "attnbound exact", "attnbound polynomial", "attnbound auto", "taylor-2 (Based)",
                       "performer"}
    assert sum(r["method"] == "performer" for r in rows) == 4  # 2 feature counts × 2 seeds
    for r in rows:
        assert r["max_err"] >= r["mean_err"] >= 0
        if r["bound"] is not None and math.isfinite(r["bound"]):
            assert r["max_err"] <= r["bound"], r  # every certificate holds on this input
    points = peers.summarize(rows)
    perf = [p for p in points if p["method"] == "performer"]
    assert len(perf) == 2 and all(p["seeds"] == 2 for p in perf)
    fig = peers.frontier_figure(points, 4, 128)
    assert len(fig.axes) == 1


def test_reproduce_only_peers_at_test_scale(tmp_path):
    pytest.importorskip("performer_pytorch", reason="the peers extra is not installed: pip install 'attnbound[peers]'")
    from attnbound.experiments.report import reproduce

    out = reproduce("test", tmp_path / "rep", only=["peers"], seed=1)
    assert (out / "peers.csv").stat().st_size > 0
    assert (out / "peers_d4.png").read_bytes()[:4] == b"\x89PNG"
    data = __import__("json").loads((out / "results.json").read_text())["experiments"]["peers"]
    assert data["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE") and data["reason"]
