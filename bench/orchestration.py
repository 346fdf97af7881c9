"""Orchestrator overhead: N tasks through run_job on a local Ray vs the same N trainings in a bare loop.

Both sides do the same work per task: its importance map, the combined pool map, the sparse model at
the same density/alpha, the same epochs, the delta saved and evaluated. Also times stage 1 (shared
importance) on a cache miss and on a hit. Prints a table and, last, one JSON line.

    python bench/orchestration.py [--smoke-test] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

for _var, _value in (("HF_HUB_OFFLINE", "1"), ("RAY_AUTH_MODE", "disabled"), ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"),
                     ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"), ("RAY_USAGE_STATS_ENABLED", "0")):
    os.environ.setdefault(_var, _value)

import torch  # noqa: E402

BACKBONE = {"name": "test_vit", "kwargs": {"img_size": 32, "patch_size": 8}}


def _job(store: str, specs, backbone_uri: str, epochs: int):
    from orchestrator.jobspec import parse_job

    return parse_job({
        "backbone": {**BACKBONE, "source": backbone_uri},
        "store": store,
        "tasks": [s.model_dump(mode="json") for s in specs],
        "importance": {"batches": 2, "batch_size": 16},
        "selection": {"density": 0.02, "alpha": 0.5},
        "training": {"epochs": epochs, "batch_size": 16, "lr": 3e-3, "warmup_epochs": 0},
    })


def bare_loop(job, specs, store: str, threads: int) -> float:
    """The same stages in one process, one task after another."""
    from shpeft_core.delta import extract_delta, load_delta, apply_delta, save_delta
    from shpeft_core.importance import ImportanceConfig, combine_importance, compute_importance
    from shpeft_core.selection import hybrid_scores, select_mask
    from shpeft_core.sparse import apply_sparse_training
    from shpeft_core.train import TrainConfig, evaluate, fit
    from tasks.loaders import build_loader

    from orchestrator.train_loop import build_backbone
    from tasks.transforms import transform_for

    torch.set_num_threads(threads)
    bb = job.backbone.model_dump(mode="json")
    t0 = time.perf_counter()
    maps = {}
    for spec in specs:
        model = build_backbone(bb, spec.num_classes)
        loader = build_loader(spec, "train", transform=transform_for(model, train=False), batch_size=16,
                              shuffle=True, seed=0)
        maps[spec.name] = compute_importance(model, loader, ImportanceConfig(num_batches=2), num_classes=spec.num_classes)
    agnostic = combine_importance(list(maps.values()))
    for spec in specs:
        model = build_backbone(bb, spec.num_classes)
        apply_sparse_training(model, select_mask(hybrid_scores(maps[spec.name], agnostic, 0.5), 0.02))
        tr = build_loader(spec, "train", transform=transform_for(model, train=True), batch_size=16, shuffle=True)
        va = build_loader(spec, "val", transform=transform_for(model, train=False), batch_size=16)
        fit(model, tr, va, TrainConfig(epochs=job.training.epochs, lr=3e-3, warmup_epochs=0), num_classes=spec.num_classes)
        uri = f"{store}/{spec.name}.safetensors"
        save_delta(extract_delta(model, metadata={"alpha": "0.5", "estimator": "grad2", "importance_key": "bare",
                                                  "task": spec.name}), uri)
        fresh = build_backbone(bb, spec.num_classes)
        apply_delta(fresh, load_delta(uri))
        for split in ("val", "test"):
            evaluate(fresh, build_loader(spec, split, transform=transform_for(fresh, train=False), batch_size=16),
                     num_classes=spec.num_classes)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke-test", action="store_true", help="N = 1, 2 with one epoch (about a minute)")
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()

    import ray
    import safetensors.torch
    import timm

    from orchestrator.importance_stage import run_importance_stage
    from orchestrator.pipeline import run_job
    from shpeft_core.backbone import backbone_fingerprint
    from orchestrator.train_loop import build_backbone
    from tasks.synthetic import write_task_family

    ns = (1, 2) if args.smoke_test else (1, 2, 4)
    epochs = 1 if args.smoke_test else 2
    work = tempfile.mkdtemp(prefix="shpeft-bench-orch-")
    try:
        torch.manual_seed(0)
        weights = os.path.join(work, "backbone.safetensors")
        m = timm.create_model(BACKBONE["name"], num_classes=10, **BACKBONE["kwargs"])
        safetensors.torch.save_file({k: v.contiguous() for k, v in m.state_dict().items()}, weights)
        specs = write_task_family(os.path.join(work, "data"), n_tasks=max(ns), images_per_task=120,
                                  formats=("medmnist",), seed=5)
        t = time.perf_counter()
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray_init_s = time.perf_counter() - t
        rows = {}
        for n in ns:
            job = _job(os.path.join(work, f"store-n{n}"), specs[:n], weights, epochs)
            t = time.perf_counter()
            res = run_job(job, progress=False)
            orch = time.perf_counter() - t
            assert res.exit_code == 0, res.rows
            bare = bare_loop(job, specs[:n], os.path.join(work, f"bare-n{n}"), args.cpus)
            rows[n] = {"orchestrator_s": round(orch, 2), "bare_loop_s": round(bare, 2),
                       "ratio": round(orch / bare, 2), "overhead_per_task_s": round((orch - bare) / n, 2)}
            print(f"N={n}: orchestrator {orch:.1f}s, bare loop {bare:.1f}s, ratio {orch / bare:.2f}, "
                  f"overhead per task {(orch - bare) / n:+.1f}s", flush=True)

        job = _job(os.path.join(work, "store-cache"), specs[:2], weights, epochs)
        fp = backbone_fingerprint(build_backbone(job.backbone.model_dump(mode="json"), 2))
        counters = {"importance_computed": 0, "importance_loaded": 0}
        times = []
        for _ in range(2):
            t = time.perf_counter()
            run_importance_stage(job, job.store, fp, specs[:2], [], False, False, counters)
            times.append(time.perf_counter() - t)
        cache = {"miss_s": round(times[0], 3), "hit_s": round(times[1], 3), "speedup": round(times[0] / times[1], 1),
                 "computed": counters["importance_computed"], "loaded": counters["importance_loaded"]}
        print(f"importance stage (2 datasets + pool): miss {times[0]:.2f}s, hit {times[1]:.3f}s "
              f"({cache['speedup']}x)", flush=True)
        ray.shutdown()
        print(json.dumps({"machine": f"{platform.machine()} {os.cpu_count()} cpus, ray {ray.__version__}",
                          "cpus": args.cpus, "epochs": epochs, "ray_init_s": round(ray_init_s, 2),
                          "n": rows, "importance_cache": cache}))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
