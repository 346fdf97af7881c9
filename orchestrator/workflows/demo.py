"""The demo job: synthetic source corpus -> small pre-trained ViT (cached) -> every stage on synthetic targets."""

from __future__ import annotations

import io
import os
import time
from typing import Any

import yaml

from shpeft_core.io import atomic_write_bytes, exists

from orchestrator.job.spec import content_hash

from orchestrator.job.load import parse_job
from orchestrator.store import layout

__all__ = ["run_demo", "prepare_demo_job", "demo_job_dict", "pretrain_backbone", "demo_backbone_uri", "install_demo_backbone",
           "DEMO_BACKBONE", "DEMO_DATA", "DEMO_PRETRAIN", "DEMO_TRAINING"]

# A small ViT at 32 px: patch 8 -> 16 tokens, 6 blocks of width 64 (~0.27M weights). Its pre-trained
# weights ship with the repository (DEMO_BACKBONE_FILE, ~1 MB); scripts/pretrain_demo_backbone.py
# regenerates them from the synthetic source corpus with DEMO_PRETRAIN.
DEMO_BACKBONE = {"name": "test_vit", "kwargs": {"img_size": 32, "patch_size": 8}}
DEMO_BACKBONE_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                                  "demo_backbone.safetensors")
DEMO_BACKBONE_SHA256 = "7098e107120712030a130333f61e2b0d615083ea0c4e8739d04e964a378dc4a2"
# Data (tasks.synthetic): the source corpus and the target family the demo writes.
DEMO_DATA = {"image_size": 32, "lesion_size": 1.4, "source_images": 12000, "pool_images": 800, "source_cue_strength": 1.5, "n_tasks": 3,
             "images_per_task": 1100, "num_classes": 4, "max_imbalance": 1.5, "cue_strength": 2.0}
# Supervised pre-training of DEMO_BACKBONE on the DEMO_DATA source corpus (offline, not at demo time).
DEMO_PRETRAIN = {"epochs": 25, "batch_size": 64, "lr": 2e-3, "seed": 0}
# Per-method fine-tuning defaults, from a val-only search with bench/demo_recipe.py: "lr" is the
# sparse values' rate, "lr_full" full fine-tuning's, "head_lr" the head's (also head-only). Per-tensor
# selection (the budget split over weight tensors by size) beat one global top-k on this backbone,
# where grad2 puts half of a global budget into the patch embedding.
DEMO_TRAINING = {"epochs": 20, "batch_size": 32, "lr": 3e-2, "head_lr": 1e-2, "lr_full": 2e-3,
                 "warmup_epochs": 1, "density": 0.02, "alpha": 0.5, "granularity": "per_tensor",
                 "importance_batches": 6}


def demo_backbone_uri(path: str = DEMO_BACKBONE_FILE, sha256: str | None = None) -> str:
    """The shipped pre-trained demo backbone, after checking its sha256 against DEMO_BACKBONE_SHA256."""
    from shpeft_core.io import sha256_file

    want = DEMO_BACKBONE_SHA256 if sha256 is None else sha256
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: demo backbone missing; run scripts/pretrain_demo_backbone.py")
    got = sha256_file(path)
    if got != want:
        raise ValueError(f"{path}: sha256 {got} differs from the expected {want}; the file is damaged or was "
                         "regenerated without updating DEMO_BACKBONE_SHA256 (scripts/pretrain_demo_backbone.py)")
    return path


def install_demo_backbone(store: str, progress: bool = True) -> str:
    """Copy the checked, shipped backbone into <store>/backbones/ (once); returns its URI there."""
    uri = layout.backbone_file(store, DEMO_BACKBONE["name"], DEMO_BACKBONE_SHA256[:16])
    if not exists(uri):
        with open(demo_backbone_uri(), "rb") as f:
            atomic_write_bytes(uri, f.read())
    if progress:
        print(f"pre-trained backbone: {uri} (shipped, sha256 {DEMO_BACKBONE_SHA256[:16]}...)", flush=True)
    return uri


