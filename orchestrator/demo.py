"""The demo job: synthetic source corpus -> small pre-trained ViT (cached) -> every stage on synthetic targets."""

from __future__ import annotations

import io
import os
import time
from typing import Any

import yaml

from shpeft_core.io import atomic_write_bytes, exists, join_uri

from .jobspec import content_hash, parse_job

__all__ = ["run_demo", "demo_job_dict", "pretrain_backbone", "DEMO_BACKBONE"]

# A small ViT at 32 px: patch 4 -> 64 tokens, 6 blocks of width 64 (~0.26M weights).
DEMO_BACKBONE = {"name": "test_vit", "kwargs": {"img_size": 32, "patch_size": 4}}


def pretrain_backbone(store: str, corpus, *, epochs: int, batch_size: int = 64, lr: float = 2e-3,
                      seed: int = 0, progress: bool = True) -> str:
    """Supervised pre-training on the source corpus, once: cached by content under <store>/backbones/.

    A ViT from scratch on a couple of thousand images spends its first epochs on a loss plateau,
    so the full demo trains for tens of epochs (about two minutes on two CPUs)."""
    import safetensors.torch
    import timm
    import torch

    from tasks.data import build_loader, dataset_fingerprint

    from tasks.data import transform_for

    key = content_hash({"backbone": DEMO_BACKBONE, "corpus": dataset_fingerprint(corpus), "epochs": epochs,
                        "batch_size": batch_size, "lr": lr, "seed": seed, "augment": "rrc-0.6-noflip"})
    uri = join_uri(store, "backbones", f"{DEMO_BACKBONE['name']}-{key}.safetensors")
    if exists(uri):
        if progress:
            print(f"pre-trained backbone: cached {uri}", flush=True)
        return uri
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = timm.create_model(DEMO_BACKBONE["name"], num_classes=corpus.num_classes, **DEMO_BACKBONE["kwargs"])
    loader = build_loader(corpus, "train", transform=transform_for(model, train=True), batch_size=batch_size,
                          shuffle=True, seed=seed)
    steps = epochs * len(loader)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.1)
    model.train()
    for epoch in range(epochs):
        total, correct, loss_sum = 0, 0, 0.0
        for images, labels in loader:
            logits = model(images)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss) * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            total += len(labels)
        if progress:
            print(f"pre-training {DEMO_BACKBONE['name']} on {corpus.name}: epoch {epoch + 1}/{epochs} "
                  f"loss {loss_sum / total:.3f} train acc {correct / total:.3f}", flush=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(uri, safetensors.torch.save(state, metadata={"corpus": corpus.name, "epochs": str(epochs)}))
    if progress:
        print(f"pre-trained backbone saved to {uri} in {time.perf_counter() - t0:.1f}s", flush=True)
    return uri


def demo_job_dict(store: str, backbone_uri: str, targets, pool_extra, *, smoke_test: bool, cpus: int) -> dict[str, Any]:
    # Workers take a little under one CPU so that two trainers (or two sweep trials, which also hold
    # 0.01 CPU each) fit on a 2-CPU machine at the same time.
    cpus_per_worker = 0.9 if cpus >= 2 else 1.0
    return {
        "backbone": {**DEMO_BACKBONE, "source": backbone_uri},
        "store": store,
        "tasks": [t.model_dump(mode="json") for t in targets],
        "importance": {
            "estimator": "grad2", "batches": 2 if smoke_test else 6, "batch_size": 32,
            "pool_datasets": [p.model_dump(mode="json") for p in pool_extra],
        },
        "selection": {"density": 0.01, "alpha": 0.5, "granularity": "global"},
        "training": {
            # The few sparse values start at zero and take a larger step than dense fine-tuning
            # (1e-2; 5e-2 did worse than head-only on this ViT); a few hundred images give ~7 steps per epoch, so
            # a handful of epochs leaves the fresh head near chance.
            "epochs": 1 if smoke_test else 12, "batch_size": 32, "lr": 1e-2, "head_lr": 1e-2,
            "warmup_epochs": 0 if smoke_test else 1,
            "seed": 0, "workers_per_task": 1, "cpus_per_worker": cpus_per_worker,
        },
        "sweep": {
            "enabled": True, "trials_per_task": 2 if smoke_test else 4, "epochs": 1 if smoke_test else 12,
            "density_range": [1e-3, 5e-2], "alpha_range": [0.0, 1.0],
            "asha": {"grace_period": 1, "reduction_factor": 2}, "seed": 0,
        },
    }


def run_demo(store: str | None = None, smoke_test: bool = False, *, num_cpus: int | None = None,
             progress: bool = True) -> int:
    """Generate data, pre-train once, run the whole job on a local embedded Ray; returns the exit code."""
    from tasks.synthetic import write_source_corpus, write_task_family

    from .pipeline import run_job
    from .store import normalise_store

    for var, value in (("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"), ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")):
        os.environ.setdefault(var, value)
    t0 = time.perf_counter()
    store = normalise_store(store or os.path.join(os.getcwd(), "demo-store"))
    cpus = num_cpus or os.cpu_count() or 2
    data = join_uri(store, "data-smoke" if smoke_test else "data")
    corpus = write_source_corpus(data, image_size=32, num_images=600 if smoke_test else 2400)
    targets = write_task_family(data, n_tasks=2 if smoke_test else 3, image_size=32,
                                images_per_task=120 if smoke_test else 300,
                                formats=("medmnist", "imagefolder", "parquet"))
    if progress:
        print(f"data: source corpus {corpus.name} + targets {[t.name for t in targets]} under {data}", flush=True)
    backbone_uri = pretrain_backbone(store, corpus, epochs=2 if smoke_test else 40, progress=progress)
    job_dict = demo_job_dict(store, backbone_uri, targets, [corpus], smoke_test=smoke_test, cpus=cpus)
    job = parse_job(job_dict, "demo job")
    buf = io.StringIO()
    yaml.safe_dump(job.model_dump(mode="json"), buf, sort_keys=False)
    atomic_write_bytes(join_uri(store, "demo-smoke-job.yaml" if smoke_test else "demo-job.yaml"), buf.getvalue().encode())
    result = run_job(job, num_cpus=cpus, progress=progress)
    if progress:
        print(f"demo finished in {time.perf_counter() - t0:.1f}s; plots: {result.plots}", flush=True)
    return result.exit_code
