"""`shpeft submit`, `status`, `logs` against the Jobs API.

The tests talk to a small local HTTP server that answers like Ray's dashboard (version, package upload,
submit, info, logs), so the real `JobSubmissionClient` code runs without a cluster or network.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from click.testing import CliRunner
from helpers_cli import SHPEFT, free_port, good_job, invoke

from orchestrator.cli.main import main


class FakeDashboard(BaseHTTPRequestHandler):
    """Answers the Jobs REST endpoints JobSubmissionClient uses."""

    state: dict = {}

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, code: int, body: dict | None = None):
        data = json.dumps(body or {}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_GET(self):
        st = self.state
        if self.path == "/api/version":
            return self._reply(200, {"version": "x", "ray_version": "2.60.0", "ray_commit": "x"})
        if self.path.startswith("/api/packages/"):
            return self._reply(200 if self.path in st["packages"] else 404)
        if self.path.startswith("/api/jobs/"):
            parts = self.path.strip("/").split("/")
            sid = parts[2]
            if sid not in st["jobs"]:
                return self._reply(404, {"error": "no such job"})
            if parts[-1] == "logs":
                return self._reply(200, {"logs": st["jobs"][sid]["logs"]})
            statuses = st["jobs"][sid]["statuses"]
            status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
            return self._reply(200, {"type": "SUBMISSION", "submission_id": sid, "status": status,
                                     "entrypoint": st["jobs"][sid]["entrypoint"], "message": f"job is {status.lower()}"})
        self._reply(404)

    def do_PUT(self):
        self.state["packages"][self.path] = self._body()
        self._reply(200)

    def do_POST(self):
        if self.path.rstrip("/") == "/api/jobs":
            req = json.loads(self._body())
            sid = req.get("submission_id") or "raysubmit_fake123"
            self.state["jobs"][sid] = {"entrypoint": req["entrypoint"], "request": req,
                                       "statuses": ["RUNNING", "SUCCEEDED"], "logs": "epoch 1 ok\n"}
            return self._reply(200, {"job_id": sid, "submission_id": sid})
        self._reply(404)


@pytest.fixture
def dashboard():
    pytest.importorskip("aiohttp", reason="Ray's Jobs SDK needs aiohttp (ray[default])")
    FakeDashboard.state = {"packages": {}, "jobs": {}}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeDashboard)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeDashboard.state
    server.shutdown()
    server.server_close()


def test_submit_status_logs_roundtrip(tmp_path, dashboard, monkeypatch):
    address, state = dashboard
    monkeypatch.setenv("RAY_ADDRESS", "http://198.51.100.1:8265")  # must not override --address
    job = good_job(tmp_path)
    job["store"] = "memory://shpeft-submit-test/store"
    path = tmp_path / "myjob.yaml"
    path.write_text(yaml.safe_dump(job))
    res = CliRunner().invoke(main, ["submit", str(path), "--address", address, "--submission-id", "sub-1",
                                    "--env", "HF_HUB_OFFLINE=1", "--force"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == "sub-1"
    req = state["jobs"]["sub-1"]["request"]
    assert req["entrypoint"] == "shpeft run myjob.yaml --address auto --force"
    assert req["runtime_env"]["env_vars"] == {"HF_HUB_OFFLINE": "1"}
    # The working_dir package uploaded holds exactly the job file.
    (pkg,) = state["packages"].values()
    with zipfile.ZipFile(io.BytesIO(pkg)) as z:
        assert z.namelist() == ["myjob.yaml"]
        assert yaml.safe_load(z.read("myjob.yaml")) == job
    assert req["runtime_env"]["working_dir"].startswith("gcs://")

    res = invoke("status", "sub-1", "--address", address)
    assert res.exit_code == 0 and "sub-1: RUNNING" in res.output
    res = invoke("status", "sub-1", "--address", address, "--wait", "--poll", 0.1)
    assert res.exit_code == 0 and "SUCCEEDED" in res.output
    res = invoke("logs", "sub-1", "--address", address)
    assert res.exit_code == 0 and res.output == "epoch 1 ok\n"
    res = CliRunner().invoke(main, ["status", "nope", "--address", address])
    assert res.exit_code == 1 and "nope" in res.output


def test_submit_working_dir(tmp_path, dashboard):
    address, state = dashboard
    wd = tmp_path / "proj"
    (wd / "jobs").mkdir(parents=True)
    (wd / "notes.txt").write_text("x")
    path = wd / "jobs" / "j.yaml"
    path.write_text(yaml.safe_dump({**good_job(tmp_path), "store": "memory://x/store"}))
    res = invoke("submit", path, "--address", address.removeprefix("http://"), "--working-dir", wd)
    assert res.exit_code == 0, res.output
    (job,) = state["jobs"].values()
    assert job["entrypoint"] == "shpeft run jobs/j.yaml --address auto"
    (pkg,) = state["packages"].values()
    assert sorted(zipfile.ZipFile(io.BytesIO(pkg)).namelist()) == ["jobs/j.yaml", "notes.txt"]

    other = tmp_path / "elsewhere"
    other.mkdir()
    res = CliRunner().invoke(main, ["submit", str(path), "--address", address, "--working-dir", str(other)])
    assert res.exit_code == 1 and "not inside --working-dir" in res.output


def test_submit_warns_about_local_store(tmp_path, dashboard):
    address, _ = dashboard
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(good_job(tmp_path)))
    res = CliRunner().invoke(main, ["submit", str(path), "--address", address])
    assert res.exit_code == 0
    assert "local path" in res.stderr


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
