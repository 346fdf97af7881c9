"""Faults on a simulated multi-node Ray cluster: a zero-CPU head (the driver's node) and two 1-CPU workers.

Killed training worker, lost node, killed driver, two drivers on one importance cache, a store that
fails a write half-way. The scenarios live in bench/faults.py (which prints them as tables); here
each one's details are checked.
"""

import os
import sys
from pathlib import Path

import pytest
ray = pytest.importorskip("ray")

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from bench import faults  # noqa: E402
from shpeft_core.io import verify_file  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.cluster]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("cluster"))
    cluster = faults.start_cluster(workers=2, cpus=1)
    try:
        faults.connect(cluster)
        yield faults.Context(cluster, work, faults.write_backbone(os.path.join(work, "backbone.safetensors")))
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def cluster_ctx(ctx):
    faults.ensure_workers(ctx.cluster)
    return ctx


@pytest.fixture(scope="module")
def spread(ctx):
    faults.ensure_workers(ctx.cluster)
    return faults.spread(ctx)


@pytest.fixture(scope="module")
def worker_killed(ctx, spread):
    faults.ensure_workers(ctx.cluster)
    return faults.worker_kill(ctx, spread)


@pytest.fixture(scope="module")
def concurrent(ctx, spread):
    faults.ensure_workers(ctx.cluster)
    return faults.concurrent_cache(ctx, spread)


def test_job_runs_on_the_worker_nodes_only(spread):
    d = spread.details
    assert d["result"].exit_code == 0, d["rows"]
    where = {t: (r["node"], r["started_at"], r["finished_at"], r["train_s"]) for t, r in d["rows"].items()}
    # nothing trains on the zero-CPU head; which worker node takes which task (or all of them, on a loaded
    # machine where one node's worker starts late) is the scheduler's choice, not asserted
    nodes = {r["node"] for r in d["rows"].values()}
    assert nodes and nodes <= d["worker_nodes"], where


def test_killed_worker_resumes_and_ends_with_an_unbroken_runs_delta(worker_killed):
    d = worker_killed.details
    assert d["result"].exit_code == 0, d["rows"]
    rows = d["rows"]
    faulted = d["specs"][0].name
    assert rows[faulted]["status"] == "ok" and rows[faulted]["resumed_from_epoch"] == 0
    assert all(r["resumed_from_epoch"] is None for t, r in rows.items() if t != faulted)
    # bit-equal tensors (indices, values, head) to the run that was never interrupted
    assert d["equal_to_unbroken"] == {t: True for t in rows}


def test_two_drivers_share_the_importance_cache(concurrent):
    d = concurrent.details
    assert d["codes"] == {"full": 0, "short": 0}, d["logs"]
    for rows in d["rows"].values():
        assert len(rows) == 3 and all(faults.artifact_ok(r) for r in rows.values()), rows
    # 3 dataset maps + 3 leave-one-out pool maps, each complete and matching its recorded sha256
    assert len(d["entries"]) == 6 and all(v is None for v in d["entries"].values()), d["entries"]
    assert d["tmp"] == []
    # each dataset map was computed by one driver or by both (then written twice, each write atomic)
    assert set(d["computed"]) == {s.name for s in d["specs"]}
    assert all(1 <= n <= 2 for n in d["computed"].values()), d["computed"]


def test_lost_node_moves_its_task_and_redoes_nothing(cluster_ctx):
    out = faults.node_removal(cluster_ctx)
    d, s = out.details, out.details["state"]
    assert s, "the long task finished before the node could be removed"
    assert d["result"].exit_code == 0, d["rows"]
    rows = d["rows"]
    short, long_ = rows[d["short"]], rows[d["long"]]
    # the long task was on the lost node; it finished on the other one, from its last checkpoint
    assert short["node"] != s["victim"] and long_["node"] != s["victim"]
    assert long_["resumed_from_epoch"] is not None and long_["resumed_from_epoch"] >= s["checkpoint"] - 1
    assert all(r["node"] != s["victim"] for t, r in rows.items() if t != d["long"])
    # the task finished before the loss was not trained again: its row and artifact are the ones from before
    assert out.redone == 0 and d["short"] in s["finished"]
    assert short["resumed_from_epoch"] is None
    assert out.verified == 3 and out.lost == 0


def test_killed_driver_leaves_no_processes_and_a_rerun_redoes_nothing(cluster_ctx):
    out = faults.driver_kill(cluster_ctx)
    d = out.details
    assert d["killed"], "the job finished before its driver could be killed"
    assert d["ray_job"] and d["dead_job"].get("IsDead"), d["dead_job"]
    assert d["leftovers"] == [], d["leftovers"]
    rows = d["rows"]
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert d["at_kill"] and out.redone == 0
    for task, row in rows.items():
        if task in d["at_kill"]:
            assert row["trained"] is False and row["sha256"] == d["at_kill"][task]["sha256"]
        else:
            assert row["trained"] is True
            # resumed after its newest checkpoint where the killed run left one
            expected = d["checkpoints"][task] - 1 if task in d["checkpoints"] else None
            assert row["resumed_from_epoch"] == expected, (task, d["checkpoints"])
    mine = [r for r in d["catalogue"] if r["job_id"] == d["job_id"]]
    assert sorted(r["task"] for r in mine) == sorted(rows)  # exactly one row per task
    assert out.verified == 3 and out.lost == 0


def test_store_write_failure_leaves_no_partial_file_and_reports_the_cause(cluster_ctx):
    out = faults.store_write_failure(cluster_ctx)
    d = out.details
    failed_task = d["failed_task"]
    assert d["counts"].get("failed") and len(d["counts"]["failed"]) == 1, d["counts"]
    first = d["first"]
    assert first[failed_task]["status"] == "failed"
    assert "injected write failure" in first[failed_task]["error"], first[failed_task]
    # nothing under the artifact's final name, and no temporary file left behind
    assert d["final_after_failure"] == {failed_task: False}
    assert d["tmp_after_failure"] == [] and d["tmp_after_rerun"] == []
    ok = [t for t, r in first.items() if r["status"] == "ok"]
    assert ok and all(faults.artifact_ok(first[t]) for t in ok)
    # the rerun trains only the failed task, from its final checkpoint, and everything verifies
    rows = d["rows"]
    assert rows[failed_task]["status"] == "ok" and rows[failed_task]["trained"] is True
    assert rows[failed_task]["resumed_from_epoch"] == 1
    assert all(rows[t]["trained"] is False for t in ok) and out.redone == 0
    assert out.verified == 2 and out.lost == 0
    for p in (d["store_dir"] + "/importance",):
        for name in os.listdir(p):
            if name.endswith(".safetensors"):
                assert verify_file(os.path.join(p, name)) is None
