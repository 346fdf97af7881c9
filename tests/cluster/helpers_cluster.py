"""A Ray cluster started on this machine the way users start one, for the end-to-end cluster tests.

The head is ``ray start --head --block`` (dashboard on 127.0.0.1) and each worker node is
``ray start --address GCS --block``; every node is one subprocess of the test process, in a process
group of its own, run from the ``ray`` next to the test's interpreter (the project's virtual
environment) with that environment's ``bin/`` first on PATH and this checkout first on PYTHONPATH,
so the ``shpeft`` the cluster runs is the code under test.

Invariants:
- Every port a node listens on is picked free here (GCS, dashboard, dashboard agent, client server,
  runtime-env agent, metrics, node manager, object manager, a worker-port range of its own), and the
  cluster has a temp dir of its own (``--temp-dir``), so it never collides with another Ray instance
  on the machine.
- ``ray stop`` is never run: it would stop every Ray process on the machine. A node is stopped by
  SIGTERM to its own ``ray start --block`` process (which stops the node's processes); whatever of
  the node's processes is still alive after a bounded wait gets SIGKILL, by PID. ``kill_node``
  SIGKILLs every process of the node at once: the node is lost as a machine is, with no clean-up.
- A node's processes are its ``ray start`` and every descendant (Ray's workers have process groups
  of their own, so a process group is not enough); they are listed when the node is stopped, and
  the ones still alive afterwards are killed by PID and reported.
- ``shutdown`` leaves no process behind: after the nodes it kills, by PID, any process whose command
  line names this cluster's temp dir.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

sys.path.insert(0, str(ROOT))
from bench import faults  # noqa: E402,F401  (data and job helpers shared with the fault scenarios)


class ClusterStartError(RuntimeError):
    """A node of the test cluster did not come up; the message names the node and its log file."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port_range(size: int, taken: set[int] = frozenset()) -> tuple[int, int]:
    """``size`` consecutive free ports in 20000-32000, none in ``taken``: above other Ray instances' default
    worker ports (10002-19999), below the kernel's ephemeral range (32768-)."""
    for _ in range(200):
        lo = random.randrange(20000, 32000 - size)
        if all(p not in taken and _port_free(p) for p in range(lo, lo + size)):
            return lo, lo + size - 1
    raise ClusterStartError(f"no {size} consecutive free ports between 20000 and 32000")


def ray_executable() -> str:
    found = shutil.which("ray", path=str(BIN)) or shutil.which("ray")
    if not found:
        raise ClusterStartError(f"no `ray` command next to {sys.executable} or on PATH (pip install 'ray[default]')")
    return found


def node_env() -> dict[str, str]:
    """The environment of `ray start` and of the `shpeft` commands: this interpreter's bin/ on PATH, this
    checkout on PYTHONPATH, no address variables that would point the clients elsewhere.

    Ray's memory monitor is off: it kills a node's workers when the whole machine's memory is 95% used,
    which on a machine shared with other work says nothing about these tests (the kernel still guards)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", RAY_memory_monitor_refresh_ms="0")
    return env


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: str
    node_manager_port: int
    node_id: str | None = None
    stopped: bool = False  # stopped or killed on purpose
    started: float = field(default_factory=time.time)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def processes(self) -> list:
        """The node's live processes: its `ray start` and every descendant (psutil.Process objects)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


