"""Serving cost of deltas on one backbone vs a dense merged model.

The replica's own batch step (orchestrator.serving.server.DeltaServer, no HTTP) on batches of B requests:
  dense     - the delta merged into a plain model (merge_delta), one forward per batch
  1 delta   - every request for one delta: one apply, forward, remove per batch
  4 deltas  - requests interleaved over 4 deltas: four groups of B/4 per batch
With --http, the same through Ray Serve on loopback (concurrent clients, requests/s).

    python bench/serve.py [--smoke-test] [--backbone vit_small_patch16_224] [--batch 16] [--threads T] [--http]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from orchestrator.serving.server import DeltaServer
from shpeft_core.backbone import BackboneSpec, create_backbone, head_parameter_names
from shpeft_core.delta import extract_delta, load_delta, merge_delta, save_delta
from shpeft_core.eligibility import eligible_parameters
from shpeft_core.selection import select_mask
from shpeft_core.sparse import apply_sparse_training


def make_delta(spec: BackboneSpec, path: str, task: str, density: float, seed: int) -> str:
    gen = torch.Generator().manual_seed(seed)
    model = create_backbone(spec, 4)
    scores = {n: torch.rand(p.shape, generator=gen) for n, p in eligible_parameters(model).items()}
    apply_sparse_training(model, select_mask(scores, density, "global"))
    heads = set(head_parameter_names(model))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".values") or name in heads:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    meta = {"alpha": "0.5", "estimator": "grad2", "importance_key": task, "task": task}
    save_delta(extract_delta(model, metadata=meta), path)
    return path


def png(rng, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def in_process(backbone: dict, deltas: list[str], images: list[bytes], batch: int, repeats: int) -> dict:
    """Images/s per mode (median over rounds that alternate the modes, so load changes hit all alike),
    and the cost of one apply + remove."""
    from shpeft_core.delta import apply_delta

    srv = DeltaServer.func_or_class(backbone, max_deltas=len(deltas))
    loaded = [srv._load(u) for u in deltas]
    xs = [srv._decode(images[i % len(images)]) for i in range(batch)]
    dense = merge_delta(load_delta(deltas[0])).eval()
    x = torch.stack(xs)

    def run_dense():
        with torch.no_grad():
            dense(x).softmax(-1)

    modes = {"dense": run_dense,
             "1 delta": lambda: srv._run_groups([loaded[0]] * batch, xs),
             "4 deltas": lambda: srv._run_groups([loaded[i % 4] for i in range(batch)], xs)}
    times: dict[str, list[float]] = {k: [] for k in modes}
    for fn in modes.values():  # warm-up
        fn()
    for _ in range(repeats):
        for k, fn in modes.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    swaps = []
    for _ in range(20):
        t0 = time.perf_counter()
        apply_delta(srv.model, loaded[0].delta, check_fingerprint=False).remove()
        swaps.append(time.perf_counter() - t0)
    out = {k: batch / float(np.median(v)) for k, v in times.items()}
    return out, float(np.median(swaps)), sum(v.numel() for v in loaded[0].delta.values.values())


def over_http(backbone: dict, deltas: list[str], images: list[bytes], requests: int, clients: int) -> dict:
    import socket
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    import ray
    from ray import serve

    from orchestrator.serving.server import build_app, start

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = start(build_app(backbone, max_deltas=len(deltas), max_batch_size=16), port=port)

    def post(i_uri):
        i, uri = i_uri
        req = urllib.request.Request(url, data=images[i % len(images)], method="POST",
                                     headers={"serve_multiplexed_model_id": uri})
        with urllib.request.urlopen(req, timeout=120) as r:
            json.loads(r.read())

    res = {}
    try:
        for label, uris in (("1 delta", deltas[:1]), ("4 deltas", deltas[:4])):
            jobs = [(i, uris[i % len(uris)]) for i in range(requests)]
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(post, jobs[:clients]))  # warm-up: every delta loaded
                t0 = time.perf_counter()
                list(pool.map(post, jobs))
            res[label] = requests / (time.perf_counter() - t0)
    finally:
        serve.shutdown()
        ray.shutdown()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke-test", action="store_true", help="test_vit at 32 px, a few repeats")
    ap.add_argument("--backbone", default="vit_small_patch16_224", help="timm name (random init)")
    ap.add_argument("--density", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in this process")
    ap.add_argument("--http", action="store_true", help="also through Ray Serve on loopback")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    name, kwargs, size = args.backbone, {}, 224
    if args.smoke_test:
        name, kwargs, size, args.repeats, args.requests = "test_vit", {"img_size": 32}, 32, 2, 16
    torch.set_num_threads(max(1, args.threads))
    spec = BackboneSpec(name, None, kwargs)
    backbone = {"name": name, "source": None, "kwargs": kwargs}
    rng = np.random.default_rng(0)
    images = [png(rng, size) for _ in range(8)]
    with tempfile.TemporaryDirectory() as tmp:
        deltas = [make_delta(spec, os.path.join(tmp, f"t{i}.safetensors"), f"t{i}", args.density, i) for i in range(4)]
        print(f"# {name} {kwargs or ''} density {args.density}, batch {args.batch}; torch {torch.__version__}, "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
        res, swap, k = in_process(backbone, deltas, images, args.batch, args.repeats)
        print("| replica batch step | images/s | vs dense |\n|---|---|---|")
        for key, v in res.items():
            print(f"| {key} | {v:.1f} | {v / res['dense']:.2f} |")
        print(f"\napply + remove of one delta ({k} values, head swap included): {swap * 1e3:.2f} ms; "
              f"one dense batch of {args.batch}: {args.batch / res['dense'] * 1e3:.0f} ms")
        if args.http:
            res = over_http(backbone, deltas, images, args.requests, args.clients)
            print(f"\n| HTTP, {args.clients} clients | requests/s |\n|---|---|")
            for k, v in res.items():
                print(f"| {k} | {v:.1f} |")


if __name__ == "__main__":
    main()
