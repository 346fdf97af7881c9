"""Serving cost of many task deltas on one backbone: the dense merged model, the grouped apply/remove
path and the mixed-task forward, in one process, on the same backbone weights and the same batches.

Per batch of B requests interleaved over T deltas (request i names delta i % T):
  dense    - one delta merged into a plain model (merge_delta), one forward per batch: what one task
             alone costs, the ceiling
  grouped  - the batch split by delta; each group's delta applied in place (apply_delta), the group
             run, the delta removed: what the replica did before the mixed forward
  mixed    - the Serve replica's own batch step (DeltaServer._run_batch, no HTTP): one mixed-task
             forward for the whole batch
Rounds alternate the modes, so load changes hit all alike; medians. The mixed forward's candidate
kernels (shpeft_core.mixed.MIXED_PATH forced to gather or csr, against the per-layer rule) are timed
on the 8-task batch of the largest size, and per layer against the frozen product and a merged
weight (W + delta materialised, the per-group alternative). With --http, the same through Ray Serve
on loopback (concurrent clients, requests/s).

The last line printed is one JSON object {"mixed": {"tasks": 8, "batch": 64, "ratio_vs_dense": X,
"ratio_vs_grouped": Y}} (throughput ratios of the mixed forward, higher is better).

    python bench/serve.py [--smoke-test] [--backbone vit_small_patch16_224] [--batches 64,16] [--threads T]
                          [--device cuda] [--http]
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
import torch.nn.functional as F
from PIL import Image

import shpeft_core.mixed as mixed_mod
from orchestrator.serving.server import DeltaServer
from shpeft_core.backbone import BackboneSpec, create_backbone, head_parameter_names
from shpeft_core.delta import apply_delta, extract_delta, load_delta, merge_delta, save_delta
from shpeft_core.eligibility import eligible_parameters
from shpeft_core.selection import select_mask
from shpeft_core.sparse import apply_sparse_training

TASKS = (1, 2, 8)


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


def grouped_step(model, requests, device) -> list[torch.Tensor]:
    """Today's grouped path: per delta in the batch, apply in place, run its rows, remove."""
    groups: dict[int, list[int]] = {}
    for i, (ld, _) in enumerate(requests):
        groups.setdefault(id(ld), []).append(i)
    out: list[torch.Tensor] = [None] * len(requests)
    with torch.no_grad():
        for rows in groups.values():
            ld = requests[rows[0]][0]
            with apply_delta(model, ld.delta, check_fingerprint=False):
                x = torch.stack([requests[i][1] for i in rows]).to(device)
                probs = model(x).double().softmax(-1).cpu()
            for r, p in zip(rows, probs):
                out[r] = p
    return out


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(modes: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each mode, rounds alternating the modes after one warm-up round."""
    times: dict[str, list[float]] = {k: [] for k in modes}
    for fn in modes.values():
        fn()
    for _ in range(repeats):
        for k, fn in modes.items():
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def in_process(backbone: dict, spec: BackboneSpec, deltas: list[str], images: list[bytes], batches: list[int],
               repeats: int, device: str) -> tuple[dict, dict]:
    """images/s per (batch, mode, tasks), and the candidate kernels' images/s on the widest mix."""
    srv = DeltaServer.func_or_class(backbone, max_deltas=len(deltas), device=device)
    loaded = [srv._load(u) for u in deltas]
    plain = create_backbone(spec, 1).to(device).eval()
    dense = merge_delta(load_delta(deltas[0])).to(device).eval()
    results: dict = {}
    candidates: dict = {}
    for batch in batches:
        xs = [srv._decode(images[i % len(images)]) for i in range(batch)]
        x = torch.stack(xs)
        modes = {("dense", 1): lambda: dense(x.to(device)).double().softmax(-1).cpu()}
        for t in TASKS:
            reqs = [(loaded[i % t], xs[i]) for i in range(batch)]
            modes[("grouped", t)] = (lambda r: lambda: grouped_step(plain, r, device))(reqs)
            modes[("mixed", t)] = (lambda r: lambda: srv._run_batch(r))(reqs)
        widest = [(loaded[i % max(TASKS)], xs[i]) for i in range(batch)]
        if batch == max(batches):
            # A prepared delta carries its kernel choice (its CSR form or none): prepare again per forced path.
            forced = {}
            for path in mixed_mod.MIXED_PATHS:
                mixed_mod.MIXED_PATH = path
                forced[path] = [(type(ld)(ld.uri, ld.delta, ld.task, ld.class_names, ld.sha256,
                                          srv.mixed.prepare(ld.delta, check_fingerprint=False)), xx)
                                for ld, xx in widest]
            mixed_mod.MIXED_PATH = None
            for path, reqs in forced.items():
                modes[(f"mixed, {path} only", max(TASKS))] = (lambda r: lambda: srv._run_batch(r))(reqs)
        with torch.no_grad():
            secs = timed(modes, repeats)
        for key, s in secs.items():
            (candidates if "only" in key[0] else results)[(batch,) + key] = batch / s
        if batch == max(batches):
            candidates[(batch, "mixed, per-layer rule", max(TASKS))] = results[(batch, "mixed", max(TASKS))]
    return results, candidates


def layer_table(spec: BackboneSpec, delta_uri: str, tokens: int, repeats: int, device: str) -> list[tuple]:
    """Per layer: the frozen product of one task's rows, and each way to add that task's delta to it."""
    model = create_backbone(spec, 1).to(device).eval()
    mixed = mixed_mod.MixedTaskModel(model)
    prepared = mixed.prepare(load_delta(delta_uri), check_fingerprint=False)
    rows = []
    picked = [p for p in prepared.layers if p.endswith(("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))][:4]
    for path in picked:
        mod, ld = mixed.layers[path], prepared.layers[path]
        x = torch.randn(tokens, mod.in_features, device=device)
        w = mod.weight.detach()
        y = F.linear(x, w, mod.bias)
        flat = ld.rows * mod.in_features + ld.cols
        csr = mixed_mod._csr(ld.rows, ld.cols, ld.values, (mod.out_features, mod.in_features))
        gather = mixed_mod.LayerDelta(ld.rows, ld.cols, ld.values)
        sparse = mixed_mod.LayerDelta(ld.rows, ld.cols, ld.values, csr)
        fns = {
            "frozen product": lambda: F.linear(x, w, mod.bias),
            "gather": lambda: mixed_mod._linear_correction(x, y, gather),
            "csr": lambda: mixed_mod._linear_correction(x, y, sparse),
            "merged weight": lambda: F.linear(x, w.reshape(-1).index_add(0, flat, ld.values).view_as(w), mod.bias),
        }
        secs = timed(fns, repeats)
        rows.append((path, tuple(w.shape), ld.values.numel(), mixed_mod.linear_path(
            ld.values.numel(), mod.in_features, mod.out_features, w.dtype), secs))
    mixed.close()
    return rows


def over_http(backbone: dict, deltas: list[str], images: list[bytes], requests: int, clients: int,
              batch: int) -> dict:
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
    url = start(build_app(backbone, max_deltas=len(deltas), max_batch_size=batch), port=port)

    def post(i_uri):
        i, uri = i_uri
        req = urllib.request.Request(url, data=images[i % len(images)], method="POST",
                                     headers={"serve_multiplexed_model_id": uri})
        with urllib.request.urlopen(req, timeout=300) as r:
            json.loads(r.read())

    res = {}
    try:
        for t in (1, max(TASKS)):
            jobs = [(i, deltas[i % t]) for i in range(requests)]
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(post, jobs[:clients]))  # warm-up: every delta loaded
                t0 = time.perf_counter()
                list(pool.map(post, jobs))
            res[t] = requests / (time.perf_counter() - t0)
    finally:
        serve.shutdown()
        ray.shutdown()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke-test", action="store_true", help="test_vit at 32 px, a few repeats")
    ap.add_argument("--backbone", default="vit_small_patch16_224", help="timm name (random init)")
    ap.add_argument("--density", type=float, default=1e-3)
    ap.add_argument("--batches", default="64,16", help="batch sizes, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in this process")
    ap.add_argument("--device", default="cpu", help="torch device of the replica and the baselines, e.g. cuda")
    ap.add_argument("--http", action="store_true", help="also through Ray Serve on loopback")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--clients", type=int, default=32)
    args = ap.parse_args()
    name, kwargs, size = args.backbone, {}, 224
    if args.smoke_test:
        name, kwargs, size, args.repeats, args.requests, args.clients = "test_vit", {"img_size": 32}, 32, 2, 32, 8
    batches = sorted({int(b) for b in args.batches.split(",") if b}, reverse=True)
    torch.set_num_threads(max(1, args.threads))
    spec = BackboneSpec(name, None, kwargs)
    backbone = {"name": name, "source": None, "kwargs": kwargs}
    rng = np.random.default_rng(0)
    images = [png(rng, size) for _ in range(8)]
    with tempfile.TemporaryDirectory() as tmp:
        deltas = [make_delta(spec, os.path.join(tmp, f"t{i}.safetensors"), f"t{i}", args.density, i)
                  for i in range(max(TASKS))]
        k = sum(v.numel() for v in load_delta(deltas[0]).values.values())
        print(f"# {name} {kwargs or ''} density {args.density} ({k} values per delta), batches {batches}; "
              f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"{torch.get_num_threads()} torch threads, device {args.device}"
              + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
        res, cand = in_process(backbone, spec, deltas, images, batches, args.repeats, args.device)
        print("\n| batch | tasks | dense img/s | grouped img/s | mixed img/s | mixed / dense | mixed / grouped |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for b in batches:
            d = res[(b, "dense", 1)]
            for t in TASKS:
                g, m = res[(b, "grouped", t)], res[(b, "mixed", t)]
                print(f"| {b} | {t} | {d:.1f} | {g:.1f} | {m:.1f} | {m / d:.2f} | {m / g:.2f} |")
        b, t = max(batches), max(TASKS)
        print(f"\n| mixed forward, batch {b}, {t} tasks | img/s | vs dense |\n|---|---:|---:|")
        for key, v in cand.items():
            print(f"| {key[1]} | {v:.1f} | {v / res[(b, 'dense', 1)]:.2f} |")
        probe = create_backbone(spec, 1)
        tokens = (b // t) * (probe.patch_embed.num_patches + getattr(probe, "num_prefix_tokens", 0))
        print(f"\n| layer ({b // t} samples = {tokens} tokens of one task) | shape | k | rule | frozen product ms "
              "| gather ms | csr ms | merged weight ms |\n|---|---|---:|---|---:|---:|---:|---:|")
        for path, shape, kk, rule, secs in layer_table(spec, deltas[0], tokens, max(3, args.repeats), args.device):
            print(f"| {path} | {shape[0]}x{shape[1]} | {kk} | {rule} | {secs['frozen product'] * 1e3:.2f} | "
                  f"{secs['gather'] * 1e3:.2f} | {secs['csr'] * 1e3:.2f} | {secs['merged weight'] * 1e3:.2f} |")
        if args.http:
            http = over_http(backbone, deltas, images, args.requests, args.clients, b)
            print(f"\n| HTTP, {args.clients} clients, max batch {b} | requests/s |\n|---|---:|")
            for tt, v in http.items():
                print(f"| {tt} task(s) interleaved | {v:.1f} |")
        print(json.dumps({"mixed": {"tasks": t, "batch": b,
                                    "ratio_vs_dense": round(res[(b, "mixed", t)] / res[(b, "dense", 1)], 3),
                                    "ratio_vs_grouped": round(res[(b, "mixed", t)] / res[(b, "grouped", t)], 3)}}))


if __name__ == "__main__":
    main()
