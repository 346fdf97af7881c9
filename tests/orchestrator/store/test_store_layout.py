"""The store's layout has one home: every path under a store is built in orchestrator/store/layout.py."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
LAYOUT = ROOT / "orchestrator" / "store" / "layout.py"

# Every folder and fixed file name the store holds (layout.py's module docstring draws them).
STORE_NAMES = ("jobs", "importance", "agnostic-", "runs", "checkpoints", "epoch-", "sweeps", "_tune", "trials",
               "ledger.json", "deltas", "latest.json", "catalogue", "plots", "report.md", "report.json", "reports",
               "results.parquet", "artifacts", "backbones", "logs", "data", "data-smoke", "demo-job.yaml",
               "demo-smoke-job.yaml", "fault-injected.json", ".eval.json", "mlruns", "tensorboard", "data-cache")
PATH_BUILDERS = {"join_uri", "join"}  # shpeft_core.io.join_uri, os.path.join


def _literals(node: ast.AST):
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            yield sub.value


def _store_paths_built_outside_layout() -> list[str]:
    found = []
    for path in sorted((ROOT / "orchestrator").rglob("*.py")):
        if path == LAYOUT:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            func = call.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name not in PATH_BUILDERS:
                continue
            for arg in call.args[1:]:
                for text in _literals(arg):
                    first = text.strip("/").split("/", 1)[0]
                    if any(first == n or (n.endswith(("-", ".json")) and n in first) for n in STORE_NAMES):
                        found.append(f"{path.relative_to(ROOT)}:{call.lineno}: {text!r}")
    return found


def test_no_store_path_is_built_outside_the_layout_module():
    assert _store_paths_built_outside_layout() == []


def test_the_check_finds_a_store_path_built_elsewhere(tmp_path, monkeypatch):
    """The check above is not vacuous: a module joining a store folder by hand is found."""
    fake = tmp_path / "orchestrator" / "stages"
    fake.mkdir(parents=True)
    (fake / "rogue.py").write_text('from shpeft_core.io import join_uri\n\ndef f(store):\n'
                                   '    return join_uri(store, "runs", "x")\n')
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert [f.split(":")[0] for f in _store_paths_built_outside_layout()] == ["orchestrator/stages/rogue.py"]


def test_layout_paths_read_back_what_they_name(tmp_path):
    from orchestrator.store import layout

    store = str(tmp_path)
    root = layout.run_checkpoints(layout.run_root(store, "job1", "t", "h"))
    for k in (1, 3, 2):
        Path(layout.checkpoint_dir(root, k)).mkdir(parents=True)
    Path(root, "unrelated").mkdir()
    assert layout.checkpoint_epochs(root) == [3, 2, 1]
    assert layout.checkpoint_epochs(layout.run_checkpoints(layout.run_root(store, "job2", "t", "h"))) == []
    art = layout.task_artifact(store, "t", "job1", "h", "lora")
    assert art.endswith(".lora") and layout.eval_file(art).endswith("job1-h.eval.json")
    assert layout.eval_file(layout.task_artifact(store, "t", "job1", "h", "full")).endswith("job1-h.eval.json")
