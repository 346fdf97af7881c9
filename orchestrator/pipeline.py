"""The job pipeline on Ray: shared importance -> per-task fine-tuning (or sweep) -> deltas + catalogue.

Stage 1 computes one importance map per dataset as a Ray task and combines the pool's maps into the
task-agnostic map; every map is cached in the store under a content key. Stage 2 trains each task with
its own Ray Train ``TorchTrainer``, launched from a zero-CPU Ray task so that many tasks train at once,
bounded by what the cluster holds. Stage 3 (when the job asks) replaces stage 2 by a per-task Ray Tune
sweep over density and alpha. Stage 4 evaluates each saved delta on a fresh backbone and writes the
catalogue row and plots. See the README's Orchestrator section for the caching keys and why nothing deadlocks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from shpeft_core.io import atomic_write_bytes, exists, join_uri, local_path, read_bytes, remove, sha256_file

from .catalogue import catalogue_uri, latest_rows, write_rows
from .jobspec import CatalogueTaskRef, JobSpec, content_hash, job_id as compute_job_id, task_name

__all__ = [
    "JobResult",
    "run_job",
    "resolve_task",
    "normalise_store",
    "importance_key",
    "agnostic_key",
    "task_config_hash",
    "trainer_slots",
    "print_results_table",
]

log = logging.getLogger("shpeft.pipeline")

# Reserved by each Tune trial function: Tune rejects 0, and the trial itself only waits on its trainer.
TRIAL_CPU = 0.01


@dataclass
class JobResult:
    job_id: str
    store: str
    rows: list[dict[str, Any]]
    failed: list[str]
    counters: dict[str, int] = field(default_factory=dict)
    catalogue_uri: str = ""
    plots: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def _say(msg: str, progress: bool) -> None:
    log.info(msg)
    if progress:
        print(msg, flush=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def normalise_store(store: str) -> str:
    """Local folders become absolute paths (Ray rejects relative storage paths); URIs stay as they are."""
    if "://" in store:
        return store.rstrip("/")
    return os.path.abspath(os.path.expanduser(store))


def resolve_task(entry):
    """A job's task entry as a TaskSpec: inline specs as they are, catalogue names via tasks.catalogue."""
    if not isinstance(entry, CatalogueTaskRef):
        return entry
    from tasks.catalogue import CATALOGUE

    if entry.catalogue not in CATALOGUE:
        raise ValueError(
            f"tasks: catalogue name {entry.catalogue!r} is unknown; see `shpeft tasks list` (known: {sorted(CATALOGUE)})"
        )
    return CATALOGUE[entry.catalogue].to_spec(entry.source, name=entry.name or entry.catalogue, **entry.overrides)


# ---------------------------------------------------------------- keys and hashes


def _backbone_dict(job: JobSpec) -> dict[str, Any]:
    return job.backbone.model_dump(mode="json")


def importance_key(backbone_fp: str, dataset_fp: str, job: JobSpec, num_classes: int) -> str:
    """Content key of one dataset's importance map: the weights, the data and the estimator settings."""
    imp = job.importance
    return content_hash(
        {
            "kind": "dataset-importance",
            "backbone": job.backbone.name,
            "backbone_kwargs": job.backbone.kwargs,
            "backbone_fingerprint": backbone_fp,
            "dataset_fingerprint": dataset_fp,
            "num_classes": num_classes,
            "estimator": imp.estimator,
            "batches": imp.batches,
            "batch_size": imp.batch_size or job.training.batch_size,
            "loss": imp.loss,
            "head_warmup": imp.head_warmup,
            "seed": job.training.seed,
        },
        length=24,
    )


def agnostic_key(backbone_fp: str, dataset_keys: list[str], job: JobSpec) -> str:
    """Content key of the combined task-agnostic map: its datasets' keys plus how they are combined."""
    imp = job.importance
    return content_hash(
        {
            "kind": "agnostic-importance",
            "backbone_fingerprint": backbone_fp,
            "datasets": sorted(dataset_keys),
            "normalization": imp.normalization,
            "reduce": imp.reduce,
            "magnitude_blend": imp.magnitude_blend,
        },
        length=24,
    )


