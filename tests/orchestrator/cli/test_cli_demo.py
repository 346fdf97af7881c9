"""`shpeft demo`: its options reach the demo workflow and its exit code is the command's."""

from __future__ import annotations

from helpers_cli import invoke


def test_demo_passes_options_and_exit_code(monkeypatch):
    import orchestrator.workflows.demo as demo

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda store, smoke, **kw: seen.append((store, smoke, kw)) or 3)
    res = invoke("demo", "--store", "memory://d/store", "--smoke-test", "--num-cpus", 2)
    assert res.exit_code == 3
    assert seen == [("memory://d/store", True, {"num_cpus": 2, "all_methods": False})]
    res = invoke("demo", "--all-methods")
    assert seen[-1] == (None, False, {"num_cpus": None, "all_methods": True})
