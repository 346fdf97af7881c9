"""The warm worker pool on a local 2-CPU Ray: processes reused across runs, lost processes retried elsewhere."""

import json
import os
import sys
import time

import pytest

ray = pytest.importorskip("ray")

from orchestrator.runtime.worker_pool import run_on_pool  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    import ray.cloudpickle

    # the run functions below live in this test module, which Ray's workers cannot import
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def where(arg):
    """Which process ran this, and whether torch was already imported when the run began."""
    warm = "torch" in sys.modules
    attempts = _count(arg["dir"], arg["key"])
    if arg.get("die_first") and attempts == 1:
        os._exit(1)  # the process dies, as a killed or OOM-killed worker would
    if arg.get("raise"):
        raise ValueError(f"run {arg['key']} failed on purpose")
    time.sleep(arg.get("sleep", 0))
    return {"key": arg["key"], "pid": os.getpid(), "warm": warm, "attempts": attempts}


def _count(folder: str, key: int) -> int:
    path = os.path.join(folder, f"{key}.json")
    n = json.loads(open(path).read()) + 1 if os.path.exists(path) else 1
    with open(path, "w") as f:
        f.write(json.dumps(n))
    return n


def _run(items, **kw):
    done, order, started = {}, [], []

    def on_done(key, get_result):
        order.append(key)
        try:
            done[key] = get_result()
        except Exception as exc:  # the run's own error, handed back
            done[key] = exc

    run_on_pool(where, items, on_start=started.append, on_done=on_done, **kw)
    return done, order, started


def test_consecutive_runs_on_a_slot_share_one_warm_process(ray_local, tmp_path):
    items = [(k, {"key": k, "dir": str(tmp_path), "sleep": 0.5}) for k in range(6)]
    done, order, started = _run(items, slots=2, resources={"CPU": 1}, max_failures=1)
    assert sorted(order) == list(range(6)) and sorted(started) == list(range(6))
    pids = [done[k]["pid"] for k in range(6)]
    # at most one process per slot ran all six runs (each run after the first on a slot reused it), and
    # torch was imported before every run began
    assert 1 <= len(set(pids)) <= 2, pids
    assert all(done[k]["warm"] and done[k]["attempts"] == 1 for k in range(6))
    assert os.getpid() not in pids
    # the actors are ended afterwards: their CPUs come back (ray.kill is asynchronous)
    deadline = time.time() + 30
    while ray.available_resources().get("CPU") != 2 and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU") == 2


def test_a_killed_worker_process_sends_its_run_to_a_fresh_one(ray_local, tmp_path):
    items = [(0, {"key": 0, "dir": str(tmp_path), "die_first": True})] + \
        [(k, {"key": k, "dir": str(tmp_path)}) for k in range(1, 4)]
    done, order, started = _run(items, slots=2, resources={"CPU": 1}, max_failures=2)
    assert sorted(order) == list(range(4))  # one result per run, the killed one included
    assert done[0]["attempts"] == 2 and started.count(0) == 2  # handed out again after its process died
    assert all(done[k]["attempts"] == 1 for k in range(1, 4))  # nothing else was run twice


def test_a_lost_process_past_max_failures_fails_only_its_run(ray_local, tmp_path):
    items = [(0, {"key": 0, "dir": str(tmp_path), "die_first": True}), (1, {"key": 1, "dir": str(tmp_path)})]
    done, order, _ = _run(items, slots=2, resources={"CPU": 1}, max_failures=0)
    assert isinstance(done[0], ray.exceptions.RayActorError)
    assert done[1]["attempts"] == 1


def test_a_python_error_is_not_retried_and_the_process_is_kept(ray_local, tmp_path):
    items = [(0, {"key": 0, "dir": str(tmp_path), "raise": True})] + \
        [(k, {"key": k, "dir": str(tmp_path)}) for k in range(1, 3)]
    done, order, _ = _run(items, slots=1, resources={"CPU": 1}, max_failures=2)
    assert isinstance(done[0], ValueError) and "failed on purpose" in str(done[0])
    assert json.loads(open(tmp_path / "0.json").read()) == 1  # run once only
    assert done[1]["pid"] == done[2]["pid"]  # the same process carried on


def test_one_pool_serves_stage_after_stage_in_the_same_processes(ray_local, tmp_path):
    """As a job uses it: the importance stage's runs, then the training stage's, on the same actors."""
    from orchestrator.runtime.worker_pool import WorkerPool

    first, second = {}, {}
    with WorkerPool(2, {"CPU": 1}) as pool:
        pool.run(where, [(k, {"key": k, "dir": str(tmp_path), "sleep": 0.3}) for k in range(4)], max_failures=1,
                 on_done=lambda k, get: first.__setitem__(k, get()))
        pool.run(where, [(k, {"key": k, "dir": str(tmp_path)}) for k in range(4, 8)], max_failures=1,
                 on_done=lambda k, get: second.__setitem__(k, get()), keep=False)
    assert sorted(first) == [0, 1, 2, 3] and sorted(second) == [4, 5, 6, 7]
    # Which actor takes which run is up to the scheduler; what holds is that both stages ran in the pool's
    # two processes only: the second stage started none of its own.
    pids = {r["pid"] for r in [*first.values(), *second.values()]}
    assert 1 <= len(pids) <= 2
