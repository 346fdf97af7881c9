"""Serving many task deltas from one backbone (Ray Serve) and batch prediction on Ray Data.

Two deltas with different heads (3 and 5 classes) and different sparse values on one tiny seeded
test_vit whose base weights are a local file. References are dense models built with the core API
(merge_delta on a fresh backbone) or `predict_files`, the existing few-files path.
"""

from __future__ import annotations

import io
import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image

ray = pytest.importorskip("ray")

from helpers_orch import random_delta, write_seeded_backbone  # noqa: E402
from orchestrator.cli.main import main  # noqa: E402
from orchestrator.serving.predict import predict_files  # noqa: E402
from shpeft_core.backbone import BackboneSpec, backbone_fingerprint, create_backbone  # noqa: E402
from shpeft_core.delta import load_delta, merge_delta  # noqa: E402
from tasks.transforms import transform_for  # noqa: E402

pytestmark = pytest.mark.ray

KWARGS = {"img_size": 32}
TASKS = {"busi": ["benign", "malignant", "normal"],
         "chaoyang": ["normal", "serrated", "adenocarcinoma", "adenoma", "other"]}


def _delta(spec: BackboneSpec, path: Path, task: str, seed: int):
    random_delta(spec, path, task, TASKS[task], seed=seed, density=0.02, scale=0.3)
    return str(path)


