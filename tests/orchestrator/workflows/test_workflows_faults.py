"""`shpeft run` when the store or a task goes wrong: a full disk at the catalogue write, a catalogue file cut
in half, a task that fails under --no-progress, and a `validate` that must write nothing. Each ends in one
line (exit 2 for the store, 1 for a failed task), and the next run heals the store without retraining."""

from __future__ import annotations

import errno
import glob
import os

import pytest
import yaml
from click.testing import CliRunner

from helpers_orch import BACKBONE, backbone_file, colour_task  # noqa: F401
from orchestrator.cli.main import main
from orchestrator.job.keys import job_id
from orchestrator.job.load import load_job
from orchestrator.store.layout import catalogue_file


def _job_file(tmp_path, specs, store) -> str:
    job = {"backbone": BACKBONE, "store": str(store), "tasks": [s.model_dump(mode="json") for s in specs],
           "importance": {"batches": 1, "batch_size": 16, "include_target": True}, "selection": {"density": 0.02, "alpha": 0.5},
           "training": {"epochs": 1, "batch_size": 16, "lr": 3e-3, "warmup_epochs": 0}}
    path = tmp_path / f"job-{len(list(tmp_path.glob('job-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def test_validate_writes_nothing_and_names_a_missing_npz(tmp_path):
    spec = colour_task(str(tmp_path / "data"), "colours", 0)
    store = tmp_path / "not-yet" / "store"
    path = _job_file(tmp_path, [spec], store)
    res = _run("validate", path)
    assert res.exit_code == 0, res.output + res.stderr
    assert not (tmp_path / "not-yet").exists()
    job = yaml.safe_load(open(path))
    job["tasks"] = [{"name": "mine", "source": str(tmp_path / "mine.npz"), "format": "medmnist", "num_classes": 2,
                     "image_size": 32}]
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump(job))
    res = _run("validate", tmp_path / "missing.yaml")
    assert res.exit_code == 2 and f"{tmp_path / 'mine.npz'}: no such file" in res.stderr, res.stderr
    assert not (tmp_path / "not-yet").exists()


@pytest.mark.ray
def test_full_disk_then_damaged_catalogue_heal_without_retraining(ray_local, tmp_path, monkeypatch):
    import shpeft_core.io as sio

    spec = colour_task(str(tmp_path / "data"), "colours", 0)
    store = tmp_path / "store"
    path = _job_file(tmp_path, [spec], store)
    jid = job_id(load_job(path))
    real = os.fsync

    def full(fd):  # the disk fills up exactly when the catalogue is written
        if "/catalogue/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    with monkeypatch.context() as m:
        m.setattr(sio.os, "fsync", full)
        res = _run("run", path, "--no-progress")
    err = _lines(res.stderr)
    assert res.exit_code == 2 and len(err) == 1 and "No space left on device" in err[0], res.stderr
    assert "catalogue" in err[0] and "Traceback" not in res.stderr + res.stdout
    assert not glob.glob(str(store / "**" / "*.tmp-*"), recursive=True)  # nothing half-written
    assert glob.glob(str(store / "deltas" / "colours" / f"{jid}-*.eval.json"))  # the work itself was kept
    res = _run("list", store)
    assert res.exit_code == 0 and "no jobs" in res.stdout

    res = _run("run", path, "--no-progress")  # the next run heals the catalogue instead of retraining
    assert res.exit_code == 0, res.stdout + res.stderr
    assert "1 row(s) rebuilt from verified deltas (colours)" in res.stdout
    res = _run("show", store, jid, "--json")
    assert res.exit_code == 0 and '"trained": false' in res.stdout and '"status": "ok"' in res.stdout

    cat = catalogue_file(str(store), jid)
    raw = open(cat, "rb").read()
    open(cat, "wb").write(raw[: len(raw) // 2])  # a catalogue file cut in half
    res = _run("list", store)
    assert res.exit_code == 0 and f"warning: catalogue file {cat} is damaged" in res.stderr
    for cmd in (["show", store, jid], ["report", store, jid]):
        res = _run(*cmd)
        assert res.exit_code == 2 and _lines(res.stderr) == [f"error: {_lines(res.stderr)[0][7:]}"], res.stderr
        assert cat in res.stderr and "Traceback" not in res.stderr
    res = _run("run", path, "--no-progress")
    assert res.exit_code == 0, res.stdout + res.stderr
    assert f"catalogue file {cat} was damaged: set aside as" in res.stdout
    assert len(glob.glob(cat + ".damaged-*")) == 1
    res = _run("show", store, jid, "--json")
    assert res.exit_code == 0 and '"task": "colours"' in res.stdout


@pytest.mark.ray
def test_no_progress_still_prints_a_failed_task(ray_local, tmp_path):
    spec = colour_task(str(tmp_path / "data"), "colours", 1)
    bad = tmp_path / "data" / "colours" / "train" / "c0" / "0.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n cut short")  # listed fine (validate passes), fails when decoded
    path = _job_file(tmp_path, [spec], tmp_path / "store")
    res = _run("run", path, "--no-progress")
    assert res.exit_code == 1
    failed = [ln for ln in _lines(res.stdout) if "FAILED" in ln]
    assert len(failed) == 1 and failed[0].startswith("[colours] FAILED:") and "0.png" in failed[0], res.stdout
