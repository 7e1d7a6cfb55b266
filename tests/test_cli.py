"""The command line: exit codes, one-line errors, listed choices, units, progress, the error tool."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import attnbound
from attnbound import cli, validation
from attnbound.cli import app

runner = CliRunner()
CLI_SOURCE = Path(cli.__file__)


def _run(*args, columns=None):
    env = {"COLUMNS": str(columns)} if columns else None
    return runner.invoke(app, [str(a) for a in args], env=env)


def _one_line_error(result, pattern):
    """Exit status 2 and one line on stdout (progress lines, if any, went to stderr)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert re.search(pattern, lines[0]), lines[0]


def test_help_and_listed_choices():
    res = _run("--help")
    assert res.exit_code == 0
    for command in ("demo", "plan", "calibrate", "reproduce", "error", "reduce", "study"):
        assert command in res.output
    assert "auto|polynomial|relative|taylor" in _run("demo", "--help", columns=200).output
    assert "exact|dense|blockwise|taylor|polynomial|relative|auto" in _run("reduce", "ov", "--help", columns=200).output
    assert "bhnd|bnhd" in _run("error", "--help", columns=200).output


def test_method_choices_follow_the_library():
    assert tuple(m.value for m in cli.Method) == validation.METHODS
    assert {m.value for m in cli.ApproxMethod} == set(validation.APPROX_METHODS)
    assert tuple(k.value for k in cli.Kind) == validation.KINDS


@pytest.mark.parametrize("args,pattern", [
    (("demo", "--n", "0"), r"--n must be positive, got 0"),
    (("demo", "--eps", "-1"), r"--eps must be positive"),
    (("plan", "--n", "100", "--d", "8", "--radius", "-1"), r"radius"),
    (("plan", "--n", "100", "--d", "0", "--radius", "1"), r"--d must be positive"),
    (("calibrate", "--repeats", "0"), r"--repeats must be positive"),
    (("reduce", "ov", "--n", "0"), r"n"),
    # the feature memory check refuses a rank of C(36, 8) ≈ 3·10⁷: one line, no traceback
    (("reduce", "gap-hamming", "--n", "256", "--d", "16", "--method", "polynomial", "--degree", "8"),
     r"memory_budget: polynomial degree 8 needs feature rank r=30260340"),
])
def test_bad_input_is_one_line_with_status_2(args, pattern):
    _one_line_error(_run(*args), pattern)


def test_unknown_choice_is_a_usage_error():
    res = _run("demo", "--method", "nope")
    assert res.exit_code == 2 and "Traceback" not in res.output and "nope" in res.output


def test_demo_shows_sdpa_exact_and_a_certified_method():
    res = _run("demo", "--n", "600", "--heads", "1", "--method", "polynomial", "--eps", "1e-3")
    assert res.exit_code == 0, res.output
    rows = {ln.split("│")[1].strip(): [c.strip() for c in ln.split("│")[2:-1]]
            for ln in res.stdout.splitlines() if ln.startswith("│") and ln.split("│")[1].strip()}
    assert set(rows) == {"torch SDPA", "attnbound exact", "attnbound polynomial"}
    seconds, measured, certified, cert = rows["attnbound polynomial"]
    assert float(seconds) > 0 and cert.startswith("polynomial")
    assert 0 < float(measured) <= float(certified) <= 1e-3
    assert float(rows["torch SDPA"][1]) < 1e-5 and rows["torch SDPA"][2] == "-"


def test_plan_headers_keep_their_units():
    res = _run("plan", "--n", "65536", "--d", "8", "--radius", "1", "--eps", "1e-3")
    assert res.exit_code == 0
    header = "\n".join(res.output.splitlines()[:5])
    for unit in ("[s]", "[MiB]", "‖Δout‖∞"):
        assert unit in header, header
    assert "choice" in res.output and "max-abs error" in res.output


def test_calibrate_runs():
    res = _run("calibrate", "--repeats", "1", "--no-save")
    assert res.exit_code == 0 and "CostModel" in res.output


@pytest.fixture
def saved_run(tmp_path, rng):
    q, k, v = (torch.randn(2, 4, 40, 8, generator=rng) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out[1, 2, 7, 3] += 0.25  # a planted error
    path = tmp_path / "run.pt"
    torch.save({"out": out, "q": q, "k": k, "v": v, "is_causal": True}, path)
    return path, (out, q, k, v)


def test_error_command_measures_the_planted_error(saved_run, tmp_path):
    path, (out, q, k, v) = saved_run
    res = _run("error", path)
    assert res.exit_code == 0, res.output
    value = float(re.search(r"max \|out − exact\| = (\S+)", res.output).group(1))
    assert value == pytest.approx(attnbound.measure_error(out, q, k, v, is_causal=True), rel=1e-6)
    assert value == pytest.approx(0.25, abs=1e-5)
    assert "layout bhnd (batch, heads, n, d)" in res.output
    # the option overrides the file: without the causal mask the output is far from exact
    assert float(re.search(r"= (\S+)", _run("error", path, "--no-causal").output).group(1)) > 0.3


def test_error_command_refuses_a_transposed_layout_and_bad_files(saved_run, tmp_path):
    _, (out, q, k, v) = saved_run
    t = {name: x.transpose(1, 2) for name, x in (("out", out), ("q", q), ("k", k), ("v", v))}
    torch.save({**t, "is_causal": True}, tmp_path / "t.pt")
    _one_line_error(_run("error", tmp_path / "t.pt"), r"looks transposed.*layout='bnhd'")
    assert _run("error", tmp_path / "t.pt", "--layout", "bnhd").exit_code == 0
    torch.save({"out": out, "q": q}, tmp_path / "partial.pt")
    _one_line_error(_run("error", tmp_path / "partial.pt"), r"lacks k, v")
    torch.save({"out": out, "q": q, "k": k, "v": v, "causal": True}, tmp_path / "typo.pt")
    _one_line_error(_run("error", tmp_path / "typo.pt"), r"unknown keys causal")
    _one_line_error(_run("error", tmp_path / "absent.pt"), r"No such file")


def test_progress_goes_to_stderr_when_output_is_redirected():
    exe = Path(sys.executable).with_name("attnbound")
    proc = subprocess.run([str(exe), "reduce", "ov", "--n", "64", "--m", "12"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "deciding n=64 with the exact oracle" in proc.stderr
    assert "agree" in proc.stdout and "deciding" not in proc.stdout


def test_cli_module_imports_nothing_heavy_at_top_level():
    """torch and the attnbound modules load inside the commands, so --help does not pay for them."""
    tree = ast.parse(CLI_SOURCE.read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top for a in n.names} | \
            {(n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
    assert not names & {"torch", "attnbound", "numpy", "scipy", "matplotlib"}, names


def test_help_does_not_import_torch():
    code = "import sys; from attnbound.cli import app; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False"