def task_config_hash(job: JobSpec, spec, specific_key: str, agnostic: str | None) -> str:
    """Everything that changes a task's delta; resource-only settings are left out."""
    tr = job.training.model_dump(mode="json")
    for resource_only in ("max_concurrent_tasks", "cpus_per_worker", "gpus_per_worker", "data_workers", "max_failures", "use_gpu"):
        tr.pop(resource_only)
    return content_hash(
        {
            "backbone": _backbone_dict(job),
            "task": spec.model_dump(mode="json"),
            "importance": [specific_key, agnostic],
            "selection": job.selection.model_dump(mode="json"),
            "training": tr,
            "sweep": job.sweep.model_dump(mode="json") if job.sweep.enabled else None,
        }
    )


# ---------------------------------------------------------------- cluster sizing


def _cluster_resources() -> tuple[float, float]:
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))


def _worker_resources(job: JobSpec) -> dict[str, float]:
    tr = job.training
    gpus = tr.gpus_per_worker if tr.gpus_per_worker > 0 else (1.0 if tr.use_gpu else 0.0)
    out = {"CPU": tr.cpus_per_worker}
    if gpus:
        out["GPU"] = gpus
    return out


def trainer_slots(cpus: float, gpus: float, job: JobSpec, *, per_slot_overhead_cpu: float = 0.0,
                  user_limit: int | None = None) -> int:
    """How many trainers fit at once: every one of them can hold all its workers simultaneously.

    ``per_slot_overhead_cpu`` is what each slot reserves besides its workers (a Tune trial's 0.01 CPU).
    Raises when not even one trainer fits, since it would wait forever.
    """
    res = _worker_resources(job)
    w = job.training.workers_per_task
    need_cpu = w * res["CPU"] + per_slot_overhead_cpu
    need_gpu = w * res.get("GPU", 0.0)
    fit = math.floor(cpus / need_cpu + 1e-9)
    if need_gpu:
        fit = min(fit, math.floor(gpus / need_gpu + 1e-9))
    if fit < 1:
        raise RuntimeError(
            f"one task needs {w} workers x {res} (+{per_slot_overhead_cpu} CPU) but the cluster has "
            f"{cpus} CPUs and {gpus} GPUs; lower training.workers_per_task / cpus_per_worker"
        )
    return max(1, min(fit, user_limit or fit))


