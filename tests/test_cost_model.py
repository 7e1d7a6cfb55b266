"""The planner's cost model file: `attnbound calibrate` writes it, plan/auto read it, bad files warn."""

import json
import math

import pytest
from typer.testing import CliRunner

import attnbound
from attnbound import planner
from attnbound.cli import app
from attnbound.planner import DEFAULT_COST_MODEL, CostModel, cost_model_path, default_cost_model, plan

SLOW_EXACT = CostModel(c_pair=1.0, c_mac=1.0, c_feat=1e-12, c_mac_feat=1e-13, c_op=1e-9)
FAST_EXACT = CostModel(c_pair=1e-15, c_mac=1e-16, c_feat=1.0, c_mac_feat=1.0, c_op=1e-9)
POINT = dict(n_q=4096, n_k=4096, d=8, d_v=8, radius=1.0, eps=0.1)  # float32 SDPA certifies this eps


@pytest.fixture
def model_file(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "cost_model.json"
    monkeypatch.setenv("ATTNBOUND_COST_MODEL", str(path))
    return path


def test_round_trip(model_file):
    cm = CostModel(c_pair=1.5e-10, c_mac=2.5e-12, c_feat=3e-10, c_mac_feat=4e-12, c_op=5e-7)
    assert cm.save(model_file) == model_file and cost_model_path() == model_file
    doc = json.loads(model_file.read_text())
    assert doc["format"] == "attnbound-cost-model" and doc["constants"] == cm.as_dict()
    assert CostModel.load(model_file) == cm == default_cost_model()


def test_plan_reads_the_file(model_file):
    SLOW_EXACT.save(model_file)
    p = plan(**POINT)
    assert p.candidates[0].seconds == SLOW_EXACT.exact_seconds(1, 4096, 4096, 8, 8)
    assert p.choice.method != "exact"
    FAST_EXACT.save(model_file)  # a rewritten file is read again
    p = plan(**POINT)
    assert p.choice.method == "exact" and p.candidates[0].seconds == FAST_EXACT.exact_seconds(1, 4096, 4096, 8, 8)
    # an explicit cost_model wins over the file
    assert plan(**POINT, cost_model=SLOW_EXACT).choice.method != "exact"


def test_missing_file_is_the_built_in_model(model_file):
    assert not model_file.exists() and default_cost_model() is DEFAULT_COST_MODEL


def test_default_path_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv("ATTNBOUND_COST_MODEL", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cost_model_path() == tmp_path / "attnbound" / "cost_model.json"


@pytest.mark.parametrize("text, why", [
    ("{not json", "cannot be read as JSON"),
    (json.dumps({"format": "other", "version": 1, "constants": {}}), "not a version-1"),
    (json.dumps({"format": "attnbound-cost-model", "version": 1, "constants": {"c_pair": 1e-9}}), "exactly c_pair"),
    (None, "c_mac must be a positive finite number"),
])
def test_a_corrupt_file_warns_and_plans_with_the_default(model_file, text, why):
    if text is None:  # a well-formed file with a negative constant
        doc = {"format": "attnbound-cost-model", "version": 1,
               "constants": {**DEFAULT_COST_MODEL.as_dict(), "c_mac": -1.0}}
        text = json.dumps(doc)
    model_file.parent.mkdir(parents=True)
    model_file.write_text(text)
    with pytest.raises(ValueError, match=why):
        CostModel.load(model_file)
    with pytest.warns(RuntimeWarning, match=f"cost_model.json.*{why}.*built-in cost model"):
        p = plan(**POINT)
    assert p.candidates[0].seconds == DEFAULT_COST_MODEL.exact_seconds(1, 4096, 4096, 8, 8)


def test_nan_constant_is_refused(model_file):
    model_file.parent.mkdir(parents=True)
    consts = {**DEFAULT_COST_MODEL.as_dict(), "c_op": math.nan}
    model_file.write_text(json.dumps({"format": "attnbound-cost-model", "version": 1, "constants": consts}))
    with pytest.raises(ValueError, match="c_op must be a positive finite number"):
        CostModel.load(model_file)


def test_calibrate_command_writes_what_plan_reads(model_file, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["calibrate", "--repeats", "1", "--no-save"])
    assert res.exit_code == 0 and "CostModel" in res.output and not model_file.exists()
    out = tmp_path / "elsewhere.json"
    res = runner.invoke(app, ["calibrate", "--repeats", "1", "--out", str(out)])
    assert res.exit_code == 0 and "wrote" in res.output and not model_file.exists()
    cm = CostModel.load(out)
    assert all(math.isfinite(x) and x > 0 for x in cm.as_dict().values())
    model_file.parent.mkdir(parents=True)
    out.replace(model_file)  # the default location ($ATTNBOUND_COST_MODEL here) is what plan reads
    assert default_cost_model() == cm
    p = attnbound.plan(**POINT)
    assert p.candidates[0].seconds == cm.exact_seconds(1, 4096, 4096, 8, 8)
    assert planner.DEFAULT_COST_MODEL is DEFAULT_COST_MODEL  # the built-in model is never replaced
