"""`shpeft serve` and `shpeft predict` against a client or a file that means harm (or is just unlucky).

The replica is exercised in-process (``DeltaServer.func_or_class``: the same code a Serve replica runs,
without Ray). Crafted deltas are written with ``_st.write``, the writer shpeft uses, so their self-checksum
is valid: only validation stands between them and the served weights. Deterministic and quick: the stalled
remote read is a loopback socket that never answers, with a 1 s limit.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import pickle
import socket
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from helpers_orch import random_delta, write_seeded_backbone
from orchestrator.cli.main import main
from shpeft_core import _st
from shpeft_core.backbone import BackboneSpec, backbone_fingerprint, create_backbone
from shpeft_core.delta import DeltaError, load_delta, merge_delta

KWARGS = {"img_size": 32}
CLASSES = {"busi": ["benign", "malignant", "normal"], "chaoyang": ["a", "b", "c", "d", "e"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    weights = write_seeded_backbone(str(d / "base.safetensors"), KWARGS)
    spec = BackboneSpec("test_vit", str(weights), KWARGS)
    root = d / "deltas"
    root.mkdir()
    good = {t: random_delta(spec, root / f"{t}.safetensors", t, names, seed=i + 1, density=0.02, scale=0.3)
            for i, (t, names) in enumerate(CLASSES.items())}
    evil = _evil(root / "evil.safetensors", good["busi"], create_backbone(spec, 3))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    backbone = {"name": "test_vit", "source": str(weights), "kwargs": KWARGS}
    return d, root, backbone, good, evil, buf.getvalue()


def _evil(path: Path, good, model) -> str:
    """Finding 1: a head of another class count plus a backbone weight carried under a 'head' key."""
    qkv = model.blocks[0].attn.qkv.weight
    n = 5
    head = {"head.weight": torch.randn(n, good.head["head.weight"].shape[1]), "head.bias": torch.zeros(n),
            "blocks.0.attn.qkv.weight": torch.zeros_like(qkv)}
    meta = {**good.metadata, "num_classes": str(n), "class_names": json.dumps(list("vwxyz")), "task": "evil"}
    tensors = {**{f"{k}.indices": v for k, v in good.indices.items()},
               **{f"{k}.values": v for k, v in good.values.items()}, **head}
    _st.write(str(path), tensors, meta)
    return str(path)


def _crafted(path: Path, good, **changes) -> str:
    meta = {**good.metadata, **changes.pop("metadata", {})}
    tensors = {**{f"{k}.indices": v for k, v in good.indices.items()},
               **{f"{k}.values": v for k, v in good.values.items()}, **good.head, **changes.pop("tensors", {})}
    for k in changes.pop("drop", ()):
        tensors.pop(k)
    _st.write(str(path), tensors, meta)
    return str(path)


def _server(backbone, **kw):
    import inspect

    from orchestrator.serving.server import DeltaServer

    cls = DeltaServer.func_or_class
    accepted = inspect.signature(cls.__init__).parameters  # (so these tests also run against older replicas)
    kw = {k: v for k, v in {"backbone_check_s": 0, **kw}.items() if k in accepted}
    return cls(backbone, max_deltas=4, **kw)


def _dense(uri: str, backbone: dict, data: bytes) -> np.ndarray:
    from orchestrator.serving.predict import decode_image_bytes
    from tasks.transforms import transform_for

    model = merge_delta(load_delta(uri), create_backbone(BackboneSpec("test_vit", backbone["source"], KWARGS), 3)).eval()
    with torch.no_grad():
        x = transform_for(model, train=False)(decode_image_bytes(data, "ref"))[None]
        return model(x).double().softmax(-1)[0].numpy()


def _status(fn):
    from orchestrator.serving.server import ServeError

    try:
        fn()
    except ServeError as exc:
        return exc.status, str(exc)
    return 200, ""


# ---------------------------------------------------------------- the replica


def test_crafted_delta_is_refused_at_load_and_others_keep_their_answers(setup):
    d, root, backbone, good, evil, png = setup
    srv = _server(backbone, delta_root=str(root))
    status, msg = _status(lambda: srv._load("evil.safetensors"))
    assert status == 422 and "blocks.0.attn.qkv.weight" in msg and "evil.safetensors" in msg
    busi = srv._load("busi.safetensors")
    out = srv._run_batch([(busi, srv._decode(png))])
    np.testing.assert_allclose(out[0]["probabilities"], _dense(str(root / "busi.safetensors"), backbone, png),
                               atol=1e-6, rtol=0)
    check = srv.check_backbone()
    assert check["fingerprint"] == srv.base.metadata["backbone_fingerprint"] and srv.info()["unchanged"]


@pytest.mark.parametrize("case", ["nan", "num_classes_1e9", "sparse_at_norm"])
def test_deltas_that_lie_about_sizes_or_values_are_refused(setup, tmp_path, case):
    d, root, backbone, good, evil, png = setup
    g = good["busi"]
    name = sorted(g.indices)[0]
    if case == "nan":
        vals = g.values[name].clone()
        vals[0] = float("nan")
        uri = _crafted(root / "nan.safetensors", g, tensors={f"{name}.values": vals})
    elif case == "num_classes_1e9":
        uri = _crafted(root / "huge.safetensors", g, metadata={"num_classes": str(10**9)},
                       drop=("head.weight", "head.bias"))
    else:
        uri = _crafted(root / "norm.safetensors", g, tensors={"norm.weight.indices": torch.tensor([0], dtype=torch.int32),
                                                               "norm.weight.values": torch.ones(1)})
    srv = _server(backbone, delta_root=str(root))
    status, msg = _status(lambda: srv._load(os.path.basename(uri)))
    assert status == 422 and os.path.basename(uri) in msg and "\n" not in msg


def test_symlinks_cannot_leave_the_delta_root(setup, tmp_path):
    d, root, backbone, good, evil, png = setup
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "busi.safetensors").write_bytes((root / "busi.safetensors").read_bytes())
    served = tmp_path / "served"
    served.mkdir()
    os.symlink(outside, served / "escape")
    os.symlink("/", served / "rootlink")
    srv = _server(backbone, delta_root=str(served))
    for uri in ("escape/busi.safetensors", "rootlink/etc/passwd", "rootlink/etc/no-such-file",
                "../outside/busi.safetensors", str(outside / "busi.safetensors")):
        status, msg = _status(lambda: srv._load(uri))
        # the same answer whether the file exists or not: nothing outside the root can be probed
        assert status == 403 and "outside the served delta root" in msg, (uri, status, msg)
    os.symlink(root / "busi.safetensors", served / "inside-link.safetensors")  # a link to another root: refused
    assert _status(lambda: srv._load("inside-link.safetensors"))[0] == 403
    assert _status(lambda: srv._load("missing.safetensors"))[0] == 404


def test_a_fifo_under_the_root_is_refused_without_blocking(setup, tmp_path):
    d, root, backbone, good, evil, png = setup
    served = tmp_path / "served"
    served.mkdir()
    os.mkfifo(served / "stuck.safetensors")
    srv = _server(backbone, delta_root=str(served))
    got = {}
    t = threading.Thread(target=lambda: got.update(r=_status(lambda: srv._load("stuck.safetensors"))), daemon=True)
    t.start()
    t.join(20)
    try:
        assert not t.is_alive(), "a FIFO under the delta root blocked the load"
        status, msg = got["r"]
        assert status == 422 and "FIFO" in msg
    finally:
        if t.is_alive():
            os.close(os.open(served / "stuck.safetensors", os.O_WRONLY | os.O_NONBLOCK))


def test_a_stalled_remote_delta_times_out_and_holds_no_other_load(setup):
    from orchestrator.serving.server import ServeError

    d, root, backbone, good, evil, png = setup
    srv = _server(backbone, load_timeout_s=1.0)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        async def both():
            stalled = f"http://127.0.0.1:{sock.getsockname()[1]}/busi.safetensors"
            with pytest.raises(ServeError) as info:
                await srv._load_with_timeout(stalled)
            # the read's own limit or the load's, whichever ends first: both say so with a 504
            assert info.value.status == 504 and stalled in str(info.value) and "within 1 s" in str(info.value)
            return await srv._load_with_timeout(str(root / "busi.safetensors"))

        loaded = asyncio.run(asyncio.wait_for(both(), 30))
        assert loaded.task == "busi"
    finally:
        sock.close()


def test_backbone_info_is_cached_and_a_changed_replica_leaves_service(setup, caplog, monkeypatch):
    import orchestrator.serving.server as server_mod
    import shpeft_core.backbone as backbone_mod

    d, root, backbone, good, evil, png = setup
    srv = _server(backbone, delta_root=str(root))
    busi = srv._load("busi.safetensors")

    def no_hash(*a, **k):
        raise AssertionError("GET /-/backbone hashed the model")

    with monkeypatch.context() as m:  # the route only reads the cache: any client may call it
        m.setattr(backbone_mod, "backbone_fingerprint", no_hash)
        m.setattr(server_mod, "state_sha256", no_hash)
        info = srv.info()
    assert info["unchanged"] and info["in_service"]
    with torch.no_grad():
        srv.model.blocks[0].mlp.fc1.weight[0, 0] += 1.0  # what a lost undo would leave behind
    with caplog.at_level(logging.ERROR, logger="shpeft.serve"):
        srv.check_backbone()
        srv.check_backbone()
    lines = [r.getMessage() for r in caplog.records if "out of service" in r.getMessage()]
    assert len(lines) == 1 and "backbone weights changed" in lines[0]
    assert not srv.info()["unchanged"] and not srv.info()["in_service"]
    with pytest.raises(RuntimeError, match="out of service"):
        srv.check_health()
    status, msg = _status(lambda: srv._run_batch([(busi, srv._decode(png))]))
    assert status == 503 and "out of service" in msg


def test_a_batch_of_crafted_and_good_deltas_leaves_the_served_weights_bit_identical(setup):
    from orchestrator.serving.server import state_sha256

    d, root, backbone, good, evil, png = setup
    srv = _server(backbone, delta_root=str(root))
    before = state_sha256(srv.model)
    busi = srv._load("busi.safetensors")
    status, _ = _status(lambda: srv._load("evil.safetensors"))
    assert status == 422
    out = srv._run_batch([(busi, srv._decode(png)), (busi, srv._decode(png))])
    assert out[0]["probabilities"] == out[1]["probabilities"]
    assert state_sha256(srv.model) == before
    assert srv.check_backbone()["state_sha256"] == before and srv.info()["in_service"]


def _png_bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(1 << 16))) + chunk(b"IEND", b""))


def _request(body: bytes, declared: int | None = None):
    from starlette.requests import Request

    chunks = [body[i:i + 4096] for i in range(0, len(body), 4096)] or [b""]

    async def receive():
        data = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": data, "more_body": bool(chunks)}

    headers = [(b"content-length", str(len(body) if declared is None else declared).encode())]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers, "query_string": b""}, receive)


def test_request_bodies_are_bounded_and_errors_are_json(setup, monkeypatch):
    d, root, backbone, good, evil, png = setup
    srv = _server(backbone, max_body_bytes=10_000)
    resp = asyncio.run(srv(_request(b"x" * 20_000)))
    assert resp.status_code == 413 and "over the limit" in json.loads(resp.body)["error"]
    resp = asyncio.run(srv(_request(b"x" * 20_000, declared=100)))  # a content-length that lies
    assert resp.status_code == 413
    status, msg = _status(lambda: srv._decode(_png_bomb(27000, 27000)))
    assert status == 400 and "request body" in msg and "over the limit" in msg

    async def broken(image):
        raise RuntimeError("something unexpected")

    monkeypatch.setattr(srv, "predict", broken)
    resp = asyncio.run(srv(_request(png)))
    assert resp.status_code == 500 and json.loads(resp.body) == {"error": "internal error: RuntimeError: something unexpected"}


# ---------------------------------------------------------------- shpeft predict (a few files)


def test_predict_with_a_crafted_delta_between_good_ones(setup, tmp_path):
    from orchestrator.serving.predict import task_logits
    from tasks.transforms import transform_for

    d, root, backbone, good, evil, png = setup
    img = tmp_path / "scan.png"
    img.write_bytes(png)
    base = ["--backbone-source", backbone["source"]]
    res = CliRunner().invoke(main, ["predict", *base, "--delta", str(root / "busi.safetensors"), "--delta", evil,
                                    "--delta", str(root / "chaoyang.safetensors"), "--json", str(img)])
    assert res.exit_code == 2 and "evil.safetensors" in res.output and "blocks.0.attn.qkv.weight" in res.output
    assert "{" not in res.output  # nothing predicted, nothing half-printed
    # The Python API: the crafted delta is refused before it is applied; the model is as it was.
    model = create_backbone(BackboneSpec("test_vit", backbone["source"], KWARGS), 3).eval()
    fp = backbone_fingerprint(model)
    x = transform_for(model, train=False)(Image.open(io.BytesIO(png)).convert("RGB"))[None]
    alone = task_logits(model, [good["chaoyang"]], x)[0]
    with pytest.raises(DeltaError):
        task_logits(model, [good["busi"], load_delta(evil), good["chaoyang"]], x)
    assert backbone_fingerprint(model) == fp
    torch.testing.assert_close(task_logits(model, [good["chaoyang"]], x)[0], alone, rtol=0, atol=0)


def test_predict_device_and_backbone_source_errors_are_one_line(setup, tmp_path):
    d, root, backbone, good, evil, png = setup
    img = tmp_path / "scan.png"
    img.write_bytes(png)
    delta = ["--delta", str(root / "busi.safetensors"), str(img)]
    base = ["--backbone-source", backbone["source"]]
    cases = [(["--device", "bogus", *base], "not a torch device")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda", *base], "no CUDA GPU"))
    pickled = tmp_path / "weights.pth"
    with open(pickled, "wb") as f:
        pickle.dump({"w": object()}, f)
    cases.append((["--backbone-source", str(pickled)], "weights.pth"))
    cases.append(([], "--backbone-source"))  # the delta names a file: not read on its say-so
    for extra, needle in cases:
        res = CliRunner().invoke(main, ["predict", *extra, *delta])
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], (extra, res.output)
        assert "Traceback" not in res.output


def test_backbone_named_by_a_delta_is_never_read(setup, tmp_path):
    """A delta whose metadata points the backbone at another file: that file is never opened."""
    from orchestrator.serving.predict import PredictError, configured_source

    d, root, backbone, good, evil, png = setup
    g = good["busi"]
    uri = _crafted(tmp_path / "elsewhere.safetensors", g, metadata={"backbone_source": "/etc/shadow.safetensors"})
    with pytest.raises(PredictError, match="never chooses which file is read"):
        configured_source(load_delta(uri), None, uri)
    assert configured_source(load_delta(uri), backbone["source"], uri) == backbone["source"]
    hub = _crafted(tmp_path / "hub.safetensors", g, metadata={"backbone_source": "hub"})
    assert configured_source(load_delta(hub), None, hub) == "hub"  # names no file: the user's timm hub


# ---------------------------------------------------------------- shpeft predict over Parquet (Ray Data)


class _Logged(threading.Thread):
    """A loopback HTTP server that records every request it gets and answers with a PNG."""

    def __init__(self, png: bytes):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                seen.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

            do_HEAD = do_GET

            def log_message(self, *a):
                pass

        super().__init__(daemon=True)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def run(self):
        self.httpd.serve_forever()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.ray
def test_parquet_paths_name_data_not_hosts(setup, ray_local, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d, root, backbone, good, evil, png = setup
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    (data / "img" / "ok.png").write_bytes(png)
    secret = tmp_path / "secret.png"  # outside the data root
    secret.write_bytes(png)
    os.symlink(tmp_path, data / "up")
    server = _Logged(png)
    server.start()
    try:
        values = ["img/ok.png", "../secret.png", str(secret), "up/secret.png", "../no-such.png",
                  f"{server.url}/x.png"]
        pq.write_table(pa.table({"file": values}), str(data / "index.parquet"))
        out = tmp_path / "pred.parquet"
        args = ["predict", "--backbone-source", backbone["source"], "--delta", str(root / "busi.safetensors"),
                "--column", "file", "--output", str(out), str(data / "index.parquet")]
        res = CliRunner().invoke(main, args, catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert res.output.count("\n") == 1, res.output  # our one line; none of Ray's own
        rows = {r["source"]: r for r in pq.read_table(str(out)).to_pylist()}
        assert rows["img/ok.png"]["error"] is None
        np.testing.assert_allclose(rows["img/ok.png"]["probabilities"],
                                   _dense(str(root / "busi.safetensors"), backbone, png), atol=1e-6)
        for v in values[1:5]:
            err = rows[v]["error"]
            assert "outside the data root" in err, (v, err)
            assert "no such" not in err.lower() and "bytes" not in err and "exist" not in err  # nothing disclosed
        assert "--allow-urls" in rows[values[5]]["error"]
        assert server.seen == []  # the URL was never requested
        # Opted in (--allow-urls): the URL is read; the files outside the root still are not. The same row
        # reader the Ray Data actors run, called directly.
        from types import SimpleNamespace

        from orchestrator.serving.batch_predict import _Predictor, resolve_input

        src = resolve_input([str(data / "index.parquet")], column="file", allow_urls=True)
        reader = SimpleNamespace(src=src)
        _, got, err = _Predictor._image(reader, values[5], None)
        assert err is None and got == png and set(server.seen) == {"/x.png"}
        _, got, err = _Predictor._image(reader, str(secret), None)
        assert got is None and "outside the data root" in err
    finally:
        server.stop()


def test_parquet_inputs_are_all_checked_before_any_work(setup, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d, root, backbone, good, evil, png = setup
    base = ["predict", "--backbone-source", backbone["source"], "--delta", str(root / "busi.safetensors")]
    folder = tmp_path / "tab"
    folder.mkdir()
    pq.write_table(pa.table({"image": [png]}), str(folder / "part-0.parquet"))
    pq.write_table(pa.table({"image": [png]}), str(folder / "part-1.parquet"))
    raw = (folder / "part-1.parquet").read_bytes()
    (folder / "part-1.parquet").write_bytes(raw[: len(raw) // 2])  # cut in half
    out = tmp_path / "o.parquet"
    res = CliRunner().invoke(main, [*base, "--output", str(out), str(folder)])
    assert res.exit_code == 2 and "part-1.parquet: unreadable Parquet" in res.output and not out.exists()
    pq.write_table(pa.table({"other": [1]}), str(folder / "part-1.parquet"))
    res = CliRunner().invoke(main, [*base, "--output", str(out), str(folder)])
    assert res.exit_code == 2 and "part-1.parquet: no column 'image'" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    pq.write_table(pa.table({"image": pa.array([], pa.binary())}), str(empty / "part-0.parquet"))
    res = CliRunner().invoke(main, [*base, "--output", str(out), str(empty)])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "no rows to predict" in lines[0] and ".tmp-" not in res.output
    assert not out.exists()


def test_serve_and_run_with_a_pickle_as_backbone_weights_exit_2(setup, tmp_path):
    d, root, backbone, good, evil, png = setup
    pickled = tmp_path / "weights.pth"
    with open(pickled, "wb") as f:
        pickle.dump({"w": object()}, f)
    res = CliRunner().invoke(main, ["serve", "--backbone", "test_vit", "--backbone-source", str(pickled)])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "weights.pth" in lines[0], res.output
    (tmp_path / "data").mkdir()
    job = {"backbone": {"name": "test_vit", "source": str(pickled), "kwargs": KWARGS}, "store": str(tmp_path / "s"),
           "tasks": [{"name": "t", "source": str(tmp_path / "data"), "format": "imagefolder", "num_classes": 2}]}
    from orchestrator.workflows.run import preflight
    from orchestrator.job.spec import JobSpecError
    from orchestrator.job.load import parse_job

    with pytest.raises(JobSpecError, match=r"backbone\.source: backbone weights .*weights\.pth.* cannot be loaded"):
        preflight(parse_job(job))
