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

from shpeft_core.io import atomic_write_bytes, check_writable, join_uri, local_path, remove

from . import store as layout
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


def importance_key(backbone_fp: str, dataset_fp: str, job: JobSpec, num_classes: int,
                   estimator: str | None = None) -> str:
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
            "estimator": estimator or imp.estimator,
            "batches": imp.batches,
            "batch_size": imp.batch_size or job.training.batch_size,
            "loss": imp.loss,
            "head_warmup": imp.head_warmup,
            "rules": job.selection.rules,
            "seed": job.training.seed,
            "format": "warm-head",  # maps carry the warmed head since this format
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


def task_config_hash(job: JobSpec, spec, specific_key: str, agnostic: str | None, *, method: str | None = None,
                     seed: int | None = None) -> str:
    """Everything that changes a task's artifact; resource-only settings are left out."""
    tr = job.training.model_dump(mode="json")
    for resource_only in ("max_concurrent_tasks", "cpus_per_worker", "gpus_per_worker", "data_workers", "max_failures", "use_gpu"):
        tr.pop(resource_only)
    tr["seed"] = job.training.seed if seed is None else seed
    method = method or job.method.for_task(spec.name)
    return content_hash(
        {
            "backbone": _backbone_dict(job),
            "task": spec.model_dump(mode="json"),
            "importance": [specific_key, agnostic],
            "method": method,
            "lora": job.method.lora.model_dump(mode="json") if method == "lora" else None,
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
                              head_warmup=settings["head_warmup"], loss=settings["loss"],
                              rules=tuple(settings["rules"]) if settings["rules"] else None)
    imap = compute_importance(model, loader, config, num_classes=spec.num_classes,
                              dataset_fingerprint=dataset_fp, device=device, backbone_name=backbone["name"])
    sha = imap.save(uri)
    return {"uri": uri, "sha256": sha, "seconds": time.perf_counter() - t0}


def evaluate_artifact(plan, batch_size: int | None = None) -> dict[str, Any]:
    """Metrics of the saved artifact: a fresh backbone + the artifact, on val and test."""
    import torch

    from shpeft_core.methods import artifact_kind, artifact_sha256, artifact_size, load_artifact
    from shpeft_core.train import evaluate
    from tasks.data import build_loader, transform_for
    from tasks.spec import TaskSpec

    from .train_loop import build_backbone

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    spec = TaskSpec.model_validate(plan.task)
    device = "cuda" if plan.use_gpu and torch.cuda.is_available() else "cpu"
    model = load_artifact(build_backbone(plan.backbone, spec.num_classes), plan.method, plan.artifact_uri)
    model.to(device).eval()
    tf = transform_for(model, train=False)
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        loader = build_loader(spec, split, transform=tf, batch_size=batch_size or plan.batch_size)
        for k, v in evaluate(model, loader, num_classes=spec.num_classes, device=device).items():
            out[f"{split}_{k}"] = float(v)
    kind = artifact_kind(plan.method)
    if kind == "delta":
        from shpeft_core.delta import load_delta

        delta = load_delta(plan.artifact_uri)
        sparse = int(sum(v.numel() for v in delta.values.values()))
        out.update(sparse_values=sparse, trainable=sparse + int(sum(v.numel() for v in delta.head.values())))
    out.update(sha256=artifact_sha256(plan.artifact_uri, kind), bytes=artifact_size(plan.artifact_uri, kind),
               eval_s=time.perf_counter() - t0)
    return out


def _train_direct(launch: dict[str, Any]) -> dict[str, Any]:
    """A one-worker task, trained in this Ray task (retried on a worker crash, resuming from its checkpoint)."""
    from .train_loop import run_with_checkpoints

    t0 = time.perf_counter()
    plan = launch["plan"]
    out = run_with_checkpoints(plan, join_uri(launch["run_root"], "checkpoints"), board=launch["board"],
                               fault=launch["fault"])
    train_s = time.perf_counter() - t0
    import ray

    return {**evaluate_artifact(plan), "train_s": train_s, "resumed_from_epoch": out["resumed_from_epoch"],
            "node": ray.get_runtime_context().get_node_id()}


def _train_task(launch: dict[str, Any]) -> dict[str, Any]:
    """Runs in a zero-CPU Ray task: one task's training (see train_loop), then the artifact evaluation."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from .train_loop import train_task_loop

    t0 = time.perf_counter()
    plan = launch["plan"]
    if launch["workers"] == 1:
        res = launch["worker_resources"]
        # Retries cover a crashed worker process (max_failures), never a Python error in the task.
        direct = ray.remote(_train_direct).options(num_cpus=res["CPU"], num_gpus=res.get("GPU", 0),
                                                   max_retries=launch["max_failures"], retry_exceptions=False)
        return ray.get(direct.remote(launch))
    storage_path, storage_fs = launch["ray_storage"]
    trainer = TorchTrainer(
        train_task_loop,
        train_loop_config={"plan": plan, "board": launch["board"], "fault": launch["fault"]},
        scaling_config=ray.train.ScalingConfig(
            num_workers=launch["workers"], use_gpu=plan.use_gpu, resources_per_worker=launch["worker_resources"]
        ),
        run_config=ray.train.RunConfig(
            name=launch["run_name"],
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=launch["max_failures"]),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if getattr(result, "error", None):
        raise result.error
    train_s = time.perf_counter() - t0
    metrics = dict(result.metrics or {})
    ev = ray.get(
        ray.remote(evaluate_artifact).options(num_cpus=launch["eval_cpus"], num_gpus=launch["eval_gpus"]).remote(plan)
    )
    resumed = metrics.get("resumed_from_epoch")
    return {**ev, "train_s": train_s, "resumed_from_epoch": None if resumed is None or resumed < 0 else int(resumed)}


# ---------------------------------------------------------------- stage 1


@dataclass
class _Dataset:
    name: str
    spec: Any
    estimator: str = ""
    fingerprint: str = ""
    key: str = ""
    uri: str = ""
    cache: str = ""  # hit | miss
    error: str | None = None
    seconds: float = 0.0


@dataclass
class ImportanceMaps:
    """What stage 1 produced: per-dataset maps by (name, estimator), and each target's agnostic map."""

    maps: dict[tuple[str, str], _Dataset]
    agnostic: dict[str, dict[str, Any]]  # target name -> {key, uri, cache, error, includes_target}

    def specific(self, name: str, estimator: str) -> _Dataset:
        return self.maps[(name, estimator)]

    def uris(self) -> list[str]:
        return [d.uri for d in self.maps.values() if d.uri and not d.error]


def _cache_hit(uri: str, what: str, progress: bool) -> bool:
    """A cache entry counts only when its bytes match the checksum recorded when it was written."""
    from shpeft_core.io import verify_file

    problem = verify_file(uri)
    if problem is None:
        return True
    if problem != "missing":
        _say(f"{what}: cache entry {uri} is unusable ({problem}); recomputing it", progress)
        remove(uri)
    return False


def _pool_members(job: JobSpec, target: str, targets: list, pool_extra: list) -> list[str]:
    """The datasets whose maps form ``target``'s task-agnostic map (leave-one-out unless asked)."""
    imp = job.importance
    names = imp.pool if imp.pool is not None else [s.name for s in targets] + [s.name for s in pool_extra]
    return [n for n in names if imp.include_target or n != target]


def _importance_stage(job: JobSpec, store: str, backbone_fp: str, targets: list, pool_extra: list,
                      force: bool, progress: bool, counters: dict[str, int],
                      extra_estimators: dict[str, set[str]] | None = None) -> ImportanceMaps:
    """Every dataset's map (cached by content), then one task-agnostic map per distinct pool.

    ``extra_estimators`` asks for more maps of a target (gps ranks by grad1 whatever the job's estimator).
    """
    import ray

    from tasks.data import dataset_fingerprint

    imp = job.importance
    use_gpu = job.training.use_gpu if imp.use_gpu is None else imp.use_gpu
    settings = {
        "batches": imp.batches, "batch_size": imp.batch_size or job.training.batch_size,
        "loss": imp.loss, "head_warmup": imp.head_warmup, "seed": job.training.seed, "rules": job.selection.rules,
    }
    members = {t.name: _pool_members(job, t.name, targets, pool_extra) for t in targets}
    wanted = {n for names in members.values() for n in names} | {t.name for t in targets}
    maps: dict[tuple[str, str], _Dataset] = {}
    fingerprints: dict[str, Any] = {}
    for spec in [*targets, *pool_extra]:
        if spec.name not in wanted:
            continue
        for est in sorted({imp.estimator} | (extra_estimators or {}).get(spec.name, set())):
            d = _Dataset(spec.name, spec, estimator=est)
            try:
                if spec.name not in fingerprints:
                    fingerprints[spec.name] = dataset_fingerprint(spec)
                d.fingerprint = fingerprints[spec.name]
                d.key = importance_key(backbone_fp, d.fingerprint, job, spec.num_classes, est)
                d.uri = layout.importance_map(store, d.key)
            except Exception as exc:  # a broken dataset fails its task (and the pools holding it), not the job
                d.error = f"{type(exc).__name__}: {exc}"
            maps[(spec.name, est)] = d

    pending = {}
    by_key: dict[str, list[_Dataset]] = {}
    for d in maps.values():
        if not d.error:
            by_key.setdefault(d.key, []).append(d)
    remote = ray.remote(_compute_importance)
    for key, group in by_key.items():
        d = group[0]
        if not force and _cache_hit(d.uri, f"importance {d.name} ({d.estimator})", progress):
            for g in group:
                g.cache = "hit"
            counters["importance_loaded"] += 1
            _say(f"importance {d.name} ({d.estimator}): cache hit, nothing computed", progress)
            continue
        _say(f"importance {d.name} ({d.estimator}): computing", progress)
        ref = remote.options(num_cpus=1, num_gpus=1 if use_gpu else 0).remote(
            _backbone_dict(job), d.spec.model_dump(mode="json"), {**settings, "estimator": d.estimator},
            d.fingerprint, d.uri, use_gpu,
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
            _say(f"importance {group[0].name} ({group[0].estimator}): computed in {out['seconds']:.1f}s", progress)
        except Exception as exc:
            for g in group:
                g.error = f"importance failed: {_short_error(exc)}"
            _say(f"importance {group[0].name}: FAILED {_short_error(exc)}", progress)

    combined: dict[str, dict[str, Any]] = {}
    agnostic: dict[str, dict[str, Any]] = {}
    for t in targets:
        pool = [maps[(n, imp.estimator)] for n in members[t.name] if (n, imp.estimator) in maps]
        agnostic[t.name] = _agnostic_map(job, store, backbone_fp, t.name, pool, combined, force, progress, counters)
    return ImportanceMaps(maps=maps, agnostic=agnostic)


def _agnostic_map(job: JobSpec, store: str, backbone_fp: str, target: str, pool: list[_Dataset],
                  combined: dict[str, dict[str, Any]], force: bool, progress: bool,
                  counters: dict[str, int]) -> dict[str, Any]:
    """The combined map of ``pool`` (computed once per distinct pool and cached by content)."""
    imp = job.importance
    out = {"key": None, "uri": None, "cache": "", "error": None, "includes_target": imp.include_target}
    broken = [d.name for d in pool if d.error]
    if broken:
        out["error"] = f"task-agnostic pool dataset(s) {broken} failed: " + "; ".join(d.error for d in pool if d.error)
        return out
    if not pool:
        out["error"] = (f"the task-agnostic pool of {target} is empty (it leaves the task itself out); add "
                        "importance.pool_datasets or set importance.include_target: true")
        return out
    key = agnostic_key(backbone_fp, [d.key for d in pool], job)
    if key in combined:
        return {**combined[key], "includes_target": imp.include_target}
    uri = layout.agnostic_map(store, key)
    out.update(key=key, uri=uri)
    names = ", ".join(d.name for d in pool)
    if not force and _cache_hit(uri, f"task-agnostic importance for {target}", progress):
        out["cache"] = "hit"
        counters["importance_loaded"] += 1
        _say(f"task-agnostic importance for {target} ({names}): cache hit, nothing computed", progress)
    else:
        from shpeft_core.importance import ImportanceMap, combine_importance

        model = None
        if imp.magnitude_blend > 0:
            from .train_loop import build_backbone

            model = build_backbone(_backbone_dict(job), 2)
        maps = [ImportanceMap.load(d.uri) for d in pool]
        combine_importance(maps, normalization=imp.normalization, reduce=imp.reduce,
                           magnitude_blend=imp.magnitude_blend, model=model).save(uri)
        counters["importance_computed"] += 1
        out["cache"] = "miss"
        _say(f"task-agnostic importance for {target}: combined {len(pool)} maps ({names})", progress)
    combined[key] = out
    return out


def _short_error(exc: BaseException) -> str:
    cause = exc
    # Ray wraps the remote exception; its cause carries the user's message.
    while getattr(cause, "cause", None) is not None and cause.cause is not cause:
        cause = cause.cause
    text = f"{type(cause).__name__}: {cause}"
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if len(lines) > 3 else " ".join(lines))[:2000]


# ---------------------------------------------------------------- stage 2/3 planning


def plan_for(job: JobSpec, spec, backbone_fp: str, imaps: ImportanceMaps, *, method: str, seed: int,
             artifact: str | None, epochs: int | None = None):
    """The TaskPlan of (task, method, seed) with its importance maps resolved."""
    from .plan import build_plan

    est = "grad1" if method == "gps" else job.importance.estimator
    d = imaps.specific(spec.name, est)
    ag = imaps.agnostic.get(spec.name) or {}
    needs_agnostic = method in ("shpeft", "agnostic") and not (method == "shpeft" and job.selection.alpha == 1.0)
    error = d.error or (ag.get("error") if needs_agnostic else None)
    if error:
        raise RuntimeError(error)
    return build_plan(job, spec, method=method, seed=seed, backbone_fp=backbone_fp,
                      specific=(d.key, d.uri), agnostic=(ag["key"], ag["uri"]) if ag.get("key") else None,
                      agnostic_includes_target=job.importance.include_target, artifact_uri=artifact,
                      epochs=epochs)


def extra_estimators(job: JobSpec, targets: list, methods_by_task: dict[str, set[str]]) -> dict[str, set[str]]:
    """gps ranks by the task's grad1 map: ask stage 1 for it where the job's estimator is another."""
    return {t.name: {"grad1"} for t in targets if "gps" in methods_by_task.get(t.name, set())}


def preflight(job: JobSpec):
    """Checks that need no cluster, run before Ray starts: the store takes writes, and the backbone
    builds and has weights the job's methods can select. Returns the backbone (the driver needs it)."""
    from shpeft_core.eligibility import eligible_parameters
    from shpeft_core.methods import SPARSE_METHODS

    from .jobspec import JobSpecError, task_name
    from .train_loop import build_backbone

    check_writable(normalise_store(job.store))
    model = build_backbone(_backbone_dict(job), 2)
    methods = {job.method.for_task(task_name(t)) for t in job.tasks}
    if methods & set(SPARSE_METHODS) and not eligible_parameters(model, job.selection.rules):
        layers = [n for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv2d")][:8]
        raise JobSpecError(
            f"selection.rules: no weight of {job.backbone.name} is eligible for sparse training "
            f"(rules {job.selection.rules or 'built-in ViT/Swin/ConvNeXt rules'}); write rules that full-match "
            f"module paths of its Linear/Conv2d layers, e.g. {layers}")
    return model


def note_input_sizes(model, targets: list, progress: bool) -> None:
    """Say when a task's images are resized to another size for the backbone (a choice the user may not know)."""
    from timm.data import resolve_data_config

    input_px = int(resolve_data_config(model=model)["input_size"][-1])
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img is not None:
        input_px = int(img[-1] if isinstance(img, (tuple, list)) else img)
    for t in targets:
        if t.image_size and int(t.image_size) != input_px:
            _say(f"[{t.name}] note: images are {t.image_size} px and the backbone takes {input_px} px; they are "
                 f"resized to {input_px} px (set backbone.kwargs.img_size to train at another size)", progress)


def _fault_for(task: str, run_root: str) -> dict | None:
    """Test hook: SHPEFT_FAULT_INJECT='<task>:<epoch>' kills that task's rank-0 worker once at that epoch."""
    spec = os.environ.get("SHPEFT_FAULT_INJECT", "")
    if not spec or ":" not in spec:
        return None
    name, epoch = spec.rsplit(":", 1)
    if name != task:
        return None
    return {"epoch": int(epoch), "marker": join_uri(run_root, "fault-injected.json")}


def _verified(row: dict | None, config_hash: str) -> bool:
    from shpeft_core.methods import artifact_sha256

    if not row or row.get("status") != "ok" or row.get("config_hash") != config_hash:
        return False
    uri, kind = row.get("delta_uri"), row.get("artifact_kind") or "delta"
    try:
        return bool(uri) and artifact_sha256(uri, kind) == row.get("sha256")
    except (FileNotFoundError, OSError):
        return False


# ---------------------------------------------------------------- the job


def run_job(job: JobSpec, *, address: str | None = None, num_cpus: int | None = None, force: bool = False,
            progress: bool = True) -> JobResult:
    """Run every stage of ``job`` on Ray; returns the rows written to the catalogue and an exit code.

    Starts a local Ray (explicit ``num_cpus``, dashboard on 127.0.0.1) when Ray is not initialised and
    ``address`` is None, joins ``address`` when given, and leaves an initialised Ray alone.
    """
    import ray

    model = preflight(job)  # before Ray starts: an unusable store or backbone fails now
    started = False
    if not ray.is_initialized():
        if address is None:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, dashboard_host="127.0.0.1",
                     include_dashboard=False if os.environ.get("SHPEFT_NO_DASHBOARD") else None)
        else:
            ray.init(address=address)
        started = True
    try:
        return _run(job, model, force=force, progress=progress)
    finally:
        if started:
            ray.shutdown()


def _run(job: JobSpec, model, *, force: bool, progress: bool) -> JobResult:
    from shpeft_core.backbone import backbone_fingerprint

    from .progress import ProgressBoard, ProgressPrinter
    from .train_loop import build_backbone

    t_job = time.perf_counter()
    store = normalise_store(job.store)
    jid = compute_job_id(job)
    counters = {"importance_computed": 0, "importance_loaded": 0, "tasks_trained": 0, "tasks_skipped": 0,
                "tasks_failed": 0}
    _say(f"job {jid}: {len(job.tasks)} task(s), store {store}", progress)
    atomic_write_bytes(layout.job_file(store, jid),
                       json.dumps(job.model_dump(mode="json"), indent=1, sort_keys=True).encode())

    rows: dict[str, dict[str, Any]] = {}
    targets, target_errors = [], {}
    for entry in job.tasks:
        try:
            targets.append(resolve_task(entry))
        except Exception as exc:
            target_errors[task_name(entry)] = _short_error(exc)
    pool_extra = [resolve_task(e) for e in job.importance.pool_datasets]

    note_input_sizes(model, targets, progress)
    backbone_fp = backbone_fingerprint(model)
    methods = {t.name: {job.method.for_task(t.name)} for t in targets}
    board = ProgressBoard.remote()
    with ProgressPrinter(board, enabled=progress):
        imaps = _importance_stage(job, store, backbone_fp, targets, pool_extra, force, progress, counters,
                                  extra_estimators(job, targets, methods))

        previous = latest_rows(store, jid)
        plans = []
        for spec in targets:
            method = job.method.for_task(spec.name)
            d = imaps.specific(spec.name, job.importance.estimator)
            ag = imaps.agnostic.get(spec.name) or {}
            base = {"task": spec.name, "metric": spec.metric, "started_at": _now(), "method": method,
                    "seed": job.training.seed, "mix": job.selection.mix,
                    "importance_key": d.key, "agnostic_key": ag.get("key"),
                    "importance_cache": "hit" if d.cache == "hit" and ag.get("cache") in ("hit", "") else "miss",
                    "importance_s": d.seconds, "granularity": job.selection.granularity}
            chash = task_config_hash(job, spec, d.key, ag.get("key"), method=method)
            try:
                plan = plan_for(job, spec, backbone_fp, imaps, method=method, seed=job.training.seed,
                                artifact=layout.task_artifact(store, spec.name, jid, chash, method),
                                epochs=(job.sweep.epochs or job.training.epochs) if job.sweep.enabled else None)
            except Exception as exc:
                rows[spec.name] = {**base, "status": "failed", "error": _short_error(exc), "finished_at": _now()}
                continue
            base.update(config_hash=chash, artifact_kind=_kind(method), granularity=plan.granularity)
            if not force and _verified(previous.get(spec.name), chash):
                rows[spec.name] = {**previous[spec.name], "trained": False}
                counters["tasks_skipped"] += 1
                _say(f"[{spec.name}] artifact verified (sha256 {previous[spec.name]['sha256'][:12]}), skipped", progress)
                continue
            plans.append((plan, base, chash))
        for name, err in target_errors.items():
            rows[name] = {"task": name, "status": "failed", "error": err, "started_at": _now(), "finished_at": _now()}
        if rows:
            write_rows(store, jid, rows.values())

        if job.sweep.enabled and plans:
            from .sweep import run_sweeps

            swept = run_sweeps(job, store, jid, [(plan, chash) for plan, _, chash in plans], board, force, progress)
            for plan, base, _ in plans:
                got = swept[plan.task_name]
                rows[plan.task_name] = _finish_row(base, lambda: got if "error" not in got else _raise(got["error"]))
                _after_task(rows[plan.task_name], counters, store, jid, progress)
        else:
            _train_all(job, store, plans, board, force, progress, rows, counters, jid)

    ordered = [rows[task_name(e)] for e in job.tasks if task_name(e) in rows]
    failed = [r["task"] for r in ordered if r.get("status") != "ok"]
    plots: list[str] = []
    try:
        from .plots import write_plots

        plots = write_plots(store, jid, ordered, imaps.uris(),
                            next((a["uri"] for a in imaps.agnostic.values() if a.get("uri")), None))
    except Exception as exc:  # plots are a convenience; a plotting problem must not fail the job
        _say(f"plots skipped: {_short_error(exc)}", progress)
    result = JobResult(job_id=jid, store=store, rows=ordered, failed=failed, counters=counters,
                       catalogue_uri=catalogue_uri(store, jid), plots=plots)
    if progress:
        print_results_table(ordered)
        _say(f"job {jid}: {len(ordered) - len(failed)} ok, {len(failed)} failed in {time.perf_counter() - t_job:.1f}s; "
             f"catalogue {result.catalogue_uri}", progress)
    return result


def _raise(message: str):
    raise RuntimeError(message)


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
        layout.write_latest(store, {**row, "job_id": jid})
        counters["tasks_trained"] += 1
        metric = row.get("metric") or "macro_f1"
        _say(f"[{row['task']}] done: val_{metric} {row.get('val_' + metric, float('nan')):.4f} "
             f"test_{metric} {row.get('test_' + metric, float('nan')):.4f} -> {row.get('delta_uri')}", progress)
    else:
        counters["tasks_failed"] += 1
        _say(f"[{row['task']}] FAILED: {row.get('error')}", progress)
    write_rows(store, jid, [row])


def _kind(method: str) -> str:
    from shpeft_core.methods import artifact_kind

    return artifact_kind(method)


def _train_all(job, store, plans, board, force, progress, rows, counters, jid):
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
    ray_storage = _ray_storage(join_uri(store, "runs"))  # Ray Train's run folder: runs/<run_name>
    eval_res = _worker_resources(job)
    queue = list(plans)
    in_flight: dict[Any, tuple] = {}
    while queue or in_flight:
        while queue and len(in_flight) < slots:
            plan, base, chash = queue.pop(0)
            run_name = f"{jid}-{plan.task_name}-{chash}"
            run_root = layout.run_root(store, jid, plan.task_name, chash)
            if force:
                remove(run_root, recursive=True)
            launch = {
                "plan": plan, "board": board, "fault": _fault_for(plan.task_name, run_root),
                "run_name": run_name, "ray_storage": ray_storage, "run_root": run_root,
                "workers": job.training.workers_per_task, "worker_resources": _worker_resources(job),
                "max_failures": job.training.max_failures,
                "eval_cpus": eval_res["CPU"], "eval_gpus": eval_res.get("GPU", 0),
            }
            _say(f"[{plan.task_name}] training {plan.method} (run {run_name})", progress)
            base = {**base, "density": plan.density, "alpha": plan.alpha, "delta_uri": plan.artifact_uri,
                    "started_at": _now()}
            in_flight[launcher.remote(launch)] = (plan, base)
        done, _ = ray.wait(list(in_flight), num_returns=1)
        plan, base = in_flight.pop(done[0])
        rows[plan.task_name] = _finish_row(base, lambda: ray.get(done[0]))
        _after_task(rows[plan.task_name], counters, store, jid, progress)


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