def _ray_storage(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train/Tune: local paths direct, URIs via fsspec."""
    path = local_path(uri)
    if path is not None:
        return os.path.abspath(path), None
    import pyarrow.fs
    from fsspec.core import url_to_fs

    fs, p = url_to_fs(uri)
    return p, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


# ---------------------------------------------------------------- remote work


def _compute_importance(backbone: dict, spec_json: dict, settings: dict, dataset_fp: str, uri: str,
                        use_gpu: bool) -> dict[str, Any]:
    import torch

    from shpeft_core.importance import ImportanceConfig, compute_importance
    from tasks.data import build_loader, transform_for
    from tasks.spec import TaskSpec

    from .train_loop import build_backbone

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    spec = TaskSpec.model_validate(spec_json)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    model = build_backbone(backbone, spec.num_classes)
    loader = build_loader(spec, "train", transform=transform_for(model, train=False),
                          batch_size=settings["batch_size"], shuffle=True, seed=settings["seed"])
    config = ImportanceConfig(estimator=settings["estimator"], num_batches=settings["batches"],
                              head_warmup=settings["head_warmup"], loss=settings["loss"])
    imap = compute_importance(model, loader, config, num_classes=spec.num_classes,
                              dataset_fingerprint=dataset_fp, device=device, backbone_name=backbone["name"])
    sha = imap.save(uri)
    return {"uri": uri, "sha256": sha, "seconds": time.perf_counter() - t0}


def _evaluate_delta(backbone: dict, spec_json: dict, delta_uri: str, batch_size: int, use_gpu: bool) -> dict:
    """Metrics of the saved artifact: a fresh backbone + the delta, on val and test."""
    import torch

    from shpeft_core.delta import apply_delta, load_delta
    from shpeft_core.train import evaluate
    from tasks.data import build_loader, transform_for
    from tasks.spec import TaskSpec

    from .train_loop import build_backbone

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    spec = TaskSpec.model_validate(spec_json)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    delta = load_delta(delta_uri)
    model = build_backbone(backbone, spec.num_classes)
    apply_delta(model, delta)
    model.to(device).eval()
    tf = transform_for(model, train=False)
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        loader = build_loader(spec, split, transform=tf, batch_size=batch_size)
        for k, v in evaluate(model, loader, num_classes=spec.num_classes, device=device).items():
            out[f"{split}_{k}"] = float(v)
    sparse = int(sum(v.numel() for v in delta.values.values()))
    head = int(sum(v.numel() for v in delta.head.values()))
    out.update(sparse_values=sparse, trainable=sparse + head, sha256=sha256_file(delta_uri),
               bytes=len(read_bytes(delta_uri)), eval_s=time.perf_counter() - t0)
    return out


def _train_task(plan: dict[str, Any]) -> dict[str, Any]:
    """Runs in a zero-CPU Ray task: one TorchTrainer for one task, then the artifact evaluation."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from .train_loop import train_task_loop

    t0 = time.perf_counter()
    storage_path, storage_fs = plan["ray_storage"]
    trainer = TorchTrainer(
        train_task_loop,
        train_loop_config=plan["loop_config"],
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan["workers"], use_gpu=plan["use_gpu"], resources_per_worker=plan["worker_resources"]
        ),
        run_config=ray.train.RunConfig(
            name=plan["run_name"],
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=plan["max_failures"]),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if getattr(result, "error", None):
        raise result.error
    train_s = time.perf_counter() - t0
    metrics = dict(result.metrics or {})
    ev = ray.get(
        ray.remote(_evaluate_delta).options(num_cpus=plan["eval_cpus"], num_gpus=plan["eval_gpus"]).remote(
            plan["backbone"], plan["loop_config"]["task"], plan["loop_config"]["final_delta_uri"],
            plan["batch_size"], plan["use_gpu"],
        )
    )
    resumed = metrics.get("resumed_from_epoch")
    return {**ev, "train_s": train_s, "resumed_from_epoch": None if resumed is None or resumed < 0 else int(resumed)}


# ---------------------------------------------------------------- stage 1


@dataclass
class _Dataset:
    name: str
    spec: Any
    fingerprint: str = ""
    key: str = ""
    uri: str = ""
    cache: str = ""  # hit | miss
    error: str | None = None
    seconds: float = 0.0


def _importance_stage(job: JobSpec, store: str, backbone_fp: str, targets: list, pool_extra: list,
                      force: bool, progress: bool, counters: dict[str, int]) -> tuple[dict[str, _Dataset], dict]:
    import ray

    from tasks.data import dataset_fingerprint

    imp = job.importance
    use_gpu = job.training.use_gpu if imp.use_gpu is None else imp.use_gpu
    settings = {
        "estimator": imp.estimator, "batches": imp.batches, "batch_size": imp.batch_size or job.training.batch_size,
        "loss": imp.loss, "head_warmup": imp.head_warmup, "seed": job.training.seed,
    }
    pool_names = imp.pool if imp.pool is not None else [s.name for s in targets] + [s.name for s in pool_extra]
    datasets: dict[str, _Dataset] = {}
    for spec in [*targets, *pool_extra]:
        if spec.name not in pool_names and spec not in targets:
            continue
        d = _Dataset(spec.name, spec)
        try:
            d.fingerprint = dataset_fingerprint(spec)
            d.key = importance_key(backbone_fp, d.fingerprint, job, spec.num_classes)
            d.uri = join_uri(store, "importance", f"{d.key}.safetensors")
        except Exception as exc:  # a broken dataset fails its task (and the pool), not the job
            d.error = f"{type(exc).__name__}: {exc}"
        datasets[spec.name] = d

    pending = {}
    by_key: dict[str, list[_Dataset]] = {}
    for d in datasets.values():
        if d.error:
            continue
        by_key.setdefault(d.key, []).append(d)
    remote = ray.remote(_compute_importance)
    for key, group in by_key.items():
        d = group[0]
        if exists(d.uri) and not force:
            for g in group:
                g.cache = "hit"
            counters["importance_loaded"] += 1
            _say(f"importance {d.name}: cache hit {key}, nothing computed", progress)
            continue
        _say(f"importance {d.name}: cache miss {key}, computing", progress)
        ref = remote.options(num_cpus=1, num_gpus=1 if use_gpu else 0).remote(
            _backbone_dict(job), d.spec.model_dump(mode="json"), settings, d.fingerprint, d.uri, use_gpu
        )
        pending[ref] = group
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        group = pending.pop(done[0])
        try:
            out = ray.get(done[0])
            counters["importance_computed"] += 1
            for g in group:
                g.cache, g.seconds = "miss", out["seconds"]
            _say(f"importance {group[0].name}: computed in {out['seconds']:.1f}s -> {group[0].uri}", progress)
        except Exception as exc:
            for g in group:
                g.error = f"importance failed: {_short_error(exc)}"
            _say(f"importance {group[0].name}: FAILED {_short_error(exc)}", progress)

    agnostic = {"key": None, "uri": None, "cache": "", "error": None}
    pool = [datasets[n] for n in pool_names if n in datasets]
    broken = [d.name for d in pool if d.error]
    if broken:
        agnostic["error"] = f"task-agnostic pool dataset(s) {broken} failed: " + "; ".join(
            datasets[n].error for n in broken)
        return datasets, agnostic
    if not pool:
        return datasets, agnostic
    key = agnostic_key(backbone_fp, [d.key for d in pool], job)
    uri = join_uri(store, "importance", f"agnostic-{key}.safetensors")
    agnostic.update(key=key, uri=uri)
    if exists(uri) and not force:
        agnostic["cache"] = "hit"
        counters["importance_loaded"] += 1
        _say(f"task-agnostic importance: cache hit {key} ({len(pool)} datasets), nothing computed", progress)
        return datasets, agnostic
    from shpeft_core.importance import ImportanceMap, combine_importance

    maps = [ImportanceMap.load(d.uri) for d in pool]
    model = None
    if imp.magnitude_blend > 0:
        from .train_loop import build_backbone

        model = build_backbone(_backbone_dict(job), 2)
    combined = combine_importance(maps, normalization=imp.normalization, reduce=imp.reduce,
                                  magnitude_blend=imp.magnitude_blend, model=model)
    combined.save(uri)
    counters["importance_computed"] += 1
    agnostic["cache"] = "miss"
    _say(f"task-agnostic importance: combined {len(pool)} maps -> {uri}", progress)
    return datasets, agnostic


def _short_error(exc: BaseException) -> str:
    cause = exc
    # Ray wraps the remote exception; its cause carries the user's message.
    while getattr(cause, "cause", None) is not None and cause.cause is not cause:
        cause = cause.cause
    text = f"{type(cause).__name__}: {cause}"
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if len(lines) > 3 else " ".join(lines))[:2000]


