"""The `shpeft` command line: help, bad job files, catalogue views and the Jobs API commands.

`submit`, `status` and `logs` against a working cluster run in tests/cluster/ (a cluster started with
`ray start`); here only what a real cluster cannot be made to do: a dashboard that cannot be reached,
never answers, refuses submissions, or answers what is not Ray's Jobs API (a small local HTTP server,
so the real `JobSubmissionClient` code runs).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from orchestrator.cli.main import main

ROOT = Path(__file__).resolve().parents[3]
SHPEFT = Path(sys.executable).parent / "shpeft"
COMMANDS = ["run", "compare", "validate", "schema", "submit", "status", "logs", "list", "show", "report", "predict", "export", "demo", "tasks"]


def invoke(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


# ---------------------------------------------------------------- help


def test_help_lists_every_command():
    res = invoke("--help")
    assert res.exit_code == 0
    for cmd in COMMANDS:
        assert f"  {cmd} " in res.output or f"  {cmd}\n" in res.output, cmd


@pytest.mark.parametrize("cmd", COMMANDS)
def test_each_command_has_help(cmd):
    res = invoke(cmd, "--help")
    assert res.exit_code == 0, res.output
    assert "Usage: main " + cmd in res.output or f"Usage: main {cmd}" in res.output


def test_console_script_help():
    out = subprocess.run([str(SHPEFT), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "predict" in out.stdout and "submit" in out.stdout


# ---------------------------------------------------------------- run: validation before anything


def _good_job(tmp_path: Path) -> dict:
    return {
        "backbone": {"name": "test_vit", "kwargs": {"img_size": 32}},
        "store": str(tmp_path / "store"),
        "tasks": [{"name": "t1", "source": str(tmp_path / "data"), "format": "imagefolder", "num_classes": 2}],
    }


@pytest.mark.parametrize(
    "section,key,value,field",
    [
        ("selection", "density", 1.5, "selection.density"),
        ("selection", "alpha", -0.1, "selection.alpha"),
        ("training", "workers_per_task", 0, "training.workers_per_task"),
        ("training", "epochz", 3, "training.epochz"),
    ],
)
def test_run_bad_job_exits_2_and_writes_nothing(tmp_path, monkeypatch, section, key, value, field):
    import orchestrator.workflows.run as pipeline

    called = []
    monkeypatch.setattr(pipeline, "run_job", lambda *a, **k: called.append(1))
    job = _good_job(tmp_path)
    job.setdefault(section, {})[key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(job))
    res = invoke("run", path)
    assert res.exit_code == 2
    assert field in res.output
    assert "error:" in res.output
    assert not called
    assert not (tmp_path / "store").exists()


def test_run_bad_job_console_script(tmp_path):
    job = _good_job(tmp_path)
    job["selection"] = {"density": 0}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(job))
    out = subprocess.run([str(SHPEFT), "run", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "selection.density" in out.stderr
    assert out.stderr.count("\n") <= 2  # one clear message, no traceback
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("cmd", ["run", "compare"])
def test_unwritable_store_exits_2_before_ray_starts(tmp_path, cmd):
    """A store under a file cannot be written: one line naming it, exit 2, Ray never started."""
    import ray

    (tmp_path / "afile").write_text("x")
    job = _good_job(tmp_path)
    job["store"] = str(tmp_path / "afile" / "store")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    res = invoke(cmd, path)
    assert res.exit_code == 2 and res.output.startswith("error:")
    # every problem on its own line, each naming its field: the store under a file, the missing data
    lines = res.output.splitlines()[1:]
    assert any(ln.startswith("  - store: ") and "afile" in ln for ln in lines), res.output
    assert any(ln.startswith("  - tasks[0] (t1): ") for ln in lines), res.output
    assert not ray.is_initialized()


def test_validate_lists_every_problem_with_its_field(tmp_path):
    """One run of `shpeft validate` reports every pre-compute problem, each naming its field."""
    (tmp_path / "data" / "a").mkdir(parents=True)
    job = _good_job(tmp_path)
    job["backbone"] = {"name": "vit_tiny_nope"}
    job["tasks"].append({"catalogue": "bussi", "source": str(tmp_path)})
    job["tasks"].append({"catalogue": "busi", "source": str(tmp_path), "overrides": {"colour": "red"}})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    res = invoke("validate", path, "--num-cpus", 0.5)
    assert res.exit_code == 2
    out = res.output
    assert "backbone.name: 'vit_tiny_nope' is not a timm model" in out
    assert "tasks[1].catalogue/overrides: " in out and "bussi" in out
    assert "tasks[2].catalogue/overrides: " in out and "colour" in out
    assert "tasks[0] (t1): " in out  # a folder with no images in the stated format
    assert "training.workers_per_task / cpus_per_worker / gpus_per_worker: " in out
    good = _good_job(tmp_path)
    good["tasks"] = [{"name": "t1", "source": str(tmp_path / "colour-a"), "format": "imagefolder", "num_classes": 3}]
    from tasks.synthetic import write_colour_task

    write_colour_task(str(tmp_path), "colour-a", 0)
    path.write_text(yaml.safe_dump(good))
    res = invoke("validate", path)
    assert res.exit_code == 0 and ": ok (1 task(s)" in res.output, res.output


def test_schema_prints_the_job_json_schema():
    res = invoke("schema")
    schema = json.loads(res.output)
    assert res.exit_code == 0 and set(schema["properties"]) >= {"backbone", "tasks", "method", "selection", "sweep"}
    assert "description" in schema["$defs"]["SelectionSection"]["properties"]["mix"]


def test_job_file_that_is_not_utf8_exits_2_naming_it(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"backbone: {name: test_vit}\nstore: \xff\xfe\n")
    res = invoke("validate", path)
    assert res.exit_code == 2 and "job.yaml is not UTF-8" in res.output and "Traceback" not in res.output


def test_backbone_without_eligible_weights_exits_2_naming_rules(tmp_path):
    import ray

    job = _good_job(tmp_path)
    job["selection"] = {"rules": [r"no\.such\.layer"]}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    res = invoke("run", path)
    assert res.exit_code == 2
    assert "selection.rules: no weight of test_vit is eligible" in res.output
    assert not ray.is_initialized()
    job["method"] = {"name": "lora"}  # a method that selects nothing needs no eligible weights
    path.write_text(yaml.safe_dump(job))
    from orchestrator.job.spec import load_job
    from orchestrator.workflows.run import preflight

    assert preflight(load_job(path)) is not None


def test_run_missing_job_file(tmp_path):
    res = invoke("run", tmp_path / "nope.yaml")
    assert res.exit_code == 2 and "nope.yaml" in res.output


def _write_two_class_folder(root: Path) -> None:
    from PIL import Image

    for split in ("train", "val", "test"):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (200 * c, 10 * i, 0)).save(root / split / f"c{c}" / f"{i}.png")


def test_run_passes_options_and_exit_code(tmp_path, monkeypatch):
    import orchestrator.workflows.run as pipeline

    seen = {}

    class Result:
        exit_code = 1

    def fake_run_job(job, **kw):
        seen.update(kw, job=job)
        return Result()

    monkeypatch.setattr(pipeline, "run_job", fake_run_job)
    _write_two_class_folder(tmp_path / "data")  # `run` validates the dataset before anything runs
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_good_job(tmp_path)))
    res = invoke("run", path, "--address", "auto", "--num-cpus", 3, "--force", "--no-progress")
    assert res.exit_code == 1
    assert seen["address"] == "auto" and seen["num_cpus"] == 3 and seen["force"] is True
    assert seen["progress"] is False
    assert seen["job"].backbone.name == "test_vit"


# ---------------------------------------------------------------- list / show


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
    from orchestrator.job.spec import job_id, load_job

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_good_job(tmp_path)))
    jid = job_id(load_job(path))
    store = str(tmp_path / "store")
    write_rows(store, jid, [{"task": "t1", "status": "ok"}])
    res = invoke("show", store, path)
    assert res.exit_code == 0 and jid in res.output and "t1" in res.output


def test_list_empty_store(tmp_path):
    res = invoke("list", tmp_path / "empty")
    assert res.exit_code == 0 and "no jobs" in res.output


# ---------------------------------------------------------------- submit / status / logs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeDashboard(BaseHTTPRequestHandler):
    """A dashboard that misbehaves as a real cluster cannot be made to on purpose: it refuses submissions
    ("No available agent", or another error), or answers what is not Ray's Jobs API. ``state`` says how:
    ``version`` ("ray" or "garbage"), ``submit`` (replies to POST /api/jobs/, in order; the last one
    repeats) and ``jobs`` ("garbage" for every job query). Every request is recorded in ``requests``."""

    state: dict = {}

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, code: int, body: str, content_type: str = "application/json"):
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        st = self.state
        st["requests"].append(("GET", self.path))
        if self.path == "/api/version" and st["version"] == "ray":
            return self._reply(200, json.dumps({"version": "x", "ray_version": "2.60.0", "ray_commit": "x"}))
        if self.path.startswith("/api/packages/"):
            return self._reply(200, "{}")  # the package is "there": nothing is uploaded
        self._reply(200, "<html><body>a web server, not a Ray dashboard</body></html>", "text/html")

    def do_POST(self):
        st = self.state
        st["requests"].append(("POST", self.path))
        if self.path.rstrip("/") == "/api/jobs" and st["version"] == "ray":
            code, text = st["submit"].pop(0) if len(st["submit"]) > 1 else st["submit"][0]
            return self._reply(code, text, "application/json" if code == 200 else "text/plain")
        self._reply(200, "<html>not json</html>", "text/html")


NO_AGENT = (500, "No available agent to submit job, please try again later.")
ACCEPTED = (200, json.dumps({"job_id": "raysubmit_ok", "submission_id": "raysubmit_ok"}))


@pytest.fixture
def dashboard():
    pytest.importorskip("aiohttp", reason="Ray's Jobs SDK needs aiohttp (ray[default])")
    FakeDashboard.state = {"version": "ray", "submit": [ACCEPTED], "requests": []}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeDashboard)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeDashboard.state
    server.shutdown()
    server.server_close()


def _object_store_job(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**_good_job(tmp_path), "store": "memory://shpeft-submit-test/store"}))
    return path


def test_submit_retries_while_the_cluster_has_no_job_agent(tmp_path, dashboard):
    """Right after `ray start --head` the dashboard answers 500 "No available agent": submit retries."""
    address, state = dashboard
    state["submit"] = [NO_AGENT, NO_AGENT, ACCEPTED]
    res = CliRunner().invoke(main, ["submit", str(_object_store_job(tmp_path)), "--address", address])
    assert res.exit_code == 0, res.output
    assert res.stdout == "raysubmit_ok\n"
    assert sum(r == ("POST", "/api/jobs/") for r in state["requests"]) == 3
    waiting = [ln for ln in res.stderr.splitlines() if ln.startswith("waiting:")]
    assert waiting == ["waiting: the cluster has no job agent ready yet (Ray: \"No available agent to submit job\"); "
                       "retrying for up to 60s"]


def test_submit_gives_up_on_a_cluster_without_job_agent_with_one_line(tmp_path, dashboard):
    address, state = dashboard
    state["submit"] = [NO_AGENT]
    res = CliRunner().invoke(main, ["submit", str(_object_store_job(tmp_path)), "--address", address,
                                    "--agent-wait", "1"])
    assert res.exit_code == 1 and res.stdout == ""
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [res.stderr.splitlines()[-1]] and len(errors) == 1, res.stderr
    assert errors[0].startswith(f"error: the cluster at {address} still had no job agent to take the job after 1s")
    assert "--agent-wait" in errors[0] and "Traceback" not in res.stderr
    assert sum(r == ("POST", "/api/jobs/") for r in state["requests"]) >= 2


def test_submit_refused_for_another_reason_is_one_line_and_not_retried(tmp_path, dashboard):
    address, state = dashboard
    state["submit"] = [(400, "Traceback (most recent call last):\n  File x\nValueError: bad runtime_env")]
    res = CliRunner().invoke(main, ["submit", str(_object_store_job(tmp_path)), "--address", address])
    assert res.exit_code == 1
    assert res.stderr.splitlines()[-1] == (f"error: submission to {address} failed: Request failed with status "
                                           "code 400: Traceback (most recent call last):")
    assert sum(r == ("POST", "/api/jobs/") for r in state["requests"]) == 1


@pytest.mark.parametrize("version", ["garbage", "ray"])
@pytest.mark.parametrize("cmd", [["status", "raysubmit_x"], ["logs", "raysubmit_x"], ["submit", None]])
def test_a_server_that_answers_garbage_is_one_line(tmp_path, dashboard, version, cmd):
    """Something answers HTTP at the address, but not as Ray's Jobs API: one line, exit 1."""
    address, state = dashboard
    state["version"] = version
    state["submit"] = [(200, "<html>not json</html>")]
    args = [str(_object_store_job(tmp_path)) if a is None else a for a in cmd]
    res = CliRunner().invoke(main, [*args, "--address", address])
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    err = [ln for ln in res.stderr.splitlines() if not ln.startswith("warning:")]
    assert len(err) == 1 and err[0].startswith("error: ") and address in err[0], res.stderr
    if version == "garbage":
        assert err[0] == (f"error: {address} does not answer like a Ray dashboard (its answer is not JSON, as the "
                          "Jobs API's would be)")


