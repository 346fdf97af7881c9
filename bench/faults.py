"""Fault scenarios on a simulated multi-node Ray cluster (one machine): what survives, what is redone.

Each scenario runs small jobs (test_vit at 32 px, a few dozen images per task) on a
``ray.cluster_utils.Cluster`` of a zero-CPU head and worker nodes, injects one fault and reports how
many tasks completed, how many finished tasks were trained again ("redone"), how many artifacts
verify against their recorded sha256 and how many finished artifacts were lost. The test module
``tests/orchestrator/runtime/test_runtime_faults.py`` runs the same scenarios and asserts on their details.

    python bench/faults.py [--only NAME ...]

Prints one table per scenario and, last, one JSON line {"scenarios": {NAME: {...}}}.
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

for _var, _value in (("HF_HUB_OFFLINE", "1"), ("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0"),
                     ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"), ("OMP_NUM_THREADS", "1")):
    os.environ.setdefault(_var, _value)

from fsspec.implementations.local import LocalFileSystem  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKBONE = {"name": "test_vit", "kwargs": {"img_size": 32, "patch_size": 8}}
SCENARIOS = ("spread", "worker_kill", "concurrent_cache", "node_removal", "driver_kill", "store_write_failure")


# ---------------------------------------------------------------- a store that fails chosen writes


class FlakyFileSystem(LocalFileSystem):
    """Local files under ``flaky://``; the Nth write whose path matches a rule fails half-way.

    Rules come from ``SHPEFT_FLAKY_RULES`` (JSON list of {"pattern": regex, "fail_on": [N, ...]}) and
    are counted across processes in ``SHPEFT_FLAKY_COUNTS`` (a JSON file, updated under a lock), so
    the Nth matching write anywhere on the (one-machine) cluster is the one that fails.
    """

    protocol = ("flaky",)
    root_marker = "/"

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith("flaky://"):
            path = path[len("flaky://"):]
        return super()._strip_protocol(path)

    def unstrip_protocol(self, name: str) -> str:
        return "flaky://" + self._strip_protocol(name)

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode=mode, **kwargs)
        if "w" in mode and _should_fail(self._strip_protocol(path)):
            return _HalfWriter(f, path)
        return f


class _HalfWriter:
    """Writes half of the first buffer it gets, then raises (a connection or disk lost mid-write)."""

    def __init__(self, f, path: str):
        self._f, self._path = f, path

    def write(self, data) -> int:
        self._f.write(bytes(data)[: max(1, len(data) // 2)])
        self._f.flush()
        raise OSError(f"injected write failure after {len(data) // 2} of {len(data)} bytes: {self._path}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def _should_fail(path: str) -> bool:
    rules = json.loads(os.environ.get("SHPEFT_FLAKY_RULES") or "[]")
    counts_path = os.environ.get("SHPEFT_FLAKY_COUNTS")
    matching = [i for i, r in enumerate(rules) if re.search(r["pattern"], path)]
    if not matching or not counts_path:
        return False
    with open(counts_path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        counts = json.loads(open(counts_path).read()) if os.path.exists(counts_path) else {}
        fail = False
        for i in matching:
            n = counts.get(str(i), 0) + 1
            counts[str(i)] = n
            fail = fail or n in rules[i]["fail_on"]
        if fail:
            counts.setdefault("failed", []).append(path)
        with open(counts_path, "w") as f:
            f.write(json.dumps(counts))
    return fail


def register_flaky_filesystem() -> None:
    """Make ``flaky://`` known to fsspec in this process (the driver, and each worker via its setup hook)."""
    import fsspec

    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


def hold_after_first_checkpoint() -> None:
    """Worker setup hook (node_removal): the task named in SHPEFT_BENCH_HOLD waits up to a minute after its
    first checkpoint, once (a marker file records it), so its node is removed while it still has epochs to
    run, however loaded the machine; the attempt that resumes on another node runs straight through."""
    import shpeft_core.train as train

    task, marker = os.environ["SHPEFT_BENCH_HOLD"].split(os.pathsep, 1)
    save = train.save_train_state

    def save_then_hold(state, dir_or_uri):
        out = save(state, dir_or_uri)
        if f"-{task}-" in str(dir_or_uri) and not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(60)
        return out

    train.save_train_state = save_then_hold


# ---------------------------------------------------------------- data, jobs, cluster


