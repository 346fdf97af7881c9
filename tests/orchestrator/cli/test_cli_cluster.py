"""`shpeft submit`, `status`, `logs` against the Jobs API.

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
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from helpers_cli import SHPEFT, free_port, good_job, invoke

from orchestrator.cli.main import main


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
    path.write_text(yaml.safe_dump({**good_job(tmp_path), "store": "memory://shpeft-submit-test/store"}))
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


@pytest.mark.parametrize("args,message", [
    (["--smoke-test"], "--methods, --seeds and --smoke-test go with --compare"),
    (["--seeds", "2"], "--methods, --seeds and --smoke-test go with --compare"),
    (["--compare", "--methods", "shpeft,lorra"], "--methods: 'lorra' is not a method"),
])
def test_submit_bad_compare_options_exit_2_before_connecting(tmp_path, args, message):
    res = invoke("submit", _object_store_job(tmp_path), "--address", f"http://127.0.0.1:{free_port()}", *args)
    assert res.exit_code == 2 and message in res.output and "cannot reach" not in res.output, res.output


def test_submit_bad_job_exits_2_before_connecting(tmp_path):
    job = good_job(tmp_path)
    job["selection"] = {"alpha": 2}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(job))
    res = invoke("submit", path, "--address", f"http://127.0.0.1:{free_port()}")
    assert res.exit_code == 2 and "selection.alpha" in res.output


@pytest.mark.parametrize("cmd", [["status", "raysubmit_x"], ["logs", "raysubmit_x"], ["logs", "raysubmit_x", "--follow"],
                                 ["status", "raysubmit_x", "--wait"], ["submit", None]])
def test_unreachable_address_fails_fast(tmp_path, cmd):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**good_job(tmp_path), "store": "memory://x/s"}))
    args = [str(path) if a is None else a for a in cmd]
    port = free_port()
    t0 = time.monotonic()
    res = CliRunner().invoke(main, [*args, "--address", f"http://127.0.0.1:{port}", "--timeout", "3"],
                             env={"RAY_ADDRESS": None, "RAY_API_SERVER_ADDRESS": None})
    assert time.monotonic() - t0 < 10
    assert res.exit_code == 1, res.output
    assert f"cannot reach the Ray dashboard at http://127.0.0.1:{port}" in res.stderr
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_unreachable_address_console_script():
    """The installed script: one clear line on stderr, exit 1, bounded time, no traceback."""
    port = free_port()
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


def test_logs_follow_streams_until_job_ends():
    """`logs --follow` reads Ray's log-tail websocket until the server closes it (job ended)."""
    pytest.importorskip("aiohttp", reason="Ray's Jobs SDK needs aiohttp (ray[default])")
    import asyncio

    from aiohttp import web

    chunks = ["epoch 1/2 val_macro_f1 0.41\n", "epoch 2/2 val_macro_f1 0.57\n", "job done\n"]

    async def version(request):
        return web.json_response({"version": "x", "ray_version": "2.60.0", "ray_commit": "x"})

    async def tail(request):
        assert request.match_info["sid"] == "sub-9"
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        for c in chunks:
            await ws.send_str(c)
        await ws.close()
        return ws

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.add_routes([web.get("/api/version", version), web.get("/api/jobs/{sid}/logs/tail", tail)])
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        res = invoke("logs", "sub-9", "--address", f"http://127.0.0.1:{port}", "--follow")
        assert res.exit_code == 0, res.output
        assert res.output == "".join(chunks)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