def _png(rng, size=(40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=size + (3,), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    weights = write_seeded_backbone(str(d / "base.safetensors"), KWARGS)
    spec = BackboneSpec("test_vit", str(weights), KWARGS)
    deltas = {"busi": _delta(spec, d / "busi.safetensors", "busi", 1),
              "chaoyang": _delta(spec, d / "chaoyang.safetensors", "chaoyang", 2)}
    rng = np.random.default_rng(0)
    images = [_png(rng, s) for s in [(40, 40), (32, 48), (64, 64), (32, 32)]]
    backbone = {"name": "test_vit", "source": str(weights), "kwargs": KWARGS}
    return d, backbone, deltas, images


def _dense_probs(delta_uri: str, data: bytes) -> np.ndarray:
    """The delta merged into a fresh backbone with the core API, run in float64; one image."""
    model = merge_delta(load_delta(delta_uri)).eval()
    from orchestrator.serving.predict import decode_image_bytes

    x = transform_for(model, train=False)(decode_image_bytes(data, "ref"))[None]
    with torch.no_grad():
        return model.double()(x.double()).softmax(-1)[0].numpy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, data: bytes, model_id: str | None) -> tuple[int, dict]:
    headers = {"serve_multiplexed_model_id": model_id} if model_id else {}
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


class TestServe:
    @pytest.fixture(scope="class")
    def server(self, setup, ray_local):
        from ray import serve

        from orchestrator.serving.server import build_app, start

        d, backbone, deltas, images = setup
        # A long batch wait so concurrent requests are batched (Serve splits a batch by delta and runs the
        # parts concurrently: they must take turns on the one backbone).
        app = build_app(backbone, max_deltas=4, max_batch_size=8, batch_wait_s=0.2)
        url = start(app, host="127.0.0.1", port=_free_port(), route_prefix="/shpeft")
        yield url
        serve.shutdown()

    def test_interleaved_requests_match_dense_reference(self, setup, server):
        d, backbone, deltas, images = setup
        before = _get(server + "/-/backbone")
        fresh = create_backbone(BackboneSpec("test_vit", backbone["source"], KWARGS), 2)
        assert before["fingerprint"] == backbone_fingerprint(fresh)
        assert before["unchanged"]
        # Interleaved and concurrent: batches for both deltas are in flight at once.
        jobs = [(task, i) for i in range(len(images)) for task in ("busi", "chaoyang")] * 2
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda j: _post(server, images[j[1]], deltas[j[0]]), jobs))
        refs = {(t, i): _dense_probs(deltas[t], images[i]) for t in deltas for i in range(len(images))}
        for (task, i), (status, body) in zip(jobs, answers):
            assert status == 200, body
            ref = refs[(task, i)]
            np.testing.assert_allclose(body["probabilities"], ref, atol=1e-5, rtol=0)
            assert body["task"] == task and body["class_names"] == TASKS[task]
            assert body["class_index"] == int(ref.argmax())
            assert body["class_name"] == TASKS[task][int(ref.argmax())]
            assert len(body["delta_sha256"]) == 64
        assert not np.allclose(refs[("busi", 0)][:3], refs[("chaoyang", 0)][:3])  # the deltas differ
        after = _get(server + "/-/backbone")
        assert after["unchanged"]
        assert after["fingerprint"] == before["fingerprint"] and after["state_sha256"] == before["state_sha256"]
        assert after["requests"] - before["requests"] == len(jobs)
        assert after["largest_batch"] > 1, after

    def test_python_client_with_multiplexed_id(self, setup, server):
        from ray import serve

        d, backbone, deltas, images = setup
        handle = serve.get_app_handle("shpeft")
        got = handle.options(multiplexed_model_id=deltas["chaoyang"]).predict.remote(images[2]).result()
        np.testing.assert_allclose(got["probabilities"], _dense_probs(deltas["chaoyang"], images[2]), atol=1e-5, rtol=0)

    def test_errors_are_json_naming_the_delta(self, setup, server, tmp_path):
        d, backbone, deltas, images = setup
        gone = str(tmp_path / "gone.safetensors")
        status, body = _post(server, images[0], gone)
        assert status == 404 and gone in body["error"]

        corrupt = tmp_path / "corrupt.safetensors"
        raw = bytearray(Path(deltas["busi"]).read_bytes())
        raw[-10] ^= 0xFF  # a flipped byte in the tensor data
        corrupt.write_bytes(bytes(raw))
        status, body = _post(server, images[0], str(corrupt))
        assert status == 422 and str(corrupt) in body["error"]

        other = tmp_path / "other"
        other.mkdir()
        import safetensors.torch

        torch.manual_seed(321)  # other base weights: a delta trained on them must be refused
        m = timm.create_model("test_vit", num_classes=3, **KWARGS)
        safetensors.torch.save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(other / "w.safetensors"))
        foreign = _delta(BackboneSpec("test_vit", str(other / "w.safetensors"), KWARGS), other / "busi.safetensors", "busi", 3)
        status, body = _post(server, images[0], foreign)
        assert status == 422 and foreign in body["error"] and "backbone_fingerprint" in body["error"]

        ckpt = tmp_path / "full.checkpoint.safetensors"
        safetensors.torch.save_file({"w": torch.zeros(2)}, str(ckpt), metadata={"shpeft_checkpoint": "shpeft-checkpoint/1"})
        status, body = _post(server, images[0], str(ckpt))
        assert status == 422 and "checkpoint artifact" in body["error"] and "sparse task deltas" in body["error"]

        status, body = _post(server, b"\x89PNG\r\n\x1a\n not really", deltas["busi"])
        assert status == 400 and "request body" in body["error"]
        status, body = _post(server, images[0], None)
        assert status == 400 and "serve_multiplexed_model_id" in body["error"]
        # Failed loads leave the served weights as they were.
        assert _get(server + "/-/backbone")["unchanged"]


def test_one_batch_of_mixed_deltas_is_one_forward_and_writes_nothing(setup):
    """The replica's batch step itself (no Ray): requests for both deltas in one batch, one forward."""
    from orchestrator.serving.server import DeltaServer, state_sha256

    d, backbone, deltas, images = setup
    srv = DeltaServer.func_or_class(backbone, max_deltas=2)
    base_state = state_sha256(srv.model)
    loaded = {t: srv._load(uri) for t, uri in deltas.items()}
    assert state_sha256(srv.model) == base_state  # loading checks a delta without applying it
    forwards = []
    srv.model.register_forward_hook(lambda m, i, o: forwards.append(i[0].shape[0]))
    jobs = [("busi", 0), ("chaoyang", 0), ("chaoyang", 1), ("busi", 2), ("chaoyang", 3), ("busi", 1)]
    out = srv._run_batch([(loaded[t], srv._decode(images[i])) for t, i in jobs])
    assert forwards == [len(jobs)]
    for (task, i), body in zip(jobs, out):
        assert body["task"] == task
        np.testing.assert_allclose(body["probabilities"], _dense_probs(deltas[task], images[i]), atol=1e-5, rtol=0)
    assert state_sha256(srv.model) == base_state  # weights and head bit-identical
    assert srv.stats["most_deltas_in_a_batch"] == 2