def write_backbone(path: str) -> str:
    import safetensors.torch
    import timm
    import torch

    torch.manual_seed(123)
    model = timm.create_model(BACKBONE["name"], num_classes=7, **BACKBONE["kwargs"])
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def colour_task(root: str, name: str, seed: int, n_train: int = 40, n_eval: int = 12):
    """A 3-class imagefolder task (class = dominant colour + noise), ``n_train`` training images."""
    from tasks.synthetic import write_colour_task

    return write_colour_task(root, name, seed, n_train=n_train, n_eval=n_eval)


def job_dict(store: str, specs, backbone_source: str, *, epochs: int = 2, **training) -> dict:
    return {
        "backbone": {**BACKBONE, "source": backbone_source},
        "store": store,
        "tasks": [s.model_dump(mode="json") for s in specs],
        "importance": {"batches": 2, "batch_size": 16},
        "selection": {"density": 0.02, "alpha": 0.5},
        "training": {"epochs": epochs, "batch_size": 16, "lr": 3e-3, "warmup_epochs": 0, "max_failures": 2,
                     **training},
    }


def start_cluster(workers: int = 2, cpus: int = 1):
    """A zero-CPU head (the driver's node: launchers and the progress actor) plus ``workers`` nodes."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(workers):
        cluster.add_node(num_cpus=cpus)
    cluster.wait_for_nodes()
    return cluster


def worker_node_ids(cluster) -> set[str]:
    return {n.node_id for n in cluster.worker_nodes}


def connect(cluster, **kwargs) -> None:
    import logging

    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR, **kwargs)


def hold_ray_messages() -> list[str]:
    """Ray prints its own notices about the workers and nodes the scenarios kill on purpose ("A worker died
    ...", "Raylet is terminated ...") on the driver's console, whatever log_to_driver says; they are kept
    in the returned list instead. Ray has no public switch for them, so its printer is replaced."""
    import ray._private.worker as ray_worker

    held: list[str] = []
    ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: held.extend(data.get("lines", []))
    return held


def ensure_workers(cluster, workers: int = 2, cpus: int = 1) -> None:
    while len(cluster.worker_nodes) < workers:
        cluster.add_node(num_cpus=cpus)
    cluster.wait_for_nodes()


@dataclass
class Context:
    cluster: Any
    work: str
    backbone: str
    _n: int = 0

    def folder(self, name: str) -> str:
        self._n += 1
        path = os.path.join(self.work, f"{self._n:02d}-{name}")
        os.makedirs(path)
        return path

    def tasks(self, root: str, sizes: dict[str, int]):
        return [colour_task(root, name, seed=i, n_train=n) for i, (name, n) in enumerate(sizes.items())]


@dataclass
class Outcome:
    """What one scenario did; ``summary()`` is its table row / JSON entry."""

    name: str
    faults: str
    tasks: int
    completed: int = 0
    redone: int = 0
    verified: int = 0
    lost: int = 0
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def count(self, rows) -> None:
        """Completed, verified and lost, from the rows of a job with one row per task."""
        rows = list(rows)
        self.completed = sum(r["status"] == "ok" for r in rows)
        self.verified = sum(artifact_ok(r) for r in rows)
        self.lost = self.tasks - self.verified

    def summary(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "completed": self.completed, "redone": self.redone, "verified": self.verified,
                "lost": self.lost}


# ---------------------------------------------------------------- inspection helpers


def artifact_ok(row: dict) -> bool:
    from shpeft_core.io import exists, sha256_file

    return row.get("status") == "ok" and bool(row.get("delta_uri")) and exists(row["delta_uri"]) \
        and sha256_file(row["delta_uri"]) == row.get("sha256")


def temp_leftovers(store_dir: str) -> list[str]:
    """Files a write left under a temporary name (an interrupted atomic write that was not cleaned up)."""
    return sorted(glob.glob(os.path.join(store_dir, "**", "*.tmp-*"), recursive=True))


def checkpoints(store_dir: str, job_id: str) -> dict[str, int]:
    """task -> newest complete checkpoint epoch (state.json written) in the job's run folders."""
    out: dict[str, int] = {}
    for state in glob.glob(os.path.join(store_dir, "runs", f"{job_id}-*", "checkpoints", "epoch-*", "state.json")):
        run = state.split(os.sep)[-4]
        task = run[len(job_id) + 1:].rsplit("-", 1)[0]
        out[task] = max(out.get(task, 0), int(state.split(os.sep)[-2].split("-")[1]))
    return out


def catalogue_rows(store: str, job_id: str) -> dict[str, dict]:
    from orchestrator.store.results import latest_rows

    try:
        return latest_rows(store, job_id)
    except Exception:  # not written yet, or being replaced
        return {}


def importance_entries(store_dir: str) -> dict[str, str | None]:
    from shpeft_core.io import verify_file

    return {os.path.basename(p): verify_file(p) for p in
            sorted(glob.glob(os.path.join(store_dir, "importance", "*.safetensors")))}


def processes_of_ray_job(ray_job_id: str) -> list[dict]:
    """Live processes started for ``ray_job_id`` (Ray gives every worker of a job RAY_JOB_ID in its env)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "name"]):
        try:
            if p.environ().get("RAY_JOB_ID") == ray_job_id and p.status() != psutil.STATUS_ZOMBIE:
                found.append({"pid": p.pid, "cmdline": " ".join(p.cmdline())[:120]})
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def ray_job_of_driver(pid: int) -> str | None:
    import ray

    for j in ray._private.state.jobs():
        if int(j.get("DriverPid") or -1) == pid:
            return j["JobID"]
    return None


def driver_command(job_path: str, address: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from orchestrator.cli.main import main; sys.exit(main())",
            "run", job_path, "--address", address]


def write_job_file(folder: str, doc: dict) -> str:
    path = os.path.join(folder, "job.yaml")
    with open(path, "w") as f:
        f.write(json.dumps(doc, indent=1))  # JSON is YAML
    return path


# ---------------------------------------------------------------- scenarios


def spread(ctx: Context) -> Outcome:
    """3 tasks, no fault: the first two train at once, one per 1-CPU worker node (the unbroken reference)."""
    from orchestrator.job.load import parse_job
    from orchestrator.workflows.run import run_job

    root = ctx.folder("spread")
    specs = ctx.tasks(root, {"wk-a": 40, "wk-b": 40, "wk-c": 40})
    job = parse_job(job_dict(os.path.join(root, "store"), specs, ctx.backbone))
    t0 = time.perf_counter()
    result = run_job(job, progress=False)
    rows = {r["task"]: r for r in result.rows}
    out = Outcome("spread", "none (3 tasks, 2 worker nodes)", tasks=len(specs), seconds=time.perf_counter() - t0)
    out.count(rows.values())
    out.details = {"job": job, "result": result, "rows": rows, "specs": specs,
                   "worker_nodes": worker_node_ids(ctx.cluster)}
    return out


def same_delta(a_uri: str, b_uri: str) -> bool:
    import torch

    from shpeft_core.delta import load_delta

    a, b = load_delta(a_uri), load_delta(b_uri)
    return a.indices.keys() == b.indices.keys() and a.head.keys() == b.head.keys() \
        and all(torch.equal(a.indices[n], b.indices[n]) and torch.equal(a.values[n], b.values[n]) for n in a.indices) \
        and all(torch.equal(a.head[n], b.head[n]) for n in a.head)


def worker_kill(ctx: Context, reference: Outcome | None = None) -> Outcome:
    """The reference job again (new store); the first task's worker process is killed at the end of its last
    epoch, before it checkpoints. Its delta is compared with the unbroken reference run's."""
    from orchestrator.job.load import parse_job
    from orchestrator.workflows.run import run_job

    root = ctx.folder("worker-kill")
    specs = reference.details["specs"] if reference else ctx.tasks(root, {"wk-a": 40, "wk-b": 40, "wk-c": 40})
    job = parse_job(job_dict(os.path.join(root, "store"), specs, ctx.backbone))
    t0 = time.perf_counter()
    os.environ["SHPEFT_FAULT_INJECT"] = f"{specs[0].name}:1"
    try:
        result = run_job(job, progress=False)
    finally:
        del os.environ["SHPEFT_FAULT_INJECT"]
    rows = {r["task"]: r for r in result.rows}
    out = Outcome("worker_kill", "worker process killed (task wk-a, end of epoch 2)", tasks=len(specs),
                  seconds=time.perf_counter() - t0)
    out.count(rows.values())
    equal = None
    if reference:
        ref = reference.details["rows"]
        equal = {t: r["status"] == "ok" and same_delta(r["delta_uri"], ref[t]["delta_uri"]) for t, r in rows.items()}
    out.details = {"job": job, "result": result, "rows": rows, "specs": specs, "equal_to_unbroken": equal}
    return out


def concurrent_cache(ctx: Context, reference: Outcome | None = None) -> Outcome:
    """Two drivers at once on one store, same datasets (so the same importance cache entries)."""
    from orchestrator.job.keys import job_id
    from orchestrator.job.load import parse_job

    root = ctx.folder("concurrent")
    specs = reference.details["specs"] if reference else ctx.tasks(root, {"wk-a": 40, "wk-b": 40, "wk-c": 40})
    store = os.path.join(root, "store")
    docs = {"full": job_dict(store, specs, ctx.backbone), "short": job_dict(store, specs, ctx.backbone, epochs=1)}
    procs, logs = {}, {}
    t0 = time.perf_counter()
    for name, doc in docs.items():
        folder = os.path.join(root, name)
        os.makedirs(folder)
        logs[name] = os.path.join(folder, "driver.log")
        with open(logs[name], "w") as log:
            procs[name] = subprocess.Popen(driver_command(write_job_file(folder, doc), ctx.cluster.address),
                                           stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    codes = {name: p.wait(timeout=600) for name, p in procs.items()}
    seconds = time.perf_counter() - t0
    computed: dict[str, int] = {}
    for name, path in logs.items():
        for line in open(path).read().splitlines():
            m = re.match(r"importance (\S+) \((\w+)\): computed", line)
            if m:
                computed[m.group(1)] = computed.get(m.group(1), 0) + 1
    jobs = {name: parse_job(doc) for name, doc in docs.items()}
    rows = {name: catalogue_rows(store, job_id(j)) for name, j in jobs.items()}
    entries = importance_entries(store)
    out = Outcome("concurrent_cache", "2 drivers share the importance cache", tasks=2 * len(specs),
                  seconds=seconds)
    out.completed = sum(r["status"] == "ok" for rs in rows.values() for r in rs.values())
    out.verified = sum(artifact_ok(r) for rs in rows.values() for r in rs.values()) \
        + sum(v is None for v in entries.values())
    out.lost = 2 * len(specs) - sum(artifact_ok(r) for rs in rows.values() for r in rs.values()) \
        + sum(v is not None for v in entries.values())
    out.details = {"codes": codes, "logs": {n: open(p).read() for n, p in logs.items()}, "rows": rows,
                   "jobs": jobs, "entries": entries, "computed": computed, "tmp": temp_leftovers(store),
                   "store": store, "specs": specs}
    return out


def node_removal(ctx: Context) -> Outcome:
    """A worker node is lost while a long task trains on it, after a short task finished on the other one."""
    from orchestrator.job.keys import job_id
    from orchestrator.job.load import parse_job
    from orchestrator.workflows.run import run_job

    root = ctx.folder("node-removal")
    specs = ctx.tasks(root, {"nr-short": 24, "nr-long": 360, "nr-next": 24})
    store = os.path.join(root, "store")
    job = parse_job(job_dict(store, specs, ctx.backbone, epochs=3))
    jid = job_id(job)
    short, long_ = specs[0].name, specs[1].name
    state: dict[str, Any] = {}
    stop = threading.Event()

    def remover():
        while not stop.is_set():
            rows = catalogue_rows(store, jid)
            ckpt = checkpoints(store, jid).get(long_, 0)
            if rows.get(short, {}).get("status") == "ok" and ckpt >= 1 and long_ not in rows:
                victim = next(n for n in ctx.cluster.worker_nodes if n.node_id != rows[short]["node"])
                state.update(victim=victim.node_id, checkpoint=ckpt, at=time.time(),
                             finished={t: r for t, r in rows.items() if r.get("status") == "ok"},
                             mtimes={t: os.path.getmtime(r["delta_uri"]) for t, r in rows.items()
                                     if r.get("status") == "ok"})
                ctx.cluster.remove_node(victim, allow_graceful=False)
                state["removed_s"] = time.time() - state["at"]
                return
            time.sleep(0.1)

    thread = threading.Thread(target=remover, daemon=True)
    hold = {"SHPEFT_BENCH_HOLD": f"{long_}{os.pathsep}{os.path.join(root, 'held')}",
            "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    t0 = time.perf_counter()
    thread.start()
    try:
        connect(ctx.cluster, runtime_env={"worker_process_setup_hook": hold_after_first_checkpoint, "env_vars": hold})
        result = run_job(job, progress=False)
    finally:
        stop.set()
        thread.join(timeout=60)
        connect(ctx.cluster)
    seconds = time.perf_counter() - t0
    rows = {r["task"]: r for r in result.rows}
    out = Outcome("node_removal", "worker node removed mid-training" if state else "NOT INJECTED (timing)",
                  tasks=len(specs), seconds=seconds)
    out.count(rows.values())
    out.redone = sum(1 for t in state.get("finished", {})
                     if rows[t].get("started_at") != state["finished"][t].get("started_at")
                     or os.path.getmtime(rows[t]["delta_uri"]) != state["mtimes"][t])
    out.details = {"rows": rows, "state": state, "result": result, "short": short, "long": long_,
                   "remaining": worker_node_ids(ctx.cluster), "job": job}
    ensure_workers(ctx.cluster)
    return out


def driver_kill(ctx: Context) -> Outcome:
    """`shpeft run` is SIGKILLed after its first task finished; the same job is then run again."""
    import ray

    from orchestrator.job.keys import job_id

    from orchestrator.job.load import parse_job
    from orchestrator.workflows.run import run_job

    root = ctx.folder("driver-kill")
    specs = ctx.tasks(root, {"dk-short": 24, "dk-long": 240, "dk-next": 40})
    store = os.path.join(root, "store")
    doc = job_dict(store, specs, ctx.backbone, epochs=3)
    job = parse_job(doc)
    jid = job_id(job)
    log_path = os.path.join(root, "driver.log")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(driver_command(write_job_file(root, doc), ctx.cluster.address), stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO)
    ray_job = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        ray_job = ray_job or ray_job_of_driver(proc.pid)
        if any(r.get("status") == "ok" for r in catalogue_rows(store, jid).values()):
            break
        time.sleep(0.1)
    killed = proc.poll() is None
    ray_job = ray_job or ray_job_of_driver(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = {t: dict(r) for t, r in catalogue_rows(store, jid).items() if r.get("status") == "ok"}
    mtimes = {t: os.path.getmtime(r["delta_uri"]) for t, r in at_kill.items()}
    # Ray ends a dead driver's workers (and the tasks they run); wait for them, then look again.
    leftovers = processes_of_ray_job(ray_job) if ray_job else []
    wait_deadline = time.time() + 60
    while leftovers and time.time() < wait_deadline:
        time.sleep(0.5)
        leftovers = processes_of_ray_job(ray_job)
    gone_after = time.perf_counter() - t0
    ckpt = checkpoints(store, jid)
    dead_job = next((j for j in ray._private.state.jobs() if j["JobID"] == ray_job), {})
    result = run_job(job, progress=False)
    seconds = time.perf_counter() - t0
    rows = {r["task"]: r for r in result.rows}
    out = Outcome("driver_kill", "driver SIGKILLed after its first task" if killed else "NOT INJECTED (finished)",
                  tasks=len(specs), seconds=seconds)
    out.count(rows.values())
    out.redone = sum(1 for t in at_kill if rows[t].get("trained") or os.path.getmtime(rows[t]["delta_uri"]) != mtimes[t])
    out.details = {"rows": rows, "at_kill": at_kill, "checkpoints": ckpt, "leftovers": leftovers,
                   "ray_job": ray_job, "dead_job": dead_job, "killed": killed, "seconds_to_clean": gone_after,
                   "catalogue": read_all(store), "job_id": jid, "log": open(log_path).read(), "store": store}
    return out


def read_all(store: str) -> list[dict]:
    from orchestrator.store.results import read_catalogue

    return read_catalogue(store).to_pylist()


def store_write_failure(ctx: Context) -> Outcome:
    """The store fails the first write of one task's delta half-way (in the training worker); rerun after."""
    from orchestrator.job.keys import job_id
    from orchestrator.job.load import parse_job
    from orchestrator.workflows.run import run_job

    root = ctx.folder("flaky-store")
    specs = ctx.tasks(root, {"fs-a": 40, "fs-b": 40})
    store_dir = os.path.join(root, "store")
    rules = [{"pattern": rf"/deltas/{specs[1].name}/[^/]*\.safetensors\.tmp-", "fail_on": [1]}]
    env = {"SHPEFT_FLAKY_RULES": json.dumps(rules), "SHPEFT_FLAKY_COUNTS": os.path.join(root, "counts.json")}
    os.environ.update(env)
    # workers import this module (bench.faults) for their setup hook
    worker_env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    register_flaky_filesystem()
    job = parse_job(job_dict("flaky://" + store_dir, specs, ctx.backbone))
    jid = job_id(job)
    t0 = time.perf_counter()
    try:
        # Workers are other processes: each registers flaky:// in its setup hook, with the rules in its env.
        connect(ctx.cluster, runtime_env={"worker_process_setup_hook": register_flaky_filesystem,
                                          "env_vars": worker_env})
        first = run_job(job, progress=False)
        tmp_after_failure = temp_leftovers(store_dir)
        first_rows = {r["task"]: r for r in first.rows}
        # a failed task's artifact must not exist, not even half of it, under its final name
        final_after_failure = {t: os.path.exists(r["delta_uri"].replace("flaky://", ""))
                               for t, r in first_rows.items() if r["status"] != "ok"}
        finished = {t: os.path.getmtime(r["delta_uri"].replace("flaky://", "")) for t, r in first_rows.items()
                    if r["status"] == "ok"}
        second = run_job(job, progress=False)
    finally:
        for k in env:
            os.environ.pop(k, None)
        connect(ctx.cluster)
    seconds = time.perf_counter() - t0
    rows = {r["task"]: r for r in second.rows}
    counts = json.loads(open(env["SHPEFT_FLAKY_COUNTS"]).read()) if os.path.exists(env["SHPEFT_FLAKY_COUNTS"]) else {}
    out = Outcome("store_write_failure", "1 store write failed half-way (fs-b's delta)", tasks=len(specs),
                  seconds=seconds)
    out.count(rows.values())
    out.redone = sum(1 for t in finished if rows[t].get("trained"))
    out.details = {"first": first_rows, "rows": rows, "counts": counts, "tmp_after_failure": tmp_after_failure,
                   "final_after_failure": final_after_failure,
                   "tmp_after_rerun": temp_leftovers(store_dir), "store_dir": store_dir, "job_id": jid,
                   "failed_task": specs[1].name, "finished": finished}
    return out


RUNNERS = {"spread": spread, "worker_kill": worker_kill, "concurrent_cache": concurrent_cache, "node_removal": node_removal,
           "driver_kill": driver_kill, "store_write_failure": store_write_failure}


# ---------------------------------------------------------------- report


def print_table(out: Outcome) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{out.name} ({out.seconds:.0f}s)")
    for col in ("tasks", "faults injected", "tasks completed", "tasks redone", "artifacts verified",
                "artifacts lost"):
        table.add_column(col)
    table.add_row(str(out.tasks), out.faults, str(out.completed), str(out.redone), str(out.verified), str(out.lost))
    Console(width=120).print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=SCENARIOS, help="run only these scenarios")
    args = ap.parse_args()
    sys.path.insert(0, REPO)

    import ray

    work = tempfile.mkdtemp(prefix="shpeft-bench-faults-")
    cluster = None
    results: dict[str, Outcome] = {}
    held = hold_ray_messages()
    try:
        cluster = start_cluster()
        connect(cluster)
        ctx = Context(cluster, work, write_backbone(os.path.join(work, "backbone.safetensors")))
        for name in args.only or SCENARIOS:
            ensure_workers(cluster)
            try:
                ref = results.get("spread") if name in ("worker_kill", "concurrent_cache") else None
                results[name] = RUNNERS[name](ctx, ref) if ref and ref.details else RUNNERS[name](ctx)
            except Exception as exc:  # report and carry on with the other scenarios
                results[name] = Outcome(name, f"scenario error: {type(exc).__name__}: {exc}"[:100], tasks=0)
            print_table(results[name])
        if held:
            print(f"Ray's own notices about the killed workers and nodes ({len(held)}) are not shown.")
        print(json.dumps({"scenarios": {n: o.summary() for n, o in results.items()}}))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    # Run as bench.faults, not __main__: worker setup hooks are exported by reference to this module.
    sys.path.insert(0, REPO)
    from bench.faults import main as _main

    _main()
