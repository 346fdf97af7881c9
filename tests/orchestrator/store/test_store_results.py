"""The catalogue heals: a damaged file is named, set aside and rebuilt from the artifacts whose evaluation
verifies; rows a failed write left out are recovered the same way. No Ray: the store is written by hand."""

from __future__ import annotations

import errno
import os

import pyarrow.parquet as pq
import pytest

from helpers_orch import random_delta
from orchestrator.store.evaluation_files import write_eval
from orchestrator.store.layout import catalogue_file, eval_file, task_artifact
from orchestrator.store.results import CatalogueError, heal_catalogue, read_catalogue, recover_rows, write_rows
from shpeft_core.backbone import BackboneSpec
from shpeft_core.io import StorageError, sha256_file

JOB = "3f2a9c0d1e4b"


def _finished_task(store: str, task: str, chash: str, seed: int) -> dict:
    """What a finished task leaves in the store: its delta and its sealed evaluation file."""
    uri = task_artifact(store, task, JOB, chash, "shpeft")
    os.makedirs(os.path.dirname(uri), exist_ok=True)
    random_delta(BackboneSpec("test_vit", None, {"img_size": 32}), uri, task, ["a", "b"], seed=seed, density=0.02,
                 scale=0.1)
    row = {"val_macro_f1": 0.5 + seed / 10, "test_macro_f1": 0.4, "sha256": sha256_file(uri), "bytes": 1,
           "sparse_values": 10, "trainable": 20, "eval_s": 0.1}
    write_eval(eval_file(uri), {"format": "shpeft-eval/2", "task": task, "method": "shpeft", "metric": "macro_f1",
                                "artifact_uri": uri, "artifact_kind": "delta", "artifact_sha256": row["sha256"],
                                "density": 0.02, "alpha": 0.5, "written_at": "2026-12-06T00:00:00+00:00",
                                "row": row})
    return {"task": task, "config_hash": chash, "status": "ok", "delta_uri": uri, "artifact_kind": "delta", **row}


def test_damaged_catalogue_is_named_set_aside_and_rebuilt(tmp_path):
    store = str(tmp_path / "store")
    rows = [_finished_task(store, "busi", "aaaa", 1), _finished_task(store, "chaoyang", "bbbb", 2)]
    uri = write_rows(store, JOB, rows)
    raw = open(uri, "rb").read()
    open(uri, "wb").write(raw[: len(raw) // 2])  # cut in half
    with pytest.raises(CatalogueError, match=f"catalogue file {uri} is damaged") as info:
        read_catalogue(store, JOB)
    assert isinstance(info.value, StorageError) and "\n" not in str(info.value)
    warned = []
    assert read_catalogue(store, on_damaged=warned.append).num_rows == 0 and uri in warned[0]
    said = heal_catalogue(store, JOB)
    assert len(said) == 2 and "set aside as" in said[0] and "2 row(s) rebuilt" in said[1]
    aside = [p for p in os.listdir(os.path.dirname(uri)) if ".damaged-" in p]
    assert len(aside) == 1 and open(os.path.join(os.path.dirname(uri), aside[0]), "rb").read() == raw[: len(raw) // 2]
    got = {r["task"]: r for r in read_catalogue(store, JOB).to_pylist()}
    assert set(got) == {"busi", "chaoyang"}
    for r in rows:
        g = got[r["task"]]
        assert (g["config_hash"], g["status"], g["delta_uri"], g["sha256"]) == (r["config_hash"], "ok", r["delta_uri"],
                                                                              r["sha256"])
        assert g["val_macro_f1"] == pytest.approx(r["val_macro_f1"])
    assert heal_catalogue(store, JOB) == []  # nothing left to do


def test_only_verified_artifacts_are_recovered(tmp_path):
    store = str(tmp_path / "store")
    good = _finished_task(store, "busi", "aaaa", 1)
    changed = _finished_task(store, "chaoyang", "bbbb", 2)
    with open(changed["delta_uri"], "ab") as f:
        f.write(b"x")  # the artifact no longer has the sha256 its evaluation records
    damaged = _finished_task(store, "derma", "cccc", 3)
    text = open(eval_file(damaged["delta_uri"])).read()
    open(eval_file(damaged["delta_uri"]), "w").write(text.replace('"macro_f1"', '"accuracy"', 1))
    assert set(recover_rows(store, JOB)) == {"busi"}
    # A write that failed (a full disk) left the catalogue without the row: the next run adds it back.
    write_rows(store, JOB, [{"task": "other", "status": "failed", "error": "boom"}])
    said = heal_catalogue(store, JOB)
    assert said == [f"catalogue {catalogue_file(store, JOB)}: 1 row(s) rebuilt from verified deltas (busi)"]
    got = {r["task"]: r for r in read_catalogue(store, JOB).to_pylist()}
    assert set(got) == {"busi", "other"} and got["busi"]["sha256"] == good["sha256"]


def test_a_full_disk_at_the_catalogue_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    import shpeft_core.io as sio

    store = str(tmp_path / "store")
    uri = write_rows(store, JOB, [_finished_task(store, "busi", "aaaa", 1)])
    before = open(uri, "rb").read()
    real = os.fsync

    def full(fd):
        if "/catalogue/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(sio.os, "fsync", full)
    with pytest.raises(StorageError, match=f"cannot write {uri}: No space left on device; free some space"):
        write_rows(store, JOB, [{"task": "chaoyang", "status": "failed", "error": "x"}])
    assert open(uri, "rb").read() == before
    assert os.listdir(os.path.dirname(uri)) == [os.path.basename(uri)]  # no temporary file left
    assert pq.read_table(uri).num_rows == 1


def test_an_ok_row_that_was_never_written_replaces_an_older_failed_one(tmp_path):
    store = str(tmp_path / "store")
    write_rows(store, JOB, [{"task": "busi", "status": "failed", "error": "first attempt"}])
    done = _finished_task(store, "busi", "aaaa", 1)  # the rerun trained it; its row's write then failed
    assert heal_catalogue(store, JOB) == [f"catalogue {catalogue_file(store, JOB)}: 1 row(s) rebuilt from "
                                          "verified deltas (busi)"]
    (row,) = read_catalogue(store, JOB).to_pylist()
    assert row["status"] == "ok" and row["sha256"] == done["sha256"] and row["error"] is None
