"""Every experiment's verdict on the rows of every report scale: no scale may turn a true claim into FAIL.

``tests/data/report_rows/{small,medium,large}.json`` hold, per experiment of ``attnbound reproduce --scale S``,
the rows and numbers its verdict functions read (saved from a real run's results.json; the rows are
deterministic — counted operations and arithmetic — except minilm's float32 radii and the measured errors,
which do not move a verdict). Each test recomputes an experiment's verdict from them with the module's own
verdict functions, combined as its ``run()`` combines them, and requires PASS (SKIPPED only where the run was
skipped, with its reason). Seconds, where the runs themselves take minutes.

After a change to what an experiment measures or to its sizes, save the rows again::

    attnbound reproduce --scale large --out /tmp/large
    python tests/test_report_scales.py /tmp/large/results.json   # writes tests/data/report_rows/large.json
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import pytest

from attnbound.experiments import (EXPERIMENTS, direct_sum, families, gradient, minilm, reductions, scaling,
                                   taylor_order, training, transition)
from attnbound.experiments.common import combine

DATA = Path(__file__).resolve().parent / "data" / "report_rows"
SCALES = ("small", "medium", "large")
DEFAULT = [name for name, mod in EXPERIMENTS.items() if getattr(mod, "DEFAULT", True)]
# the entries of Result.numbers a verdict reads (the rest of numbers is illustration)
NUMBERS = {"families": ("measured",), "gradient": ("product",), "minilm": ("runs", "eps"),
           "training": ("checks", "ops", "threshold")}
# the two experiments with many wide rows keep only the columns their verdicts read (others keep every column)
ROW_KEYS = {"reductions": ("problem", "method", "degree", "certified", "truth", "answer", "correct"),
            "training": ("step", "loss_exact", "loss_relative", "forward_bound", "gradient_bound"),
            "minilm": ("layer", "head", "n", "R", "max_abs_logit", "B_over_sqrt_ln_n", "log10_rank_tight@*",
                       "R_recomputed", "R_centred", "R_heavy*")}  # name* : every column whose name starts so


def _floats(x):
    """results.json writes non-finite floats as strings (report._clean): read them back as floats."""
    if isinstance(x, str) and x in ("inf", "-inf", "nan"):
        return float(x)
    if isinstance(x, dict):
        return {k: _floats(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_floats(v) for v in x]
    return x


@functools.cache
def load(scale: str) -> dict:
    return _floats(json.loads((DATA / f"{scale}.json").read_text()))


# ------------------------------------------------------------------ each run()'s verdict, from its rows


@functools.cache
def _alman_song_ranks() -> tuple:
    return tuple((lg, scaling.alman_song_rank(lg)[1]) for lg in scaling.AS_LOG2NS)


def _scaling(rows, numbers):
    counts = [r for r in rows if r["series"] == "op counts"]
    ops = {"exact": [r["exact_ops"] for r in counts], "polynomial": [r["polynomial_ops"] for r in counts]}
    v1, reasons, _ = scaling.verdict_slopes([r["n"] for r in counts], ops, {"exact": 2.0, "polynomial": 1.0})
    v2, why2 = scaling.verdict_alman_song([r for r in rows if r["series"] == "alman-song"], list(_alman_song_ranks()))
    return combine([v1, v2]), "; ".join(reasons) + f". {why2} → {v2}"


@functools.cache
def _crosscheck(points: tuple) -> tuple:
    return transition.crosscheck(list(points))  # seconds; the same points at every scale


def _transition(rows, numbers):
    threshold = [r for r in rows if r["family"] == "threshold B*"]
    decay = {"B = 1": [], "B = (ln n)^(1/4)": []}
    fixed_c, points = {}, []
    for r in rows:
        if r["family"] == "threshold B*":
            continue
        points.append((r["R"], -r["log2_n"] * math.log(2), r["degree"]))
        series = decay[r["family"]] if r["family"] in decay else fixed_c.setdefault(float(r["family"][2:]), [])
        series.append(r["log_rank_over_log_n"])
    ln_ns = [r["log2_n"] * math.log(2) for r in threshold]
    v1, why1, _ = transition.verdict_exponent(ln_ns, [r["B"] for r in threshold])
    v2, why2 = transition.verdict_levelling(fixed_c)
    v3, why3 = transition.verdict_decay(decay)
    v4, why4, _ = _crosscheck(tuple(points))
    return combine([v1, v2, v3, v4]), f"{why1} → {v1}. {why2} → {v2}. {why3} → {v3}. {why4} → {v4}"


def _families(rows, numbers):
    parts = [families.verdict_order(rows), families.verdict_targets(rows),
             families.verdict_measured(numbers["measured"], rows)]
    return combine([v for v, _ in parts]), ". ".join(f"{why} → {v}" for v, why in parts)


def _taylor_order(rows, numbers):
    equal = [r for r in rows if r["regime"] == "d = p"]
    return taylor_order.verdict([r for r in rows if r["regime"] != "d = p"], equal)


def _direct_sum(rows, numbers):
    return direct_sum.verdict([r for r in rows if "L" in r], [r for r in rows if "LH" in r])


def _gradient(rows, numbers):
    (v1, why1), (v2, why2) = gradient.verdict_ratios(rows), gradient.verdict_product(numbers["product"])
    return combine([v1, v2]), f"{why1} → {v1}. {why2} → {v2}"


def _reductions(rows, numbers):
    return reductions.verdict(rows)


def _minilm(rows, numbers):
    (v1, why1), (v2, why2) = minilm.verdict(rows, numbers["runs"], numbers["eps"]), minilm.verdict_radii(rows)
    return combine([v1, v2]), f"{why1}; {why2}"


def _training(rows, numbers):
    v1, why1 = training.verdict_bounds(numbers["checks"])
    v2, why2 = training.verdict_ops(numbers["ops"])
    thr = numbers["threshold"]
    v3, why3, _ = transition.verdict_exponent([t["log2_n"] * math.log(2) for t in thr], [t["B_grad"] for t in thr])
    return combine([v1, v2, v3]), f"{why1} → {v1}. {why2} → {v2}. {why3} → {v3}"


RECOMPUTE = {"scaling": _scaling, "transition": _transition, "families": _families, "taylor_order": _taylor_order,
             "direct_sum": _direct_sum, "gradient": _gradient, "reductions": _reductions, "minilm": _minilm,
             "training": _training}


# ------------------------------------------------------------------ the tests


@pytest.mark.parametrize("scale", SCALES)
def test_every_default_experiment_has_saved_rows(scale):
    data = load(scale)
    assert data["scale"] == scale
    assert sorted(data["experiments"]) == sorted(DEFAULT) == sorted(RECOMPUTE), (
        "save the rows again (see this module's docstring)")


@pytest.mark.parametrize("name", list(RECOMPUTE))
@pytest.mark.parametrize("scale", SCALES)
def test_verdict_passes_at_every_scale(scale, name):
    exp = load(scale)["experiments"][name]
    if exp["verdict"] == "SKIPPED":  # an optional extra was missing where the rows were saved
        assert not exp["rows"] and exp["reason"]
        pytest.skip(f"{name} was skipped at --scale {scale}: {exp['reason']}")
    v, why = RECOMPUTE[name](exp["rows"], exp["numbers"])
    assert v == "PASS", (scale, name, why)


@pytest.mark.parametrize("scale", SCALES)
def test_taylor_order_fails_on_a_planted_rank_times_d_cost(scale):
    """The real rows of each scale with the rank term's cost multiplied by d/4 (d = p regime: ×0.5 … ×2): the
    cost verdict must see it; so must it a cost growing like rank^1.5."""
    rows = load(scale)["experiments"]["taylor_order"]["rows"]
    c = taylor_order.ops_per_rank(rows[0]["d_v"])

    def planted(rank_cost):
        out = []
        for r in rows:
            fixed = r["ops"] / r["n"] - c * r["rank"]  # what the row spends besides the rank term
            out.append({**r, "ops": round(r["n"] * (fixed + rank_cost(r)))})
        return _taylor_order(out, {})

    assert _taylor_order(rows, {})[0] == "PASS"
    v, why = planted(lambda r: c * r["rank"] * r["d"] / 4)
    assert v == "FAIL" and "NOT proportional to the rank" in why and "d = p rank 12870 (d = 8)" in why, why
    v, why = planted(lambda r: c * r["rank"] ** 1.5)
    assert v == "FAIL" and "d = 4 rank 70:" in why, why


def _row(name: str, row: dict) -> dict:
    keys = ROW_KEYS.get(name)
    if keys is None:
        return row
    prefixes = tuple(k[:-1] for k in keys if k.endswith("*"))
    return {k: v for k, v in row.items() if k in keys or k.startswith(prefixes)}


def save(results_json: str) -> Path:
    """Write tests/data/report_rows/<scale>.json from a reproduce run's results.json (one row per line)."""
    data = json.loads(Path(results_json).read_text())
    head = {k: data[k] for k in ("scale", "seed", "commit", "date")}
    head["seconds"] = round(data["seconds"], 1)
    lines = ["{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in head.items()) + ', "experiments": {']
    for i, (name, exp) in enumerate(data["experiments"].items()):
        numbers = {k: exp["numbers"][k] for k in NUMBERS.get(name, ()) if k in exp["numbers"]}
        reason = exp["reason"] if exp["verdict"] == "SKIPPED" else ""
        lines.append(f'{json.dumps(name)}: {{"verdict": {json.dumps(exp["verdict"])}, "reason": {json.dumps(reason)}, '
                     f'"numbers": {json.dumps(numbers, ensure_ascii=False)}, "rows": [')
        rows = [json.dumps(_row(name, r), ensure_ascii=False) for r in exp["rows"]]
        lines.append(",\n".join(rows))
        lines.append("]}" + ("," if i < len(data["experiments"]) - 1 else ""))
    lines.append("}}")
    DATA.mkdir(parents=True, exist_ok=True)
    out = DATA / f"{data['scale']}.json"
    out.write_text("\n".join(lines) + "\n")
    json.loads(out.read_text())  # well formed
    return out


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(save(path))
