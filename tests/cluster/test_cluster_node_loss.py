"""A worker node of a real Ray cluster is lost mid-training: the submitted job still completes, nothing is
lost and nothing that had finished is trained again.

The job (two tasks, one short, one long) is submitted with `shpeft submit --working-dir`; the folder
carries a ``sitecustomize.py`` (hold_after_checkpoint/) that makes the long task wait after its first
checkpoint, once, and record its PID. The test waits until the short task is in the catalogue and
the long one is waiting, finds the node the waiting process runs on, and SIGKILLs every process of
that node (by PID, never `ray stop`). No step depends on which worker is faster: the kill waits for
both conditions, however long the machine takes to reach them (bounded).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from helpers_cluster import ROOT, faults, package_files, shpeft, submission_id, wait_until, write_json

pytestmark = [pytest.mark.ray, pytest.mark.real_cluster]


def test_worker_node_killed_mid_training_job_completes_nothing_lost_nothing_redone(two_workers, cluster_data,
                                                                                    tmp_path):
    from orchestrator.job.keys import job_id
    from orchestrator.job.load import parse_job
    from orchestrator.store.results import read_catalogue

    cluster, url = two_workers, two_workers.dashboard_url
    _, backbone, _ = cluster_data
    specs = [faults.colour_task(str(tmp_path), "nl-short", seed=3, n_train=24),
             faults.colour_task(str(tmp_path), "nl-long", seed=4, n_train=96)]
    store = str(tmp_path / "store")
    doc = faults.job_dict(store, specs, backbone, epochs=3)
    jid = job_id(parse_job(doc))
    work = tmp_path / "submit"
    (work / "jobs").mkdir(parents=True)
    job_path = write_json(str(work / "jobs" / "job.yaml"), doc)
    shutil.copy(ROOT / "tests" / "cluster" / "hold_after_checkpoint" / "sitecustomize.py", work / "sitecustomize.py")
    marker = tmp_path / "held.json"

    sub = shpeft("submit", job_path, "--address", url, "--working-dir", work,
                 "--env", f"SHPEFT_TEST_HOLD=nl-long:{marker}")
    sid = submission_id(sub)
    assert "submitted: shpeft run jobs/job.yaml --address auto" in sub.stderr, sub.stderr

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(url)
    # --working-dir: the whole folder travelled, the job file at its place in it
    assert package_files(cluster, client.get_job_info(sid).runtime_env["working_dir"]) == [
        "jobs/job.yaml", "sitecustomize.py"]

    def ready():
        """The short task finished (its row in the catalogue) and the long one waits after a checkpoint."""
        assert not client.get_job_status(sid).is_terminal(), client.get_job_logs(sid)[-3000:]
        rows = faults.catalogue_rows(store, jid)
        return marker.exists() and rows.get("nl-short", {}).get("status") == "ok" and rows

    before = wait_until(ready, 600, "short task finished and long task at its first checkpoint", poll=1.0)
    held = json.loads(marker.read_text())
    victim = cluster.node_of_pid(held["pid"])
    assert victim is not None and victim is not cluster.head, (held, [n.pid for n in cluster.nodes])
    short_before = dict(before["nl-short"])
    short_mtime = os.path.getmtime(short_before["delta_uri"])
    assert "nl-long" not in before and faults.checkpoints(store, jid).get("nl-long", 0) >= 1

    assert cluster.kill_node(victim)  # raises unless every process of the node is gone

    status = shpeft("status", sid, "--address", url, "--wait", "--poll", "1", timeout=900)
    logs = shpeft("logs", sid, "--address", url).stdout
    assert status.returncode == 0, status.stdout + logs[-4000:]
    assert status.stdout.strip() == f"{sid}: SUCCEEDED (Job finished successfully.)"
    assert f"job {jid}: 2 ok, 0 failed" in logs
    # the resumed attempt's lines reach the console and the task's log in the store (the job's progress
    # board lives on the driver's node, not on the node that was lost)
    resumed = "resuming after 1 completed epoch(s) from the last checkpoint"
    assert f"[nl-long] {resumed}" in logs and "[nl-long] epoch 3/3" in logs, logs[-4000:]
    task_log = shpeft("logs", store, jid, "--task", "nl-long")
    assert task_log.returncode == 0 and resumed in task_log.stdout and "epoch 3/3" in task_log.stdout, task_log.stdout

    rows = faults.catalogue_rows(store, jid)
    # nothing lost: both deltas verify against the sha256 the catalogue recorded
    assert sorted(rows) == ["nl-long", "nl-short"] and all(faults.artifact_ok(r) for r in rows.values()), rows
    # the long task moved off the lost node and resumed from a checkpoint instead of starting over
    long_ = rows["nl-long"]
    assert long_["node"] != victim.node_id and long_["node"] in {n.node_id for n in cluster.workers}
    assert long_["resumed_from_epoch"] == 0, long_  # after epoch 1, the checkpoint it waited at
    # nothing finished redone: the short task's row and artifact are the ones from before the loss
    short = rows["nl-short"]
    assert short["started_at"] == short_before["started_at"] and short["sha256"] == short_before["sha256"]
    assert os.path.getmtime(short["delta_uri"]) == short_mtime
    mine = [r["task"] for r in read_catalogue(store, jid).to_pylist()]
    assert sorted(mine) == ["nl-long", "nl-short"]  # exactly one row per task