def pretrain_backbone(store: str, corpus, *, epochs: int, batch_size: int = 64, lr: float = 2e-3,
                      seed: int = 0, progress: bool = True) -> str:
    """Supervised pre-training on the source corpus, once: cached by content under <store>/backbones/.

    Not run by the demo: scripts/pretrain_demo_backbone.py uses it (with DEMO_PRETRAIN, one thread,
    about 25 epochs x 6 s on one idle core) to regenerate the shipped DEMO_BACKBONE_FILE."""
    import safetensors.torch
    import timm
    import torch

    from tasks.fingerprint import dataset_fingerprint
    from tasks.loaders import build_loader

    from tasks.transforms import transform_for

    key = content_hash({"backbone": DEMO_BACKBONE, "corpus": dataset_fingerprint(corpus), "epochs": epochs,
                        "batch_size": batch_size, "lr": lr, "seed": seed, "augment": "rrc-0.6-noflip"})
    uri = layout.backbone_file(store, DEMO_BACKBONE["name"], key)
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
            "estimator": "grad2", "batches": 2 if smoke_test else DEMO_TRAINING["importance_batches"], "batch_size": 32,
            "pool_datasets": [p.model_dump(mode="json") for p in pool_extra],
        },
        "selection": {"density": DEMO_TRAINING["density"], "alpha": DEMO_TRAINING["alpha"],
                      "granularity": DEMO_TRAINING["granularity"]},
        "training": {
            # The few sparse values start at zero and take a larger step than dense fine-tuning (3e-2 vs
            # 2e-3 for full fine-tuning; bench/demo_recipe.py); 770 training images give 25 steps per epoch.
            # The smoke test trains a few epochs of a few steps: enough for every stage to run and adapt.
            "epochs": 4 if smoke_test else DEMO_TRAINING["epochs"], "batch_size": DEMO_TRAINING["batch_size"],
            "lr": DEMO_TRAINING["lr"], "head_lr": DEMO_TRAINING["head_lr"],
            "warmup_epochs": DEMO_TRAINING["warmup_epochs"],
            "seed": 0, "workers_per_task": 1, "cpus_per_worker": cpus_per_worker,
        },
        # Full fine-tuning moves every pre-trained weight and takes a smaller step than the sparse values.
        "method": {"lr": {"full": DEMO_TRAINING["lr_full"]}},
        "sweep": {
            "enabled": True, "trials_per_task": 2 if smoke_test else 4, "epochs": 2 if smoke_test else 12,
            "density_range": [1e-3, 5e-2], "alpha_range": [0.0, 1.0],
            "asha": {"grace_period": 1, "reduction_factor": 2}, "seed": 0,
        },
    }


# The comparison that ends the demo: SH-PEFT at the job's density and at a paper-like one beside head-only
# and full fine-tuning (the ablations, specific / agnostic / random masks at both densities and the other
# hybrid rule, with `--all-methods`). DEMO_PAPER_DENSITY: 1e-3 of this backbone's eligible weights is about
# 0.08 selected weights per row, as 0.01% of ViT-B/16 is (fewer than one per row on average).
DEMO_PAPER_DENSITY = 1e-3
# One step beyond a winning end of the learning-rate grid (`shpeft compare` allows two): each step is a
# round that waits for the one before, and the second saves the demo's ten-minute budget about half a
# minute; the report says how far the search went.
DEMO_TUNE_EXTENSIONS = 1
DEMO_COMPARE_METHODS = ("shpeft", f"shpeft@{DEMO_PAPER_DENSITY:g}", "linear", "full")
DEMO_ALL_METHODS = ("shpeft", "shpeft:rank_sum", "specific", "agnostic", "random",
                    *(f"{m}@{DEMO_PAPER_DENSITY:g}" for m in ("shpeft", "specific", "agnostic", "random")),
                    "linear", "full")


