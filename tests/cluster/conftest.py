"""One real Ray cluster for the tests of this folder (head with no CPUs + two 1-CPU worker nodes), and the job
every end-to-end test starts from: two small tasks, submitted with `shpeft submit` and waited for.

The cluster starts when the first test here needs it and stops as soon as the last test of this
folder has run (not at the end of the whole session, so the rest of the suite does not share the
machine with it); a later test of this folder, if the run order interleaves folders, starts a new
one. Stopping it stops each node by its own PID and fails that test's teardown if any process had
to be killed afterwards. Everything derived from a cluster (the submitted job) goes with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers_cluster import ClusterStartError, RayCluster, faults, shpeft, submission_id, write_json

WORKERS = 2
HERE = Path(__file__).resolve().parent
_live: dict = {}  # "cluster": the running RayCluster; "two_task_job": its Submitted job (or what failed)


def _start_cluster() -> RayCluster:
    pytest.importorskip("aiohttp", reason="`ray start` with a dashboard needs ray[default]")
    cluster = RayCluster()
    try:
        cluster.start_head(num_cpus=0)
        cluster.add_workers(WORKERS, num_cpus=1)
    except BaseException as exc:  # an interrupted start leaves nothing behind either
        cluster.shutdown()
        cluster.remove_temp_dir()
        if isinstance(exc, ClusterStartError):
            pytest.fail(f"the test cluster did not start: {exc}")
        raise
    return cluster


def _stop_cluster() -> None:
    cluster = _live.pop("cluster", None)
    _live.clear()
    if not isinstance(cluster, RayCluster):
        return
    try:
        forced = cluster.shutdown()
    finally:
        cluster.remove_temp_dir()
    assert not forced, f"processes of the test cluster outlived its nodes' stop and were killed: {forced}"


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    if nextitem is None or HERE not in Path(nextitem.path).resolve().parents:
        _stop_cluster()


def pytest_sessionfinish(session, exitstatus):
    try:  # an interrupted run: never leave the cluster behind
        _stop_cluster()
    except AssertionError as exc:
        print(f"\n{exc}")


def _once(key: str, make):
    """``make()`` once per cluster; a failure is kept and raised again, not retried by every test."""
    if key not in _live:
        try:
            _live[key] = make()
        except BaseException as exc:
            _live[key] = exc
            raise
    if isinstance(_live[key], BaseException):
        raise _live[key]
    return _live[key]


@pytest.fixture
def ray_cluster() -> RayCluster:
    return _once("cluster", _start_cluster)


@pytest.fixture
def two_workers(ray_cluster):
    """The cluster with its two worker nodes (a test before may have lost one)."""
    missing = WORKERS - len(ray_cluster.workers)
    if missing > 0:
        ray_cluster.add_workers(missing, num_cpus=1)
    return ray_cluster


@dataclass
class Submitted:
    root: Path
    job_path: Path
    job: dict
    job_id: str
    store: str
    sid: str
    submit: object  # subprocess.CompletedProcess of `shpeft submit`
    follow: object  # of `shpeft logs --follow`, run until the job ended
    status: object  # of `shpeft status --wait`


@pytest.fixture(scope="session")
def cluster_data(tmp_path_factory):
    """A seeded test_vit backbone file and two 3-class colour tasks (24 training images each)."""
    root = tmp_path_factory.mktemp("cluster-data")
    backbone = faults.write_backbone(str(root / "backbone.safetensors"))
    specs = [faults.colour_task(str(root), name, seed=i, n_train=24) for i, name in enumerate(("ca", "cb"))]
    return root, backbone, specs


@pytest.fixture
def two_task_job(ray_cluster, cluster_data):
    """A two-task job submitted as a user would (with RAY_ADDRESS pointing elsewhere, which --address must
    beat), its logs followed until it ended, then `status --wait`; once per cluster."""
    return _once("two_task_job", lambda: _submit_two_task_job(ray_cluster, cluster_data))


def _submit_two_task_job(ray_cluster, cluster_data) -> Submitted:
    from orchestrator.job.keys import job_id
    from orchestrator.job.load import parse_job

    data_root, backbone, specs = cluster_data
    root = data_root / f"run-{ray_cluster.gcs_port}"
    root.mkdir()
    store = str(root / "store")
    doc = faults.job_dict(store, specs, backbone, epochs=2)
    job_path = Path(write_json(str(root / "job.yaml"), doc))
    url = ray_cluster.dashboard_url
    sub = shpeft("submit", job_path, "--address", url, "--submission-id", "shpeft-two-tasks", "--env",
                 "SHPEFT_TEST_MARK=two-tasks", env={"RAY_ADDRESS": "http://198.51.100.1:8265"})
    sid = submission_id(sub)
    follow = shpeft("logs", sid, "--address", url, "--follow", timeout=900)
    status = shpeft("status", sid, "--address", url, "--wait", "--poll", "1", timeout=900)
    return Submitted(root, job_path, doc, job_id(parse_job(doc)), store, sid, sub, follow, status)
