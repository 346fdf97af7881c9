"""`shpeft submit / status / logs` against a real Ray cluster started with `ray start` (tests/cluster/conftest.py).

A two-task job and a `compare --smoke-test` run to the end on the worker nodes and their artifacts are
verified in the store; an entrypoint that cannot start (no `shpeft` on the job's PATH, exit 127) is
named by `shpeft status` with what to do. Ray's own INFO lines stay off `submit`'s console.
"""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest

from helpers_cluster import ROOT, package_files, ray_info_lines, shpeft, submission_id, write_json

pytestmark = [pytest.mark.ray, pytest.mark.real_cluster]


def _job_info(url: str, sid: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(url).get_job_info(sid)


def test_two_task_job_runs_to_the_end_with_its_deltas_verified(ray_cluster, two_task_job):
    from orchestrator.store.results import latest_rows
    from shpeft_core.delta import load_delta
    from shpeft_core.io import sha256_file

    job, url = two_task_job, ray_cluster.dashboard_url
    # submit: the id on stdout; on stderr the local-store warning and what runs, and no line of Ray's own
    assert job.sid == "shpeft-two-tasks"
    err = job.submit.stderr
    assert "warning: store" in err and "local path" in err, err
    assert "submitted: shpeft run job.yaml --address auto" in err, err
    assert ray_info_lines(err) == [], err
    info = _job_info(url, job.sid)
    assert info.entrypoint == "shpeft run job.yaml --address auto"
    assert info.runtime_env["env_vars"] == {"SHPEFT_TEST_MARK": "two-tasks"}
    # only the job file travelled, as the cluster unpacked it
    assert package_files(ray_cluster, info.runtime_env["working_dir"]) == ["job.yaml"]

    # status --wait: succeeded; logs --follow ended with the job and holds the driver's whole console
    assert job.status.returncode == 0, job.status.stdout + job.status.stderr
    assert job.status.stdout.strip() == f"{job.sid}: SUCCEEDED (Job finished successfully.)"
    summary = f"job {job.job_id}: 2 ok, 0 failed"
    assert job.follow.returncode == 0 and summary in job.follow.stdout, job.follow.stdout[-3000:]
    logs = shpeft("logs", job.sid, "--address", url)
    assert logs.returncode == 0, logs.stderr
    assert f"Running entrypoint for job {job.sid}: shpeft run job.yaml --address auto" in logs.stdout
    assert summary in logs.stdout and "[ca] done:" in logs.stdout and "[cb] done:" in logs.stdout

    # the deltas are in the store, each matching its catalogue sha256, and each loads (its own checks pass)
    rows = latest_rows(job.store, job.job_id)
    assert sorted(rows) == ["ca", "cb"]
    workers = {n.node_id for n in ray_cluster.nodes[1:]}
    for task, row in rows.items():
        assert row["status"] == "ok", row
        assert sha256_file(row["delta_uri"]) == row["sha256"]
        assert load_delta(row["delta_uri"]).metadata["task"] == task
        assert row["node"] in workers  # trained on a worker node: the head has no CPUs
    # the job's progress board (every console and task-log line passes through it) ran on the driver's node
    from ray.util.state import list_actors

    boards = list_actors(address=url, filters=[("class_name", "=", "ProgressBoard")], detail=True)
    assert boards and {a.node_id for a in boards} == {ray_cluster.head.node_id}, boards


def test_submitted_job_status_and_logs_errors(ray_cluster, two_task_job, tmp_path):
    url = ray_cluster.dashboard_url
    res = shpeft("status", "no-such-submission", "--address", url)
    assert res.returncode == 1 and res.stderr.startswith("error: cannot get the status of no-such-submission")
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = shpeft("submit", two_task_job.job_path, "--address", url, "--working-dir", elsewhere)
    assert res.returncode == 1 and "is not inside --working-dir" in res.stderr, res.stderr


def test_compare_smoke_test_submitted_runs_every_method(ray_cluster, two_task_job):
    from shpeft_core.artifacts import artifact_sha256

    url = ray_cluster.dashboard_url
    res = shpeft("submit", two_task_job.job_path, "--address", url, "--compare", "--smoke-test")
    sid = submission_id(res)
    assert "submitted: shpeft compare job.yaml --address auto --smoke-test" in res.stderr, res.stderr
    status = shpeft("status", sid, "--address", url, "--wait", "--poll", "1", timeout=900)
    logs = shpeft("logs", sid, "--address", url).stdout
    assert status.returncode == 0, status.stdout + logs[-3000:]
    report = [ln.split(": report ", 1)[1].strip() for ln in logs.splitlines() if ": report " in ln]
    assert len(report) == 1, logs[-3000:]
    results = report[0].rsplit("/", 1)[0] + "/results.parquet"
    with open(results, "rb") as f:
        rows = pq.read_table(io.BytesIO(f.read())).to_pylist()
    # --smoke-test: shpeft, linear and full, one seed, one epoch, for both tasks
    assert sorted((r["task"], r["method"], r["seed"]) for r in rows) == sorted(
        (t, m, 0) for t in ("ca", "cb") for m in ("shpeft", "linear", "full"))
    for r in rows:
        assert r["status"] == "ok" and r["epochs"] == 1, r
        assert artifact_sha256(r["artifact_uri"], r["artifact_kind"]) == r["sha256"]
    with open(report[0]) as f:
        assert "| method | ca | cb | mean |" in f.read()


def test_entrypoint_that_cannot_start_is_named_with_what_to_do(ray_cluster, two_task_job, tmp_path):
    """A head whose job shell has no `shpeft` on PATH (a head started from a virtual environment that was
    not activated): the job's PATH is set without it, exit 127."""
    url = ray_cluster.dashboard_url
    doc = dict(two_task_job.job)
    doc["store"] = str(tmp_path / "store")  # new content: a package Ray has not seen, so it is uploaded
    job_path = write_json(str(tmp_path / "job.yaml"), doc)
    res = shpeft("submit", job_path, "--address", url, "--env", "PATH=/usr/bin:/bin", "--show-logs")
    sid = submission_id(res)
    # --show-logs: Ray's own lines about the upload are on the console
    assert any("Uploading package" in ln for ln in ray_info_lines(res.stderr)), res.stderr
    status = shpeft("status", sid, "--address", url, "--wait", "--poll", "1", timeout=600)
    assert status.returncode == 1
    lines = status.stdout.strip().splitlines()
    prefix = (f"{sid}: FAILED: `shpeft run job.yaml --address auto` could not start on the cluster: "
              "exit code 127 (command not found): ")
    assert lines[0].startswith(prefix) and "shpeft" in lines[0][len(prefix):], status.stdout  # the shell's words
    assert len(lines) == 2 and "installed on every node" in lines[1] and "on the PATH of the `ray start`" in lines[1]
    assert 'cluster/README.md, "Before you submit: shpeft on every node"' in lines[1]
    # the guide it names says so first
    guide = (ROOT / "cluster" / "README.md").read_text()
    first_section = guide.split("\n## ", 2)[1]
    assert first_section.startswith("Before you submit: shpeft on every node")
    assert "exit code 127" in first_section
    logs = shpeft("logs", sid, "--address", url)
    assert "shpeft: not found" in logs.stdout
