"""`shpeft list`, `show`: a store's catalogue as tables or JSON, by job id or job file."""

from __future__ import annotations

import json

import yaml
from helpers_cli import good_job, invoke


def _write_catalogue(store: str):
    from orchestrator.store.results import write_rows

    write_rows(store, "aaaa11112222", [
        {"task": "busi", "status": "ok", "metric": "macro_f1", "val_macro_f1": 0.8125, "test_macro_f1": 0.75,
         "density": 1e-4, "alpha": 0.5, "trainable": 1234, "delta_uri": f"{store}/deltas/busi.safetensors",
         "sha256": "ab" * 32, "bytes": 4567, "started_at": "2026-01-01T00:00:00"},
        {"task": "covid_ct", "status": "failed", "metric": "accuracy", "val_accuracy": 0.6,
         "error": "DatasetError: x.png unreadable", "started_at": "2026-01-01T00:00:01"},
    ])
    write_rows(store, "bbbb33334444", [
        {"task": "chaoyang", "status": "ok", "metric": "macro_f1", "val_macro_f1": 0.5, "density": 0.001,
         "alpha": 1.0, "started_at": "2026-01-02T00:00:00"},
    ])


def test_list_and_show(tmp_path):
    store = str(tmp_path / "store")
    _write_catalogue(store)
    res = invoke("list", store)
    assert res.exit_code == 0, res.output
    for text in ("aaaa11112222", "bbbb33334444", "busi", "covid_ct", "chaoyang", "0.8125", "failed"):
        assert text in res.output
    rows = json.loads(invoke("list", store, "--json").output)
    assert {(r["job_id"], r["task"]) for r in rows} == {
        ("aaaa11112222", "busi"), ("aaaa11112222", "covid_ct"), ("bbbb33334444", "chaoyang")}

    res = invoke("show", store, "aaaa11112222")
    assert res.exit_code == 0, res.output
    assert "DatasetError: x.png unreadable" in res.output and "4567" in res.output
    assert "chaoyang" not in res.output
    one = json.loads(invoke("show", store, "aaaa11112222", "--task", "busi", "--json").output)
    assert len(one) == 1 and one[0]["sha256"] == "ab" * 32 and one[0]["val_macro_f1"] == 0.8125


def test_show_unknown_job(tmp_path):
    store = str(tmp_path / "store")
    _write_catalogue(store)
    res = invoke("show", store, "cccc")
    assert res.exit_code == 1
    assert "cccc" in res.output and "aaaa11112222" in res.output


def test_show_by_job_file(tmp_path):
    from orchestrator.store.results import write_rows
    from orchestrator.job.load import load_job
    from orchestrator.job.keys import job_id

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(good_job(tmp_path)))
    jid = job_id(load_job(path))
    store = str(tmp_path / "store")
    write_rows(store, jid, [{"task": "t1", "status": "ok"}])
    res = invoke("show", store, path)
    assert res.exit_code == 0 and jid in res.output and "t1" in res.output


def test_list_empty_store(tmp_path):
    res = invoke("list", tmp_path / "empty")
    assert res.exit_code == 0 and "no jobs" in res.output