def test_a_dashboard_that_never_answers_times_out(tmp_path):
    """A port that accepts connections and never replies: bounded by --timeout, one line."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        res = CliRunner().invoke(main, ["status", "raysubmit_x", "--address", f"127.0.0.1:{port}", "--timeout", "1"],
                                 env={"RAY_ADDRESS": None, "RAY_API_SERVER_ADDRESS": None})
    assert res.exit_code == 1
    assert res.stderr == (f"error: cannot reach the Ray dashboard at http://127.0.0.1:{port} within 1s (ReadTimeout); "
                          "is the cluster up and port 8265 reachable (e.g. `ray dashboard cluster.yaml` or "
                          "`kubectl port-forward`)?\n")


def test_submit_bad_job_exits_2_before_connecting(tmp_path):
    job = _good_job(tmp_path)
    job["selection"] = {"alpha": 2}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(job))
    res = invoke("submit", path, "--address", f"http://127.0.0.1:{_free_port()}")
    assert res.exit_code == 2 and "selection.alpha" in res.output


@pytest.mark.parametrize("args,message", [
    (["--smoke-test"], "--methods, --seeds and --smoke-test go with --compare"),
    (["--seeds", "2"], "--methods, --seeds and --smoke-test go with --compare"),
    (["--compare", "--methods", "shpeft,lorra"], "--methods: 'lorra' is not a method"),
])
def test_submit_bad_compare_options_exit_2_before_connecting(tmp_path, args, message):
    res = invoke("submit", _object_store_job(tmp_path), "--address", f"http://127.0.0.1:{_free_port()}", *args)
    assert res.exit_code == 2 and message in res.output and "cannot reach" not in res.output, res.output


@pytest.mark.parametrize("cmd", [["status", "raysubmit_x"], ["logs", "raysubmit_x"], ["logs", "raysubmit_x", "--follow"],
                                 ["status", "raysubmit_x", "--wait"], ["submit", None]])
def test_unreachable_address_fails_fast(tmp_path, cmd):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**_good_job(tmp_path), "store": "memory://x/s"}))
    args = [str(path) if a is None else a for a in cmd]
    port = _free_port()
    t0 = time.monotonic()
    res = CliRunner().invoke(main, [*args, "--address", f"http://127.0.0.1:{port}", "--timeout", "3"],
                             env={"RAY_ADDRESS": None, "RAY_API_SERVER_ADDRESS": None})
    assert time.monotonic() - t0 < 10
    assert res.exit_code == 1, res.output
    assert f"cannot reach the Ray dashboard at http://127.0.0.1:{port}" in res.stderr
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_unreachable_address_console_script():
    """The installed script: one clear line on stderr, exit 1, bounded time, no traceback."""
    port = _free_port()
    t0 = time.monotonic()
    out = subprocess.run([str(SHPEFT), "status", "raysubmit_x", "--address", f"127.0.0.1:{port}", "--timeout", "3"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "RAY_ADDRESS": "", "RAY_API_SERVER_ADDRESS": ""})
    assert time.monotonic() - t0 < 45  # interpreter + torch import on a loaded 2-CPU machine, then < 3 s
    assert out.returncode == 1
    assert out.stderr.startswith(f"error: cannot reach the Ray dashboard at http://127.0.0.1:{port}")
    assert "Traceback" not in out.stderr


def test_address_forms():
    from orchestrator.runtime.jobs_api import JobsApiError, normalise_address

    assert normalise_address("HEAD:8265") == "http://HEAD:8265"
    assert normalise_address("https://h:443/") == "https://h:443"
    with pytest.raises(JobsApiError, match="dashboard"):
        normalise_address("ray://head:10001")
    res = invoke("status", "x", "--address", "ray://head:10001")
    assert res.exit_code == 1 and "http://HEAD:8265" in res.output


def test_address_required():
    res = CliRunner().invoke(main, ["status", "x"], env={"RAY_API_SERVER_ADDRESS": None})
    assert res.exit_code == 2 and "--address" in res.output


def test_demo_passes_options_and_exit_code(monkeypatch):
    import orchestrator.workflows.demo as demo

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda store, smoke, **kw: seen.append((store, smoke, kw)) or 3)
    res = invoke("demo", "--store", "memory://d/store", "--smoke-test", "--num-cpus", 2)
    assert res.exit_code == 3
    assert seen == [("memory://d/store", True, {"num_cpus": 2, "all_methods": False})]
    res = invoke("demo", "--all-methods")
    assert seen[-1] == (None, False, {"num_cpus": None, "all_methods": True})


def test_help_imports_neither_torch_nor_ray():
    """`shpeft --help` and the job schema stay fast: torch, timm and ray load only when a command needs them."""
    code = ("import sys, orchestrator.cli.main, orchestrator.job.spec; "
            "heavy = sorted(m for m in ('torch', 'timm', 'ray') if m in sys.modules); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
