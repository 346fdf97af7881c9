"""The `shpeft` group: every command is there with its help, the script starts light, nothing imports the CLI."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from helpers_cli import ROOT, SHPEFT, invoke

from orchestrator.cli.main import main

COMMANDS = ["run", "compare", "validate", "schema", "submit", "status", "logs", "list", "show", "report", "predict",
            "export", "serve", "demo", "tasks"]


def _command_paths(group=main, prefix=()) -> list[tuple[str, ...]]:
    """Every command and subcommand as the words that name it, e.g. ("tasks", "check")."""
    out = []
    for name, cmd in group.commands.items():
        out.append((*prefix, name))
        if hasattr(cmd, "commands"):
            out += _command_paths(cmd, (*prefix, name))
    return out


def test_help_lists_every_command():
    res = invoke("--help")
    assert res.exit_code == 0
    assert sorted(main.commands) == sorted(COMMANDS)
    for cmd in COMMANDS:
        assert f"  {cmd} " in res.output or f"  {cmd}\n" in res.output, cmd


@pytest.mark.parametrize("words", _command_paths(), ids=" ".join)
def test_every_command_has_help(words):
    res = invoke(*words, "--help")
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"Usage: main {' '.join(words)} "), res.output
    assert main.get_command(None, words[0]).get_short_help_str()  # its line in `shpeft --help`


def test_console_script_help():
    out = subprocess.run([str(SHPEFT), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "predict" in out.stdout and "submit" in out.stdout


def test_help_imports_neither_torch_nor_ray():
    """`shpeft --help` and the job schema stay fast: torch, timm and ray load only when a command needs them."""
    code = ("import sys, orchestrator.cli.main, orchestrator.job.spec; "
            "heavy = sorted(m for m in ('torch', 'timm', 'ray') if m in sys.modules); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def cli_imports(source: str, module: str) -> list[str]:
    """'line: name' for each import of orchestrator.cli in ``source`` (the file of dotted ``module``), at any
    depth (function-level too), including importlib.import_module / __import__ with a literal name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: against the file's package
                package = module.split(".")[:-node.level]
                base = ".".join(package + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__")):
            names = [node.args[0].value]
        found += [f"{node.lineno}: {n}" for n in names if n == "orchestrator.cli" or n.startswith("orchestrator.cli.")]
    return found


def test_the_import_check_sees_every_form():
    module = "orchestrator.runtime.probe"
    for case in ["import orchestrator.cli.main", "from orchestrator.cli import common", "from orchestrator import cli",
                 "def f():\n    from orchestrator.cli.jobs import run", "from ..cli import serve",
                 "import importlib\nimportlib.import_module('orchestrator.cli.results')"]:
        assert cli_imports(case, module), case
    assert cli_imports("import orchestrator.client\nfrom orchestrator import cluster_info\nfrom . import cli", module) == []


def test_nothing_outside_the_cli_imports_it():
    """The CLI is the top of the layering: the library, the cluster files and the benchmarks never import it
    (the tests and bench/faults.py run it as a program)."""
    offenders = {}
    for folder in ("shpeft_core", "tasks", "orchestrator", "cluster", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if (ROOT / "orchestrator" / "cli") in path.parents:
                continue
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            if hits := cli_imports(path.read_text(encoding="utf-8"), module):
                offenders[str(path.relative_to(ROOT))] = hits
    assert offenders == {}