def test_serve_cli_refuses_bad_backbone(tmp_path):
    res = CliRunner().invoke(main, ["serve"])
    assert res.exit_code == 2 and "--backbone" in res.output
    res = CliRunner().invoke(main, ["serve", "--backbone", "test_vit", "--backbone-source",
                                    str(tmp_path / "missing.safetensors")])
    assert res.exit_code == 2 and "missing.safetensors" in res.output


# ---------------------------------------------------------------- batch prediction on Ray Data


def _base(backbone: dict) -> list[str]:
    """The weights `shpeft predict` is told to use (a delta never chooses them)."""
    return ["--backbone-source", backbone["source"]]


def _by_key(path: Path) -> dict:
    t = pq.read_table(str(path)).to_pylist()
    return {(r["source"], r["task"]): r for r in t}


def test_batch_predict_folder_matches_predict_files(setup, ray_local, tmp_path):
    d, backbone, deltas, images = setup
    folder = tmp_path / "scans"
    (folder / "sub").mkdir(parents=True)
    paths = []
    for i, data in enumerate(images):
        p = folder / ("sub" if i % 2 else "") / f"img{i}.png"
        p.write_bytes(data)
        paths.append(str(p))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out.parquet"
    args = ["predict", *_base(backbone), "--delta", deltas["busi"], "--delta", deltas["chaoyang"], "--batch-size", "3",
            "--output", str(out), "file://" + str(folder)]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "1 image(s) could not be decoded" in res.output
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out.parquet")] == ["out.parquet"]
    rows = _by_key(out)
    assert len(rows) == (len(images) + 1) * 2
    ref = predict_files(list(deltas.values()), paths, top_k=5, backbone_source=backbone["source"])
    for task, uri in deltas.items():
        for p in paths:
            row = rows[("file://" + p, task)]
            assert row["error"] is None and row["delta"] == uri
            mine = sorted((r for r in ref if r.task == task and r.image == p), key=lambda r: r.label)
            np.testing.assert_allclose(row["probabilities"], [r.probability for r in mine], atol=1e-6)
            assert row["class_name"] == TASKS[task][row["class_index"]]
            assert row["class_index"] == int(np.argmax(row["probabilities"]))
        broken = rows[("file://" + str(folder / "broken.png"), task)]
        assert "broken.png" in broken["error"] and broken["probabilities"] is None and broken["class_index"] is None
    import hashlib

    assert rows[("file://" + paths[0], "busi")]["delta_sha256"] == hashlib.sha256(Path(deltas["busi"]).read_bytes()).hexdigest()