# ---------------------------------------------------------------- stage 2/3 planning


def _loop_config(job: JobSpec, store: str, spec, backbone_fp: str, d: _Dataset, agnostic: dict,
                 density: float, alpha: float, board) -> dict[str, Any]:
    from shpeft_core.backbone import source_label

    tr = job.training
    train = {
        "epochs": (job.sweep.epochs or tr.epochs) if job.sweep.enabled else tr.epochs,
        "lr": tr.lr, "head_lr": tr.head_lr, "weight_decay": tr.weight_decay, "warmup_epochs": tr.warmup_epochs,
        "seed": tr.seed, "label_smoothing": tr.label_smoothing,
    }
    meta = {
        "backbone": job.backbone.name,
        "backbone_source": source_label(job.backbone.source),
        "backbone_kwargs": json.dumps(job.backbone.kwargs, sort_keys=True),
        "backbone_fingerprint": backbone_fp,
        "num_classes": str(spec.num_classes),
        "class_names": json.dumps(spec.names()),
        "density": repr(float(density)),
        "alpha": repr(float(alpha)),
        "estimator": job.importance.estimator,
        "importance_key": d.key,
        "agnostic_importance_key": agnostic.get("key") or "",
        "granularity": job.selection.granularity,
        "task": spec.name,
        "metric": spec.metric,
    }
    return {
        "task_name": spec.name,
        "task": spec.model_dump(mode="json"),
        "backbone": _backbone_dict(job),
        "num_classes": spec.num_classes,
        "specific_uri": d.uri,
        "agnostic_uri": agnostic.get("uri"),
        "density": density,
        "alpha": alpha,
        "granularity": job.selection.granularity,
        "train": train,
        "batch_size": tr.batch_size,
        "data_workers": tr.data_workers,
        "use_gpu": tr.use_gpu,
        "delta_metadata": meta,
        "final_delta_uri": join_uri(store, "deltas", f"{spec.name}.safetensors"),
        "progress_board": board,
        "fault": None,
    }