def write_demo_data(data: str, smoke_test: bool = False, *, n_tasks: int | None = None):
    """The demo's source corpus (for the task-agnostic pool) and target tasks under ``data``: (corpus, targets).
    ``n_tasks`` overrides how many targets (the demo's own number by default)."""
    from tasks.synthetic import write_source_corpus, write_task_family

    d = DEMO_DATA
    # The corpus pre-trained the shipped backbone; here it only joins the task-agnostic pool, whose
    # importance pass reads a few batches, so a prefix of it is written (images are stable by index).
    corpus = write_source_corpus(data, image_size=d["image_size"], num_images=600 if smoke_test else d["pool_images"],
                                 cue_strength=d["source_cue_strength"], lesion_size=d["lesion_size"])
    n = n_tasks or (2 if smoke_test else d["n_tasks"])
    targets = write_task_family(data, n_tasks=n, image_size=d["image_size"],
                                images_per_task=120 if smoke_test else d["images_per_task"],
                                num_classes=d["num_classes"], max_imbalance=d["max_imbalance"],
                                cue_strength=d["cue_strength"], lesion_size=d["lesion_size"],
                                formats=("medmnist", "imagefolder", "parquet"))
    return corpus, targets


def prepare_demo_job(store: str, smoke_test: bool = False, *, cpus: int = 2, progress: bool = True):
    """Write the demo's data and backbone into ``store`` (reused when already there) and return its job."""
    data = layout.demo_data_dir(store, smoke_test)
    corpus, targets = write_demo_data(data, smoke_test)
    if smoke_test:
        # The smoke test also runs on real images: patches of the CT, MR, ultrasound, X-ray and histology
        # images that pydicom-data and scikit-image install (the `samples` extra); and on a multi-label
        # task read from a CheXpert-like label table (findings with uncertain and blank labels, patients).
        from tasks.samples import write_real_sample_task
        from tasks.synthetic_findings import write_findings_task

        targets = [*targets, write_real_sample_task(data, patch_size=DEMO_DATA["image_size"]),
                   write_findings_task(data, num_images=160, image_size=DEMO_DATA["image_size"])]
    if progress:
        print(f"data: source corpus {corpus.name} + targets {[t.name for t in targets]} under {data}", flush=True)
    backbone_uri = install_demo_backbone(store, progress=progress)
    job = parse_job(demo_job_dict(store, backbone_uri, targets, [corpus], smoke_test=smoke_test, cpus=cpus),
                    "demo job")
    buf = io.StringIO()
    yaml.safe_dump(job.model_dump(mode="json"), buf, sort_keys=False)
    atomic_write_bytes(layout.demo_job_file(store, smoke_test), buf.getvalue().encode())
    return job


def run_demo(store: str | None = None, smoke_test: bool = False, *, num_cpus: int | None = None,
             progress: bool = True, all_methods: bool = False) -> int:
    """Generate data, install the shipped pre-trained backbone, run the whole job on a local embedded Ray,
    then compare SH-PEFT (at the job's and a paper-like density) with head-only and full fine-tuning over 3
    seeds, each method's learning rate chosen on validation first; returns the exit code."""
    from orchestrator.runtime.session import ray_session
    from orchestrator.store.layout import normalise_store
    from orchestrator.workflows.compare import run_compare
    from orchestrator.workflows.preflight import preflight
    from orchestrator.workflows.run import run_job

    for var, value in (("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"), ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")):
        os.environ.setdefault(var, value)
    t0 = time.perf_counter()
    store = normalise_store(store or os.path.join(os.getcwd(), "demo-store"))
    cpus = num_cpus or os.cpu_count() or 2
    job = prepare_demo_job(store, smoke_test, cpus=cpus, progress=progress)
    preflight(job)
    with ray_session(None, cpus):
        result = run_job(job, progress=progress)
        # The comparison runs every method with the job's own settings (no sweep) on the same tasks; each
        # method's learning rate is chosen on validation (full fine-tuning's is pinned by the job's method.lr,
        # chosen on validation with bench/demo_recipe.py); training.lr is the job's, not the comparison's.
        compare_job = job.model_copy(update={"sweep": job.sweep.model_copy(update={"enabled": False})})
        methods = DEMO_ALL_METHODS if all_methods else DEMO_COMPARE_METHODS
        compared = run_compare(compare_job, methods=methods, seeds=1 if smoke_test else 3, progress=progress,
                               tune_extensions=DEMO_TUNE_EXTENSIONS)
    if progress:
        print(f"demo finished in {time.perf_counter() - t0:.0f}s; comparison report: {compared.report_uri}",
              flush=True)
    return max(result.exit_code, compared.exit_code)
