"""`shpeft serve --address` on a real Ray cluster answers requests for two deltas that a submitted job
trained, with the probabilities `shpeft predict` computes locally for the same image and delta."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request

import pytest

from helpers_cluster import BIN, node_env, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.real_cluster]


def _post(url: str, body: bytes, delta: str) -> dict:
    req = urllib.request.Request(url, data=body, method="POST", headers={"serve_multiplexed_model_id": delta})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_serve_on_the_cluster_answers_two_deltas(ray_cluster, two_task_job, cluster_data, tmp_path):
    from orchestrator.serving.predict import predict_files
    from orchestrator.store.results import latest_rows

    rows = latest_rows(two_task_job.store, two_task_job.job_id)
    deltas_root = two_task_job.store + "/deltas"
    port = ray_cluster.pick_port()
    out_path = tmp_path / "serve.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen([str(BIN / "shpeft"), "serve", str(two_task_job.job_path), "--address",
                                 ray_cluster.gcs_address, "--port", str(port), "--delta-root", deltas_root],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=node_env())
    try:
        def serving() -> bool:
            assert proc.poll() is None, out_path.read_text()
            return "serving backbone test_vit at" in out_path.read_text()

        wait_until(serving, 600, "`shpeft serve` ready", poll=1.0)
        url = f"http://127.0.0.1:{port}"
        image = sorted((two_task_job.root.parent / "ca" / "test").rglob("*.png"))[0]
        body = image.read_bytes()
        answers = {}
        for task, row in rows.items():
            rel = row["delta_uri"][len(deltas_root) + 1:]  # a delta id relative to --delta-root
            answers[task] = _post(url, body, rel)
        with urllib.request.urlopen(url + "/-/backbone", timeout=60) as r:
            backbone = json.loads(r.read())
    finally:
        proc.send_signal(signal.SIGTERM)  # what a service manager sends; serve deletes its application
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
            raise
        finally:  # `shpeft serve` deletes only its application; Serve itself stays, so the cluster stops slowly
            subprocess.run([str(BIN / "serve"), "shutdown", "--address", ray_cluster.dashboard_url, "--yes"],
                           capture_output=True, timeout=300, env=node_env())
    assert code == 0 and out_path.read_text().rstrip().endswith("stopping"), out_path.read_text()

    assert sorted(answers) == ["ca", "cb"]
    for task, got in answers.items():
        assert got["task"] == task and got["delta"] == rows[task]["delta_uri"]
        assert got["delta_sha256"] == rows[task]["sha256"]
        ref = predict_files([rows[task]["delta_uri"]], [str(image)], top_k=3,  # every class of the 3
                            backbone_source=cluster_data[1])
        assert len(got["probabilities"]) == len(ref) == 3
        for p in ref:
            assert abs(got["probabilities"][p.label] - p.probability) < 1e-5, (got, ref)
        assert got["class_index"] == ref[0].label and got["class_name"] == ref[0].class_name
    assert backbone["unchanged"] is True and backbone["requests"] == 2