def _fault_for(task: str, run_name: str, store: str) -> dict | None:
    """Test hook: SHPEFT_FAULT_INJECT='<task>:<epoch>' kills that task's rank-0 worker once at that epoch."""
    spec = os.environ.get("SHPEFT_FAULT_INJECT", "")
    if not spec or ":" not in spec:
        return None
    name, epoch = spec.rsplit(":", 1)
    if name != task:
        return None
    return {"epoch": int(epoch), "marker": join_uri(store, "runs", run_name, "fault-injected.json")}


def _verified(row: dict | None, config_hash: str) -> bool:
    if not row or row.get("status") != "ok" or row.get("config_hash") != config_hash:
        return False
    uri = row.get("delta_uri")
    return bool(uri) and exists(uri) and sha256_file(uri) == row.get("sha256")


# ---------------------------------------------------------------- the job


def run_job(job: JobSpec, *, address: str | None = None, num_cpus: int | None = None, force: bool = False,
            progress: bool = True) -> JobResult:
    """Run every stage of ``job`` on Ray; returns the rows written to the catalogue and an exit code.

    Starts a local Ray (explicit ``num_cpus``, dashboard on 127.0.0.1) when Ray is not initialised and
    ``address`` is None, joins ``address`` when given, and leaves an initialised Ray alone.
    """
    import ray

    started = False
    if not ray.is_initialized():
        if address is None:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, dashboard_host="127.0.0.1",
                     include_dashboard=False if os.environ.get("SHPEFT_NO_DASHBOARD") else None)
        else:
            ray.init(address=address)
        started = True
    try:
        return _run(job, force=force, progress=progress)
    finally:
        if started:
            ray.shutdown()


