"""The CUDA paths, checked on a GPU machine: numerics against float64, and jobs whose workers share a GPU.

1. values gradient: each of the four exact ways to form the sparse values' gradient
   (shpeft_core.sparse.VALUES_GRAD_PATHS) on the GPU, against a float64 dense reference on the CPU,
   from float32 and from bfloat16 inputs; then a sparse-delta Linear and Conv2d forward + backward
   (TF32 convolutions off from here on, so the figures measure the paths, not TF32).
   mixed: the mixed-task forward with 8 deltas in one batch, each correction kernel, against float64.
2. importance: the demo backbone's grad2 map on the GPU and on the CPU from the same batches, with the
   linear-probe and the ridge head warm-up: the largest relative difference and the overlap of the
   masks selected from each.
3. plain job: the demo's tasks with `training.gpus_per_worker: 0.25` (four workers to a GPU),
   importance and training on the GPU. nvidia-smi, sampled every 0.5 s, counts the processes that
   hold GPU memory at once.
4. sweep: the same tasks' Optuna/ASHA sweeps, each trial at a quarter of a GPU.

Prints a table per check and, last, one JSON line. `--device cpu` runs every check on the CPU (nothing
is shared), to try the script on a machine without a GPU.

    python bench/gpu_check.py [--smoke-test] [--tasks 4] [--epochs 8] [--device cuda] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime
from typing import Any

for _var, _value in (("HF_HUB_OFFLINE", "1"), ("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0"),
                     ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")):
    os.environ.setdefault(_var, _value)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest error relative to the reference's largest magnitude."""
    return float((a.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def values_grad(device: str) -> dict[str, Any]:
    import shpeft_core.sparse as sp
    import shpeft_core.values_grad as vg

    # cuDNN convolutions default to TF32 (about 3e-4 relative on the conv rows here): off, so the
    # comparison measures the sparse paths, not the GPU's reduced-precision convolutions.
    torch.backends.cudnn.allow_tf32 = False

    g = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {}
    n_tok, rows, cols, k = 4096, 384, 1152, 4000
    a64, b64 = torch.randn(n_tok, rows, generator=g, dtype=torch.float64), torch.randn(n_tok, cols, generator=g,
                                                                                        dtype=torch.float64)
    flat = torch.randperm(rows * cols, generator=g)[:k].sort().values
    pat64 = vg.sparse_pattern(flat, (rows, cols))
    ref = (a64.t() @ b64).view(-1)[flat]
    pat = vg.sparse_pattern(flat.to(device), (rows, cols))
    for dtype in (torch.float32, torch.bfloat16):
        a, b = a64.to(device=device, dtype=dtype), b64.to(device=device, dtype=dtype)
        # the reference for bf16 inputs: the same rounded inputs, summed in float64
        want = ref if dtype == torch.float32 else (a.double().cpu().t() @ b.double().cpu()).view(-1)[flat]
        for name in vg.VALUES_GRAD_PATHS:
            try:
                got = vg._PATH_FNS[name](a, b, pat)  # as values_grad hands them over (bf16 kept)
                out[f"{name}/{str(dtype).split('.')[-1]}"] = _rel(got, want)
            except (RuntimeError, NotImplementedError) as exc:
                out[f"{name}/{str(dtype).split('.')[-1]}"] = f"unavailable: {str(exc).splitlines()[0][:60]}"
    del pat64
    # whole layers, autotuned path, forward + backward against float64 on the CPU
    torch.manual_seed(0)
    for kind in ("linear", "conv2d"):
        base = torch.nn.Linear(192, 576) if kind == "linear" else torch.nn.Conv2d(3, 192, 8, stride=8)
        x = torch.randn(8, 64, 192) if kind == "linear" else torch.randn(8, 3, 64, 64)
        idx = torch.randperm(base.weight.numel())[: base.weight.numel() // 50].sort().values.to(torch.int32)
        layers = []
        for dev, dt in ((device, torch.float32), ("cpu", torch.float64)):
            b = type(base)(*((192, 576) if kind == "linear" else (3, 192, 8)),
                           **({} if kind == "linear" else {"stride": 8})).to(dt)
            b.load_state_dict({k_: v.to(dt) for k_, v in base.state_dict().items()})
            m = (sp.SparseDeltaLinear if kind == "linear" else sp.SparseDeltaConv2d)(b, idx).to(dev)
            with torch.no_grad():
                m.values.copy_(torch.linspace(-0.1, 0.1, m.values.numel(), dtype=dt))
            xi = x.to(device=dev, dtype=dt).clone().requires_grad_(True)
            y = m(xi)
            (y.square().mean()).backward()
            layers.append((y.detach(), m.values.grad, xi.grad))
        (y_d, gv_d, gx_d), (y_c, gv_c, gx_c) = layers
        out[f"{kind} forward"] = _rel(y_d, y_c)
        out[f"{kind} values grad"] = _rel(gv_d, gv_c)
        out[f"{kind} input grad"] = _rel(gx_d, gx_c)
    return out


def mixed_forward(device: str) -> dict[str, Any]:
    """The mixed-task forward on the device (8 deltas in one batch, each kernel path) against float64
    references on the CPU: each task's delta applied alone to a float64 copy of the backbone."""
    import copy

    import shpeft_core.mixed as mx
    from shpeft_core.backbone import BackboneSpec, create_backbone, head_parameter_names
    from shpeft_core.delta import apply_delta, extract_delta
    from shpeft_core.eligibility import eligible_parameters
    from shpeft_core.sparse import apply_sparse_training

    torch.backends.cudnn.allow_tf32 = False  # the patch embedding's convolution in full float32
    spec = BackboneSpec("vit_small_patch16_224", None, {"img_size": 64, "depth": 4})
    g = torch.Generator().manual_seed(0)
    deltas = []
    for t in range(8):
        model = create_backbone(spec, 2 + t % 4)
        mask = {n: torch.randperm(p.numel(), generator=g)[: p.numel() // 200].sort().values.to(torch.int32)
                for n, p in eligible_parameters(model).items()}
        apply_sparse_training(model, mask)
        heads = set(head_parameter_names(model))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".values") or name in heads:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
        deltas.append(extract_delta(model, metadata={"alpha": "0.5", "estimator": "grad2", "importance_key": "",
                                                      "task": f"t{t}"}))
    x = torch.randn(32, 3, 64, 64, generator=g)
    tid = torch.arange(32) % 8
    base = create_backbone(spec, 1).eval()
    refs = []
    for t, d in enumerate(deltas):
        ref = copy.deepcopy(base).double()
        with torch.no_grad(), apply_delta(ref, d, check_fingerprint=False):
            refs.append(ref(x[tid == t].double()))
    out: dict[str, Any] = {}
    for path in (None, *mx.MIXED_PATHS):
        mx.MIXED_PATH = path
        try:
            mixed = mx.MixedTaskModel(copy.deepcopy(base).to(device))
            got = mixed(x.to(device), [mixed.prepare(d) for d in deltas], tid)
            out[f"{path or 'per-layer rule'}: max abs error"] = max(
                float((g_.double().cpu() - r).abs().max()) for g_, r in zip(got, refs))
        except Exception as exc:  # report the path that cannot run here and go on
            out[f"{path or 'per-layer rule'}"] = f"unavailable: {str(exc).splitlines()[0][:80]}"
        finally:
            mx.MIXED_PATH = None
    return out


def _demo_data(root: str, tasks: int):
    from orchestrator.workflows.demo import install_demo_backbone, write_demo_data

    return (*write_demo_data(os.path.join(root, "data"), n_tasks=tasks), install_demo_backbone(root, progress=False))


def importance(device: str, root: str, targets, backbone_uri: str) -> dict[str, Any]:
    from orchestrator.workflows.demo import DEMO_BACKBONE, DEMO_TRAINING
    from shpeft_core.backbone import build_backbone
    from shpeft_core.importance import ImportanceConfig, compute_importance
    from shpeft_core.selection import hybrid_scores, select_mask
    from tasks.loaders import build_loader
    from tasks.transforms import transform_for

    spec = targets[0]
    model = build_backbone({**DEMO_BACKBONE, "source": backbone_uri}, spec.num_classes)
    loader = build_loader(spec, "train", transform=transform_for(model, train=False), batch_size=32, shuffle=False)
    batches = []
    for x, y in loader:
        batches.append((x, y))
        if len(batches) == 6:
            break
    out: dict[str, Any] = {"task": spec.name, "batches": len(batches)}
    for warmup in ("linear_probe", "ridge"):
        cfg = ImportanceConfig(num_batches=len(batches), head_warmup=warmup)
        maps = {dev: compute_importance(model, batches, cfg, num_classes=spec.num_classes, device=dev)
                for dev in (device, "cpu")}
        rel = max(_rel(maps[device].scores[n], maps["cpu"].scores[n].double()) for n in maps["cpu"].scores)
        masks = {dev: select_mask(hybrid_scores(m, None, 1.0), DEMO_TRAINING["density"]) for dev, m in maps.items()}
        same = total = 0
        for n, idx in masks["cpu"].items():
            a, b = set(idx.tolist()), set(masks[device].get(n, torch.empty(0)).tolist())
            same, total = same + len(a & b), total + len(a | b)
        out[f"{warmup} head: max rel diff"] = rel
        out[f"{warmup} head: mask jaccard"] = same / max(total, 1)
        out["selected"] = sum(len(i) for i in masks["cpu"].values())
    return out


class GpuSampler:
    """Polls nvidia-smi for the processes holding GPU memory; keeps the most seen at once."""

    def __init__(self, period: float = 0.5):
        self.period, self.most, self.peak_mib, self.samples, self.error = period, 0, 0, 0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
                lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
                self.samples += 1
                self.most = max(self.most, len(lines))
                self.peak_mib = max(self.peak_mib, sum(int(ln.split(",")[1]) for ln in lines) if lines else 0)
            except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
                self.error = str(exc)
                return
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _most_overlapping(rows) -> int:
    """The most task windows (started_at, finished_at) open at one instant."""
    events = []
    for r in rows:
        if r.get("started_at") and r.get("finished_at"):
            events += [(datetime.fromisoformat(r["started_at"]), 1), (datetime.fromisoformat(r["finished_at"]), -1)]
    most = cur = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        cur += step
        most = max(most, cur)
    return most


def job(device: str, root: str, corpus, targets, backbone_uri: str, *, epochs: int, sweep: bool,
        cpus: int) -> dict[str, Any]:
    from orchestrator.workflows.demo import demo_job_dict
    from orchestrator.job.load import parse_job
    from orchestrator.workflows.run import run_job
    from shpeft_core.delta import load_delta

    gpu = device != "cpu"
    doc = demo_job_dict(os.path.join(root, "store-sweep" if sweep else "store-plain"), backbone_uri, targets,
                        [corpus], smoke_test=False, cpus=cpus)
    doc["training"].update({"epochs": epochs, "use_gpu": gpu, "gpus_per_worker": 0.25 if gpu else 0.0,
                            "cpus_per_worker": 1})
    doc["sweep"].update({"enabled": sweep, "epochs": max(2, epochs // 2)})
    spec = parse_job(doc, "gpu check job")
    t0 = time.perf_counter()
    sampler = GpuSampler()
    if gpu:
        with sampler:
            result = run_job(spec, num_cpus=cpus, progress=False)
    else:
        result = run_job(spec, num_cpus=cpus, progress=False)
    wall = time.perf_counter() - t0
    verified = 0
    for r in result.rows:
        if r.get("status") == "ok" and r.get("artifact_kind") == "delta":
            load_delta(r["delta_uri"])  # checks the recorded sha256
            verified += 1
    shared = {}
    if gpu:  # nvidia-smi's view of the processes sharing the GPU
        shared = {"GPU processes at once": sampler.most, "GPU memory peak MiB": sampler.peak_mib,
                  "nvidia-smi samples": sampler.samples} if sampler.error is None else {"nvidia-smi": sampler.error}
    return {
        "tasks": len(result.rows), "ok": sum(r.get("status") == "ok" for r in result.rows),
        "failed": {r["task"]: r.get("error") for r in result.rows if r.get("status") != "ok"},
        "deltas verified": verified, "wall s": round(wall, 1),
        "tasks open at once": _most_overlapping(result.rows), **shared,
        "sweep trials": sum(int(r.get("sweep_trials") or 0) for r in result.rows),
        "test macro_f1": {r["task"]: round(r["test_macro_f1"], 3) for r in result.rows
                          if r.get("test_macro_f1") is not None},
        "train s": {r["task"]: round(r["train_s"], 1) for r in result.rows if r.get("train_s") is not None},
        "sweep s": {r["task"]: round(r["sweep_s"], 1) for r in result.rows if r.get("sweep_s") is not None},
    }


def _print(title: str, res: dict[str, Any]) -> None:
    print(f"\n== {title}", flush=True)
    for k, v in res.items():
        print(f"  {k:<34} {v:.3g}" if isinstance(v, float) else f"  {k:<34} {v}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda (default where there is one) or cpu")
    ap.add_argument("--tasks", type=int, default=4, help="demo tasks in the two jobs")
    ap.add_argument("--epochs", type=int, default=8, help="training epochs (a sweep trial gets half)")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray")
    ap.add_argument("--only", nargs="*", default=None, metavar="CHECK",
                    help="some of: values_grad mixed importance plain sweep (default: all)")
    ap.add_argument("--work", default=None, help="folder for the data and stores (default: a temporary one)")
    ap.add_argument("--smoke-test", action="store_true", help="2 tasks of 2 epochs (about a minute on 2 CPUs)")
    args = ap.parse_args()
    if args.smoke_test:
        args.tasks, args.epochs = 2, 2
    env = {"device": args.device, "torch": torch.__version__, "python": sys.version.split()[0],
           "gpu": torch.cuda.get_device_name(0) if args.device != "cpu" else None, "cpus": args.cpus}
    print(json.dumps(env), flush=True)
    work = args.work or tempfile.mkdtemp(prefix="shpeft-gpu-check-")
    os.makedirs(work, exist_ok=True)
    want = set(args.only or ("values_grad", "mixed", "importance", "plain", "sweep"))
    results: dict[str, Any] = {"env": env}
    data = None

    def run(name: str, fn) -> None:
        if name not in want:
            return
        t0 = time.perf_counter()
        try:
            res = fn()
        except Exception as exc:  # report and go on: one broken path should not hide the others
            traceback.print_exc()
            res = {"error": f"{type(exc).__name__}: {exc}"}
        res["check s"] = round(time.perf_counter() - t0, 1)
        results[name] = res
        _print(name, res)

    def need_data():
        nonlocal data
        if data is None:
            data = _demo_data(work, args.tasks)
        return data

    run("values_grad", lambda: values_grad(args.device))
    run("mixed", lambda: mixed_forward(args.device))
    run("importance", lambda: importance(args.device, work, need_data()[1], need_data()[2]))
    run("plain", lambda: job(args.device, work, *need_data(), epochs=args.epochs, sweep=False, cpus=args.cpus))
    run("sweep", lambda: job(args.device, work, *need_data(), epochs=args.epochs, sweep=True, cpus=args.cpus))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, default=str), flush=True)


if __name__ == "__main__":
    main()