@dataclass
class RayCluster:
    """A head (``num_cpus`` 0 by default: it runs the job drivers, as in cluster/*.yaml) and worker nodes."""

    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="shpeft-rc-", dir="/tmp"))
    object_store_bytes: int = 200 * 1024 * 1024
    nodes: list[Node] = field(default_factory=list)
    gcs_port: int = 0
    dashboard_port: int = 0
    picked: set[int] = field(default_factory=set)  # every port given to a node: none is given twice

    def pick_port(self) -> int:
        while (port := free_port()) in self.picked:
            pass
        self.picked.add(port)
        return port

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def workers(self) -> list[Node]:
        return [n for n in self.nodes[1:] if not n.stopped]

    # ---------------------------------------------------------------- start

    def _node_ports(self) -> list[str]:
        lo, hi = free_port_range(100, self.picked)
        self.picked.update(range(lo, hi + 1))
        self._nm_port = self.pick_port()
        return ["--node-manager-port", str(self._nm_port), "--object-manager-port", str(self.pick_port()),
                "--dashboard-agent-listen-port", str(self.pick_port()), "--dashboard-agent-grpc-port", str(self.pick_port()),
                "--runtime-env-agent-port", str(self.pick_port()), "--metrics-export-port", str(self.pick_port()),
                "--min-worker-port", str(lo), "--max-worker-port", str(hi)]

    def _spawn(self, name: str, args: list[str]) -> Node:
        log = os.path.join(self.temp_dir, f"{name}.log")
        with open(log, "ab") as out:
            proc = subprocess.Popen([ray_executable(), "start", "--block", "--disable-usage-stats",
                                     "--temp-dir", self.temp_dir, "--object-store-memory", str(self.object_store_bytes),
                                     *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=node_env(), cwd=self.temp_dir, start_new_session=True)
        node = Node(name, proc, log, self._nm_port)
        self.nodes.append(node)
        return node

    def start_head(self, num_cpus: int = 0, timeout: float = 180.0, attempts: int = 3) -> Node:
        def spawn() -> Node:
            self.gcs_port, self.dashboard_port = self.pick_port(), self.pick_port()
            return self._spawn("head", ["--head", "--num-cpus", str(num_cpus), "--port", str(self.gcs_port),
                                        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                                        "--ray-client-server-port", str(self.pick_port()), *self._node_ports()])

        return self._start([spawn], timeout, attempts)[0]

    def add_workers(self, count: int, num_cpus: int = 1, timeout: float = 180.0, attempts: int = 3) -> list[Node]:
        """``count`` worker nodes, started at once."""
        def spawn() -> Node:
            return self._spawn(f"worker{len(self.nodes)}", ["--address", self.gcs_address, "--num-cpus", str(num_cpus),
                                                             *self._node_ports()])

        return self._start([spawn] * count, timeout, attempts)

    def _start(self, spawns: list, timeout: float, attempts: int) -> list[Node]:
        """Start one node per callable and wait until all of them are alive. `ray start` gives a node 30 s to
        register, which a heavily loaded machine can miss: a node whose `ray start` exited is cleaned up and
        started again (fresh ports), ``attempts`` times at most."""
        started = [spawn() for spawn in spawns]
        for attempt in range(attempts):
            try:
                self.wait_for_nodes(started, timeout)
                return started
            except ClusterStartError:
                failed = [i for i, n in enumerate(started) if n.proc.poll() is not None]
                if not failed or attempt == attempts - 1:
                    raise
                for i in failed:
                    self.stop_node(started[i])
                    self.nodes.remove(started[i])
                    started[i] = spawns[i]()
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------- state

    def alive_nodes(self) -> list[dict]:
        """The cluster's live nodes as its dashboard reports them ([] while the dashboard is not up)."""
        import requests

        try:
            r = requests.get(self.dashboard_url + "/nodes?view=summary", timeout=5)
            summary = r.json()["data"]["summary"]
        except (requests.RequestException, ValueError, KeyError):
            return []
        return [n["raylet"] for n in summary if n.get("raylet", {}).get("state") == "ALIVE"]

    def wait_for_nodes(self, nodes: list[Node], timeout: float) -> None:
        """Until each of ``nodes`` is alive in the cluster (known by its node-manager port), which gives it its id."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for n in nodes:
                if n.proc.poll() is not None:
                    raise ClusterStartError(f"`ray start` of {n.name} exited with {n.proc.returncode}; see {n.log}:\n"
                                            + _tail(n.log))
            by_port = {int(r.get("nodeManagerPort", -1)): r["nodeId"] for r in self.alive_nodes()}
            for n in nodes:
                n.node_id = by_port.get(n.node_manager_port)
            if all(n.node_id for n in nodes):
                return
            time.sleep(0.5)
        raise ClusterStartError(f"{[n.name for n in nodes if not n.node_id]} not alive after {timeout:g}s; "
                                f"logs under {self.temp_dir}")

    def node_of_pid(self, pid: int) -> Node | None:
        """The node a process runs on: the node whose `ray start` it descends from."""
        import psutil

        try:
            chain = [psutil.Process(pid), *psutil.Process(pid).parents()]
        except psutil.NoSuchProcess:
            return None
        pids = {p.pid for p in chain}
        return next((n for n in self.nodes if n.pid in pids), None)

    # ---------------------------------------------------------------- stop

    def kill_node(self, node: Node, timeout: float = 60.0) -> list[int]:
        """The node is lost: SIGKILL to every one of its processes at once, no clean-up by Ray.
        Returns the PIDs killed."""
        import psutil

        node.stopped = True
        procs = node.processes()
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        node.proc.wait(timeout)
        if alive:
            raise ClusterStartError(f"processes of {node.name} still alive after SIGKILL: {[p.pid for p in alive]}")
        return [p.pid for p in procs]

    def stop_node(self, node: Node, timeout: float = 60.0) -> list[int]:
        """SIGTERM to the node's `ray start --block`, which stops its processes; SIGKILL (by PID) what is still
        alive after ``timeout``, also what is left in its process group once `ray start` has exited (a start
        that failed). Returns the PIDs that needed SIGKILL."""
        import psutil

        node.stopped = True
        procs = node.processes()
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        alive += [p for p in _group(node) if p.pid not in {a.pid for a in alive}]
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        node.proc.wait(10)
        return [p.pid for p in alive]

    def leftovers(self) -> list[int]:
        """PIDs of live processes whose command line names this cluster's temp dir."""
        import psutil

        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(self.temp_dir in part for part in (p.info["cmdline"] or [])) and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return [pid for pid in found if pid != os.getpid()]

    def shutdown(self) -> list[int]:
        """Stop the worker nodes (all at once), then the head; returns the PIDs that had to be SIGKILLed."""
        from concurrent.futures import ThreadPoolExecutor

        live = [n for n in self.nodes if n.proc.poll() is None or _group(n)]
        workers = [n for n in live if n is not self.nodes[0]]
        with ThreadPoolExecutor(max(1, len(workers))) as pool:
            forced = [pid for pids in pool.map(self.stop_node, workers) for pid in pids]
        if self.nodes and self.nodes[0] in live:
            forced += self.stop_node(self.nodes[0])
        stray = self.leftovers()
        for pid in stray:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return forced + stray

    def remove_temp_dir(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _group(node: Node) -> list:
    """Live processes in the process group of the node's `ray start` (its PID), started after it: what is left
    of a node whose `ray start` has exited (the group id cannot be reused while a member lives)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "create_time"]):
        try:
            if os.getpgid(p.pid) == node.pid and p.info["create_time"] >= node.started - 1 \
                    and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def write_json(path: str, doc: dict) -> str:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)  # JSON is YAML
    return path


# ---------------------------------------------------------------- the shpeft command, as a user runs it


def shpeft(*args, timeout: float = 300.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The installed `shpeft` console script (this checkout first on PYTHONPATH), output captured."""
    return subprocess.run([str(BIN / "shpeft"), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**node_env(), **(env or {})}, stdin=subprocess.DEVNULL)


def submission_id(res: subprocess.CompletedProcess) -> str:
    """`shpeft submit` prints the submission id as its only line on stdout."""
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, res.stdout
    return lines[0]


def wait_until(predicate, timeout: float, what: str, poll: float = 0.5):
    """Poll ``predicate`` until it returns something truthy (returned); AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout:g}s")


def ray_info_lines(text: str) -> list[str]:
    """Lines in Ray's own log format (``2026-01-01 10:00:00,000\tINFO file.py:12 -- ...``)."""
    return [ln for ln in text.splitlines() if "\tINFO " in ln]


def package_files(cluster: RayCluster, working_dir_uri: str) -> list[str]:
    """The files of an uploaded working_dir package, as the cluster unpacked it on this machine."""
    name = working_dir_uri.rsplit("/", 1)[-1].removesuffix(".zip")
    found = list(Path(cluster.temp_dir).glob(f"session_latest/runtime_resources/working_dir_files/{name}"))
    assert len(found) == 1, (working_dir_uri, found)
    return sorted(str(p.relative_to(found[0])) for p in found[0].rglob("*") if p.is_file())