def _run(job: JobSpec, *, force: bool, progress: bool) -> JobResult:
    from shpeft_core.backbone import backbone_fingerprint

    from .progress import ProgressBoard, ProgressPrinter
    from .train_loop import build_backbone

    t_job = time.perf_counter()
    store = normalise_store(job.store)
    jid = compute_job_id(job)
    counters = {"importance_computed": 0, "importance_loaded": 0, "tasks_trained": 0, "tasks_skipped": 0,
                "tasks_failed": 0}
    _say(f"job {jid}: {len(job.tasks)} task(s), store {store}", progress)
    atomic_write_bytes(join_uri(store, "jobs", f"{jid}.json"),
                       json.dumps(job.model_dump(mode="json"), indent=1, sort_keys=True).encode())

    rows: dict[str, dict[str, Any]] = {}
    targets, target_errors = [], {}
    for entry in job.tasks:
        try:
            targets.append(resolve_task(entry))
        except Exception as exc:
            target_errors[task_name(entry)] = _short_error(exc)
    pool_extra = [resolve_task(e) for e in job.importance.pool_datasets]

    backbone_fp = backbone_fingerprint(build_backbone(_backbone_dict(job), 2))
    board = ProgressBoard.remote()
    with ProgressPrinter(board, enabled=progress):
        datasets, agnostic = _importance_stage(job, store, backbone_fp, targets, pool_extra, force, progress, counters)

        previous = latest_rows(store, jid)
        plans = []
        for spec in targets:
            d = datasets[spec.name]
            base = {"task": spec.name, "metric": spec.metric, "started_at": _now(),
                    "importance_key": d.key, "agnostic_key": agnostic.get("key"),
                    "importance_cache": "hit" if d.cache == "hit" and agnostic.get("cache") in ("hit", "") else "miss",
                    "importance_s": d.seconds, "granularity": job.selection.granularity}
            error = d.error or agnostic.get("error")
            if error:
                rows[spec.name] = {**base, "status": "failed", "error": error, "finished_at": _now()}
                continue
            chash = task_config_hash(job, spec, d.key, agnostic.get("key"))
            base["config_hash"] = chash
            if not force and _verified(previous.get(spec.name), chash):
                rows[spec.name] = {**previous[spec.name], "trained": False}
                counters["tasks_skipped"] += 1
                _say(f"[{spec.name}] delta verified (sha256 {previous[spec.name]['sha256'][:12]}), skipped", progress)
                continue
            plans.append((spec, d, base, chash))
        for name, err in target_errors.items():
            rows[name] = {"task": name, "status": "failed", "error": err, "started_at": _now(), "finished_at": _now()}
        if rows:
            write_rows(store, jid, rows.values())

        if job.sweep.enabled:
            from .sweep import run_task_sweep

            for spec, d, base, chash in plans:
                rows[spec.name] = _finish_row(
                    base, lambda: run_task_sweep(job, store, spec, backbone_fp, d, agnostic, chash, board, force, progress))
                _after_task(rows[spec.name], counters, store, jid, progress)
        else:
            _train_all(job, store, plans, backbone_fp, datasets, agnostic, board, force, progress, rows, counters, jid)

    ordered = [rows[task_name(e)] for e in job.tasks if task_name(e) in rows]
    failed = [r["task"] for r in ordered if r.get("status") != "ok"]
    plots: list[str] = []
    try:
        from .plots import write_plots

        plots = write_plots(store, jid, ordered, [d.uri for d in datasets.values() if d.uri and not d.error],
                            agnostic.get("uri"))
    except Exception as exc:  # plots are a convenience; a plotting problem must not fail the job
        _say(f"plots skipped: {_short_error(exc)}", progress)
    result = JobResult(job_id=jid, store=store, rows=ordered, failed=failed, counters=counters,
                       catalogue_uri=catalogue_uri(store, jid), plots=plots)
    if progress:
        print_results_table(ordered)
        _say(f"job {jid}: {len(ordered) - len(failed)} ok, {len(failed)} failed in {time.perf_counter() - t_job:.1f}s; "
             f"catalogue {result.catalogue_uri}", progress)
    return result


def _finish_row(base: dict, work) -> dict[str, Any]:
    try:
        out = work()
        return {**base, **out, "status": "ok", "trained": True, "error": None, "finished_at": _now()}
    except Exception as exc:
        tb = traceback.format_exc(limit=3)
        log.debug(tb)
        return {**base, "status": "failed", "trained": False, "error": _short_error(exc), "finished_at": _now()}