def test_batch_predict_parquet_bytes(setup, ray_local, tmp_path):
    d, backbone, deltas, images = setup
    src = tmp_path / "scans.parquet"
    pq.write_table(pa.table({"name": [f"scan{i}" for i in range(len(images))] + ["bad"],
                             "image": images + [b"not an image"], "label": list(range(len(images) + 1))}), str(src))
    files = []
    for i, data in enumerate(images):
        (tmp_path / f"f{i}.png").write_bytes(data)
        files.append(str(tmp_path / f"f{i}.png"))
    out = tmp_path / "pred.parquet"
    res = CliRunner().invoke(main, ["predict", *_base(backbone), "--delta", deltas["busi"], "--delta", deltas["chaoyang"],
                                    "--id-column", "name", "--output", str(out), str(src)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = _by_key(out)
    assert len(rows) == (len(images) + 1) * 2
    ref = predict_files(list(deltas.values()), files, top_k=5, backbone_source=backbone["source"])
    for task in deltas:
        for i, f in enumerate(files):
            mine = sorted((r for r in ref if r.task == task and r.image == f), key=lambda r: r.label)
            np.testing.assert_allclose(rows[(f"scan{i}", task)]["probabilities"], [r.probability for r in mine], atol=1e-6)
        assert "unreadable image" in rows[("bad", task)]["error"]


def test_batch_predict_parquet_paths(setup, ray_local, tmp_path):
    """A path column: relative values resolve against the Parquet file's folder; a missing file is an error row."""
    d, backbone, deltas, images = setup
    (tmp_path / "img").mkdir()
    for i, data in enumerate(images[:2]):
        (tmp_path / "img" / f"s{i}.png").write_bytes(data)
    pq.write_table(pa.table({"file": ["img/s0.png", "img/s1.png", "img/gone.png"]}), str(tmp_path / "index.parquet"))
    out = tmp_path / "pred.parquet"
    res = CliRunner().invoke(main, ["predict", *_base(backbone), "--delta", deltas["busi"], "--column", "file", "--output", str(out),
                                    str(tmp_path / "index.parquet")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = _by_key(out)
    assert set(rows) == {("img/s0.png", "busi"), ("img/s1.png", "busi"), ("img/gone.png", "busi")}
    ref = predict_files([deltas["busi"]], [str(tmp_path / "img" / "s1.png")], top_k=3,
                         backbone_source=backbone["source"])
    np.testing.assert_allclose(rows[("img/s1.png", "busi")]["probabilities"],
                               [r.probability for r in sorted(ref, key=lambda r: r.label)], atol=1e-6)
    assert "gone.png" in rows[("img/gone.png", "busi")]["error"]


def test_resolve_input_on_fsspec_prefixes(setup):
    """What an input is, listed through fsspec (memory:// here; s3://, gs:// the same way)."""
    import fsspec

    from orchestrator.serving.batch_predict import needs_dataset, resolve_input
    from orchestrator.serving.predict import PredictError

    d, backbone, deltas, images = setup
    fs = fsspec.filesystem("memory")
    for i, data in enumerate(images):
        fs.pipe(f"/scans-{id(images)}/a/{i}.png", data)
    fs.pipe(f"/scans-{id(images)}/notes.txt", b"not an image")
    src = resolve_input([f"memory://scans-{id(images)}"])
    assert src.kind == "images" and src.remote and len(src.files) == len(images)
    assert src.source(src.files[0]).startswith("memory://") and src.files[0].endswith(".png")
    assert needs_dataset([f"memory://scans-{id(images)}"]) and not needs_dataset([str(d / "busi.safetensors")])
    buf = io.BytesIO()
    pq.write_table(pa.table({"img": images, "id": list(range(len(images)))}), buf)
    fs.pipe(f"/tab-{id(images)}/part-0.parquet", buf.getvalue())
    src = resolve_input([f"memory://tab-{id(images)}"], column="img")
    assert (src.kind, src.column_kind, src.id_column) == ("parquet", "bytes", "id")
    with pytest.raises(PredictError, match="'image'.*--column"):
        resolve_input([f"memory://tab-{id(images)}"])
    with pytest.raises(PredictError, match="does not exist"):
        resolve_input(["memory://nowhere-at-all"])


def test_batch_predict_refuses_before_work(setup, tmp_path):
    d, backbone, deltas, images = setup
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(images[0])
    corrupt = tmp_path / "corrupt.safetensors"
    raw = bytearray(Path(deltas["busi"]).read_bytes())
    raw[-10] ^= 0xFF
    corrupt.write_bytes(bytes(raw))
    out = tmp_path / "o.parquet"
    res = CliRunner().invoke(main, ["predict", *_base(backbone), "--delta", str(corrupt), "--output", str(out), str(folder)])
    assert res.exit_code == 2 and "corrupt.safetensors" in res.output and not out.exists()
    res = CliRunner().invoke(main, ["predict", *_base(backbone), "--delta", deltas["busi"], str(folder)])
    assert res.exit_code == 2 and "--output" in res.output
    lora = tmp_path / "run.lora"  # a LoRA artifact from `shpeft compare`: said what it is, not "unreadable"
    lora.mkdir()
    (lora / "adapter_config.json").write_text("{}")
    res = CliRunner().invoke(main, ["predict", *_base(backbone), "--delta", str(lora), "--output", str(out), str(folder)])
    assert res.exit_code == 2 and "run.lora is a lora artifact" in res.output
    res = CliRunner().invoke(main, ["predict", *_base(backbone), "--delta", deltas["busi"], "--output", str(out), str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "nothing" in res.output
    pq.write_table(pa.table({"x": [1]}), str(tmp_path / "t.parquet"))
    res = CliRunner().invoke(main, ["predict", *_base(backbone), "--delta", deltas["busi"], "--output", str(out), str(tmp_path / "t.parquet")])
    assert res.exit_code == 2 and "'image'" in res.output and "--column" in res.output
    assert not out.exists()
