import json
import math
import re

import numpy as np

from attnbound.experiments.common import fit_slope, slope_verdict
from attnbound.experiments.report import reproduce
from attnbound.experiments.transition import log_tail
from attnbound.chebyshev import chebyshev_error


def test_slope_verdict_logic_on_synthetic_series():
    ns = [1024, 2048, 4096, 8192, 16384]
    rng = np.random.default_rng(0)
    quad = [1e-9 * n**2 * (1 + 0.01 * rng.standard_normal()) for n in ns]
    assert slope_verdict(*fit_slope(ns, quad), 2.0, 0.35)[0] == "PASS"
    mid = [1e-9 * n**1.5 for n in ns]
    assert slope_verdict(*fit_slope(ns, mid), 2.0, 0.35)[0] == "FAIL"
    noisy = [1e-9 * n**2 * float(np.exp(2 * rng.standard_normal())) for n in ns]
    assert slope_verdict(*fit_slope(ns, noisy), 2.0, 0.35)[0] == "INCONCLUSIVE"
    lin = [1e-7 * n for n in ns]
    assert slope_verdict(*fit_slope(ns, lin), 1.0, 0.35, upper_only=True)[0] == "PASS"


def test_transition_log_tail_matches_the_certified_tail():
    for radius in (0.5, 3.0, 10.0):
        for g in (2, 8, 20):
            assert math.exp(log_tail(radius, g)) >= 0.999 * (chebyshev_error(radius, g) - 1e-13 * math.exp(radius))


def test_reproduce_test_scale_writes_every_artifact(tmp_path):
    out = reproduce("test", tmp_path / "rep", seed=3)
    data = json.loads((out / "results.json").read_text())
    assert set(data["experiments"]) == {"scaling", "transition", "taylor_order", "direct_sum", "gradient", "reductions",
                                        "minilm"}
    assert {"torch", "threads", "cpu"} <= set(data["environment"])
    for name, exp in data["experiments"].items():
        assert exp["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE", "SKIPPED") and exp["reason"]
        if exp["verdict"] != "SKIPPED":
            assert (out / f"{name}.csv").stat().st_size > 0
        for png in exp["figures"]:
            assert (out / png).read_bytes()[:4] == b"\x89PNG"
    html = (out / "index.html").read_text()
    for ref in re.findall(r"(?:src|href)='([^']+)'", html) + re.findall(r'href="([^"#]+)"', html):
        if not ref.startswith("#"):
            assert (out / ref).exists(), ref
    # the reductions experiment must find exact attention always right
    assert data["experiments"]["reductions"]["numbers"]["exact_accuracy"] == 1.0
