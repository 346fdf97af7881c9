"""`shpeft serve` from start to stop: the installed script serves until SIGTERM, then leaves nothing running;
a backbone that cannot be built is refused before Ray starts."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from helpers_cli import SHPEFT, free_port

pytest.importorskip("ray")


def _lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


def _wait_for(lines: queue.Queue, text: str, seen: list[str], timeout: float) -> str | None:
    """The first line containing ``text`` (None if the stream ends or time runs out); every line into ``seen``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            return None
        seen.append(line)
        if text in line:
            return line
    return None


@pytest.mark.ray
def test_serve_answers_until_sigterm_then_shuts_its_ray_down(tmp_path):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SHPEFT_NO_DASHBOARD": "1", "RAY_ADDRESS": ""}
    proc = subprocess.Popen([str(SHPEFT), "serve", "--backbone", "test_vit", "--backbone-kwargs", '{"img_size": 32}',
                             "--port", str(port), "--route-prefix", "/shpeft", "--num-cpus", "2",
                             "--delta-root", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        first = _wait_for(lines, "serving backbone", seen, timeout=300)
        assert first is not None, "".join(seen)
        url = f"http://127.0.0.1:{port}/shpeft"
        assert first.startswith(f"serving backbone test_vit at {url} (1 replica(s), up to 16 deltas each)")
        with urllib.request.urlopen(f"{url}/-/backbone", timeout=60) as r:
            info = json.loads(r.read())
        assert info["backbone"] == "test_vit" and info["unchanged"] is True
        # a delta outside --delta-root is refused by the running server, as JSON
        req = urllib.request.Request(url, data=b"x", method="POST",
                                     headers={"serve_multiplexed_model_id": "/elsewhere/d.safetensors"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=60)
        assert refused.value.code == 403 and "outside the served delta root" in json.loads(refused.value.read())["error"]

        proc.send_signal(signal.SIGTERM)  # what a service manager sends: the same as Ctrl-C
        assert _wait_for(lines, "stopping", seen, timeout=120) is not None, "".join(seen)
        assert proc.wait(timeout=120) == 0, "".join(seen)
        with pytest.raises(OSError):  # the embedded Ray went, and Serve's HTTP proxy with it
            urllib.request.urlopen(f"{url}/-/backbone", timeout=10)
        assert not any("Traceback" in line for line in seen), "".join(seen)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_serve_until_stopped_refuses_a_backbone_before_ray_starts():
    import ray

    from orchestrator.serving.server import ServeError, serve_until_stopped

    with pytest.raises(ServeError, match=r"backbone 'nope_model' from None cannot be built: Unknown model") as err:
        serve_until_stopped({"name": "nope_model", "source": None, "kwargs": {}},
                            on_start=lambda url: pytest.fail("started"))
    assert err.value.status == 422 and not ray.is_initialized()
