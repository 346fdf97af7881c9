"""The packages' layering, as pyproject.toml's import-linter contracts state it: shpeft_core and tasks never
import Ray or the orchestrator, serving never imports stages or workflows, nothing imports the CLI, and no
package or module imports a sibling that imports it back. Imports inside functions count too."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold(monkeypatch, capsys):
    cli = pytest.importorskip("importlinter.cli")
    monkeypatch.chdir(ROOT)
    code = cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    assert code == 0, capsys.readouterr().out