def _after_task(row: dict, counters: dict, store: str, jid: str, progress: bool) -> None:
    if row["status"] == "ok":
        counters["tasks_trained"] += 1
        metric = row.get("metric") or "macro_f1"
        _say(f"[{row['task']}] done: val_{metric} {row.get('val_' + metric, float('nan')):.4f} "
             f"test_{metric} {row.get('test_' + metric, float('nan')):.4f} -> {row.get('delta_uri')}", progress)
    else:
        counters["tasks_failed"] += 1
        _say(f"[{row['task']}] FAILED: {row.get('error')}", progress)
    write_rows(store, jid, [row])


def _train_all(job, store, plans, backbone_fp, datasets, agnostic, board, force, progress, rows, counters, jid):
    """Stage 2: one zero-CPU launcher per task, at most `slots` in flight (each slot = one whole trainer)."""
    import ray

    if not plans:
        return
    cpus, gpus = _cluster_resources()
    slots = trainer_slots(cpus, gpus, job, user_limit=job.training.max_concurrent_tasks)
    _say(f"training {len(plans)} task(s), up to {slots} at once "
         f"({job.training.workers_per_task} worker(s) x {_worker_resources(job)} each; cluster {cpus:g} CPU {gpus:g} GPU)",
         progress)
    launcher = ray.remote(_train_task).options(num_cpus=0, max_retries=0)
    ray_storage = _ray_storage(join_uri(store, "runs"))
    eval_res = _worker_resources(job)
    queue = list(plans)
    in_flight: dict[Any, tuple] = {}
    while queue or in_flight:
        while queue and len(in_flight) < slots:
            spec, d, base, chash = queue.pop(0)
            run_name = f"{spec.name}-{chash}"
            if force:
                remove(join_uri(store, "runs", run_name), recursive=True)
            cfg = _loop_config(job, store, spec, backbone_fp, d, agnostic, job.selection.density,
                               job.selection.alpha, board)
            cfg["fault"] = _fault_for(spec.name, run_name, store)
            plan = {
                "loop_config": cfg, "run_name": run_name, "ray_storage": ray_storage,
                "workers": job.training.workers_per_task, "use_gpu": job.training.use_gpu,
                "worker_resources": _worker_resources(job), "max_failures": job.training.max_failures,
                "backbone": _backbone_dict(job), "batch_size": job.training.batch_size,
                "eval_cpus": eval_res["CPU"], "eval_gpus": eval_res.get("GPU", 0),
            }
            _say(f"[{spec.name}] training (run {run_name})", progress)
            base = {**base, "density": job.selection.density, "alpha": job.selection.alpha,
                    "delta_uri": cfg["final_delta_uri"], "started_at": _now()}
            in_flight[launcher.remote(plan)] = (spec, base)
        done, _ = ray.wait(list(in_flight), num_returns=1)
        spec, base = in_flight.pop(done[0])
        rows[spec.name] = _finish_row(base, lambda: ray.get(done[0]))
        _after_task(rows[spec.name], counters, store, jid, progress)


def print_results_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="shpeft results")
    for col in ("task", "status", "metric", "val", "test", "density", "alpha", "trainable", "trained", "delta / error"):
        table.add_column(col)

    def fmt(v, spec="{:.4f}"):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else spec.format(v)

    for r in rows:
        m = r.get("metric") or "macro_f1"
        table.add_row(
            r["task"], r.get("status", "?"), m, fmt(r.get(f"val_{m}")), fmt(r.get(f"test_{m}")),
            fmt(r.get("density"), "{:.2e}"), fmt(r.get("alpha"), "{:.2f}"), fmt(r.get("trainable"), "{:d}"),
            "yes" if r.get("trained") else "no",
            (r.get("delta_uri") or "") if r.get("status") == "ok" else (r.get("error") or "")[:120],
        )
    Console(width=max(120, Console().width)).print(table)
