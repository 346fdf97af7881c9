"""Stage 1: every dataset's importance map (a Ray task each, cached by content), then one task-agnostic
map per distinct pool (leave-one-out by default), cached too; per seed where a comparison asks for
several (each seed draws the map's batches and warm head, so seeds vary what they should); for a method
that ranks by a pass of its own (GPS), that map too, keyed apart from the job's; a task whose agnostic map is the pre-trained
weights' magnitude (``importance.agnostic``, orchestrator/job/agnostic.py) gets that one, computed once
and cached by the backbone's fingerprint. A cache entry counts only when its bytes match the checksum
recorded when it was written; a damaged one is reported and recomputed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


from orchestrator.store import layout
from orchestrator.runtime.console import say, short_error
from orchestrator.job.spec import JobSpec
from orchestrator.job.agnostic import agnostic_source
from orchestrator.job.agnostic import pool_members as _pool_members
from orchestrator.job.keys import agnostic_key, backbone_dict, importance_key, magnitude_key

__all__ = ['DatasetMap', 'ImportanceMaps', 'run_importance_stage', 'extra_variants', 'pool_members']


def compute_dataset_importance(backbone: dict, spec_json: dict, settings: dict, dataset_fp: str, uri: str,
                        use_gpu: bool, board=None) -> dict[str, Any]:
    from orchestrator.runtime.tasklog import captured_output

    with captured_output(board, spec_json["name"]):
        return _compute_dataset_importance(backbone, spec_json, settings, dataset_fp, uri, use_gpu, board)


def _compute_dataset_importance(backbone: dict, spec_json: dict, settings: dict, dataset_fp: str, uri: str,
                                use_gpu: bool, board) -> dict[str, Any]:
    import torch

    from shpeft_core.importance import ImportanceConfig, compute_importance
    from tasks.loaders import build_loader
    from tasks.transforms import transform_for
    from tasks.spec import TaskSpec

    from shpeft_core.backbone import build_backbone

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    spec = TaskSpec.model_validate(spec_json)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    model = build_backbone(backbone, spec.num_classes)
    if settings.get("views") == "gps":  # GPS's pass contrasts two augmented views of every image
        from tasks.transforms import gps_views

        transform = gps_views(model)
    else:
        transform = transform_for(model, train=False)
    loader = build_loader(spec, "train", transform=transform, batch_size=settings["batch_size"], shuffle=True,
                          seed=settings["seed"], cache=settings.get("data_cache"))
    config = ImportanceConfig(estimator=settings["estimator"], num_batches=settings["batches"],
                              head_warmup=settings["head_warmup"], loss=settings["loss"],
                              rules=tuple(settings["rules"]) if settings["rules"] else None)
    label = f"{spec.name} ({settings['variant']}, seed {settings['seed']})"

    def on_batch(done: int, total: int) -> None:
        if board is not None:
            board.push.remote({"kind": "importance", "name": label, "done": done, "total": total})

    imap = compute_importance(model, loader, config, num_classes=spec.num_classes, dataset_fingerprint=dataset_fp,
                              device=device, backbone_name=backbone["name"], on_batch=on_batch, kind=spec.kind,
                              seed=settings["seed"])
    sha = imap.save(uri)
    return {"uri": uri, "sha256": sha, "seconds": time.perf_counter() - t0}


@dataclass
class DatasetMap:
    name: str
    spec: Any
    estimator: str = ""  # the variant: the job's estimator, or a method's own pass ("gps")
    seed: int = 0
    fingerprint: str = ""
    key: str = ""
    uri: str = ""
    cache: str = ""  # hit | miss
    error: str | None = None
    seconds: float = 0.0


@dataclass
class ImportanceMaps:
    """What stage 1 produced: per-dataset maps by (name, variant, seed), and each target's agnostic map
    (``agnostic``: at the job's seed; ``agnostic_for``: at any seed computed)."""

    maps: dict[tuple[str, str, int], DatasetMap]
    agnostic: dict[str, dict[str, Any]]  # target -> {key, uri, cache, error, includes_target, source, datasets}
    seed: int = 0  # the job's seed (training.seed): what ``seed=None`` means
    agnostic_by_seed: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)

    def specific(self, name: str, variant: str, seed: int | None = None) -> DatasetMap:
        return self.maps[(name, variant, self.seed if seed is None else int(seed))]

    def agnostic_for(self, name: str, seed: int | None = None) -> dict[str, Any]:
        if seed is None or int(seed) == self.seed:
            return self.agnostic.get(name) or {}
        return self.agnostic_by_seed.get((name, int(seed))) or {}

    def named_uris(self, estimator: str) -> dict[str, str]:
        """Dataset name -> its map computed with ``estimator`` (the job's) at the job's seed, for plots and reports."""
        return {name: d.uri for (name, est, seed), d in self.maps.items()
                if est == estimator and seed == self.seed and d.uri and not d.error}


def cache_hit(uri: str, what: str, progress: bool) -> bool:
    """A cache entry counts only when its bytes match the checksum recorded when it was written."""
    from shpeft_core.io import verify_file

    problem = verify_file(uri)
    if problem is None:
        return True
    if problem != "missing":
        # Not removed: the recomputed map replaces it atomically, and a map whose checksum another job is
        # about to write (written map first, sidecar second) must not be deleted under that job.
        say(f"{what}: cache entry {uri} is unusable ({problem}); recomputing it", progress)
    return False


def pool_members(job: JobSpec, target: str, targets: list, pool_extra: list) -> list[str]:
    """The datasets whose maps form ``target``'s task-agnostic map: its pool (leave-one-out unless asked),
    or none when its agnostic map is the magnitude map."""
    members = _pool_members(job, target, [s.name for s in targets], [s.name for s in pool_extra])
    return members if agnostic_source(job, members) == "pool" else []


def importance_gpu(job: JobSpec) -> bool:
    return bool(job.training.use_gpu if job.importance.use_gpu is None else job.importance.use_gpu)


def _compute_packed(args: tuple) -> dict[str, Any]:
    return compute_dataset_importance(*args)


def run_importance_stage(ctx, targets: list, pool_extra: list,
                         methods_by_task: dict[str, set[str]] | None = None,
                         seeds: list[int] | None = None) -> ImportanceMaps:
    """Every dataset's map (cached by content), then one task-agnostic map per distinct pool, at each seed.

    ``methods_by_task`` names the methods each target will run: the maps they rank by are computed besides
    the job's (``extra_variants``). ``seeds`` (default: ``training.seed`` alone, as ``shpeft run`` uses)
    draw each map's batches and warm head. ``ctx.workers`` (a ``worker_pool.WorkerPool``) computes the
    maps in its warm actors instead of one Ray task (1 CPU) each; its actors must hold a GPU exactly when
    ``importance_gpu(job)``.
    """
    import ray

    from shpeft_core.methods import get_method

    from orchestrator.stages.fingerprints import fingerprint_for_job

    job, store, backbone_fp, force, progress = ctx.job, ctx.store, ctx.backbone_fp, ctx.force, ctx.progress
    workers, board = ctx.workers, ctx.board
    seeds = list(dict.fromkeys(seeds or [job.training.seed]))
    extras = extra_variants(job, targets, methods_by_task or {})
    imp = job.importance
    use_gpu = importance_gpu(job)
    base_settings = {
        "batches": imp.batches, "batch_size": imp.batch_size or job.training.batch_size,
        "loss": imp.loss, "head_warmup": imp.head_warmup, "rules": job.selection.rules,
        "data_cache": layout.data_cache(store), "estimator": imp.estimator, "variant": imp.estimator,
    }
    members = {t.name: pool_members(job, t.name, targets, pool_extra) for t in targets}
    wanted = {n for names in members.values() for n in names} | {t.name for t in targets}
    maps: dict[tuple[str, str, int], DatasetMap] = {}
    settings_of: dict[tuple[str, str, int], dict] = {}
    fingerprints: dict[str, Any] = {}
    for spec in [*targets, *pool_extra]:
        if spec.name not in wanted:
            continue
        variants = {imp.estimator: None, **extras.get(spec.name, {})}  # variant -> the method defining it
        for variant, method in sorted(variants.items()):
            own = get_method(method).own_importance if method else None
            settings = get_method(method).importance_settings(base_settings) if method else dict(base_settings)
            for seed in seeds:
                d = DatasetMap(spec.name, spec, estimator=variant, seed=seed)
                try:
                    if spec.name not in fingerprints:
                        fingerprints[spec.name] = fingerprint_for_job(spec, store)
                    d.fingerprint = fingerprints[spec.name]
                    d.key = importance_key(backbone_fp, d.fingerprint, job, spec.num_classes, settings["estimator"],
                                           seed=seed, own=own)
                    d.uri = layout.importance_map(store, d.key)
                except Exception as exc:  # a broken dataset fails its task (and the pools holding it), not the job
                    d.error = f"{type(exc).__name__}: {exc}"
                maps[(spec.name, variant, seed)] = d
                settings_of[(spec.name, variant, seed)] = {**settings, "variant": variant, "seed": seed}

    pending: dict[Any, list[DatasetMap]] = {}  # Ray task ref -> maps
    for_pool: dict[str, tuple[list[DatasetMap], tuple]] = {}  # key -> (maps, arguments)
    by_key: dict[str, list[DatasetMap]] = {}
    for d in maps.values():
        if not d.error:
            by_key.setdefault(d.key, []).append(d)
    remote = ray.remote(compute_dataset_importance)
    several = len(seeds) > 1
    for key, group in by_key.items():
        d = group[0]
        what = f"importance {d.name} ({d.estimator}{f', seed {d.seed}' if several else ''})"
        if not force and cache_hit(d.uri, what, progress):
            for g in group:
                g.cache = "hit"
            ctx.count("importance_loaded")
            say(f"{what}: cache hit, nothing computed", progress)
            continue
        say(f"{what}: computing", progress)
        args = (backbone_dict(job), d.spec.model_dump(mode="json"), settings_of[(d.name, d.estimator, d.seed)],
                d.fingerprint, d.uri, use_gpu, board)
        if workers is not None:
            for_pool[key] = (group, args)
        else:
            pending[remote.options(num_cpus=1, num_gpus=1 if use_gpu else 0).remote(*args)] = group

    def finished(group: list[DatasetMap], get_result) -> None:
        d = group[0]
        what = f"importance {d.name} ({d.estimator}{f', seed {d.seed}' if several else ''})"
        try:
            out = get_result()
            ctx.count("importance_computed")
            for g in group:
                g.cache, g.seconds = "miss", out["seconds"]
            say(f"{what}: computed in {out['seconds']:.1f}s", progress)
        except Exception as exc:
            for g in group:
                g.error = f"importance failed: {short_error(exc)}"
            say(f"{what}: FAILED {short_error(exc)}", progress)

    if for_pool:
        # retried 3 times when its process dies, as Ray retries a task
        workers.run(_compute_packed, [(k, args) for k, (_, args) in for_pool.items()], max_failures=3,
                    on_done=lambda k, get_result: finished(for_pool[k][0], get_result))
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        finished(pending.pop(done[0]), lambda: ray.get(done[0]))

    combined: dict[str, dict[str, Any]] = {}
    agnostic: dict[tuple[str, int], dict[str, Any]] = {}
    for seed in seeds:
        for t in targets:
            if not members[t.name] and agnostic_source(job, []) == "magnitude":
                agnostic[(t.name, seed)] = magnitude_map(ctx, t.name, combined)
                continue
            pool = [maps[(n, imp.estimator, seed)] for n in members[t.name] if (n, imp.estimator, seed) in maps]
            agnostic[(t.name, seed)] = agnostic_map(ctx, t.name, pool, combined)
    first = seeds[0] if job.training.seed not in seeds else job.training.seed
    return ImportanceMaps(maps=maps, agnostic={t.name: agnostic[(t.name, first)] for t in targets}, seed=first,
                          agnostic_by_seed=agnostic)


def magnitude_map(ctx, target: str, combined: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The pre-trained weights' |w| as ``target``'s agnostic map (computed once per job, cached by content)."""
    job, store, backbone_fp, force, progress = ctx.job, ctx.store, ctx.backbone_fp, ctx.force, ctx.progress
    key = magnitude_key(backbone_fp, job)
    why = "importance.agnostic: magnitude" if job.importance.agnostic == "magnitude" else "no other dataset to pool"
    if key in combined:
        say(f"task-agnostic importance for {target}: the pre-trained weights' magnitude |w| ({why})", progress)
        return {**combined[key], "includes_target": False}
    uri = layout.agnostic_map(store, key)
    out = {"key": key, "uri": uri, "cache": "", "error": None, "includes_target": False, "source": "magnitude",
           "datasets": []}
    if not force and cache_hit(uri, f"task-agnostic importance for {target}", progress):
        out["cache"] = "hit"
        ctx.count("importance_loaded")
    else:
        from shpeft_core.backbone import build_backbone
        from shpeft_core.importance import magnitude_importance

        model = build_backbone(backbone_dict(job), 2)
        magnitude_importance(model, job.selection.rules).save(uri)
        ctx.count("importance_computed")
        out["cache"] = "miss"
    say(f"task-agnostic importance for {target}: the pre-trained weights' magnitude |w| ({why})", progress)
    combined[key] = out
    return out


def agnostic_map(ctx, target: str, pool: list[DatasetMap], combined: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The combined map of ``pool`` (computed once per distinct pool and cached by content)."""
    job, store, backbone_fp, force, progress = ctx.job, ctx.store, ctx.backbone_fp, ctx.force, ctx.progress
    imp = job.importance
    out = {"key": None, "uri": None, "cache": "", "error": None, "includes_target": imp.include_target,
           "source": "pool+magnitude" if imp.magnitude_blend > 0 else "pool", "datasets": [d.name for d in pool]}
    broken = [d.name for d in pool if d.error]
    if broken:
        out["error"] = f"task-agnostic pool dataset(s) {broken} failed: " + "; ".join(d.error for d in pool if d.error)
        return out
    if not pool:
        out["error"] = (f"the task-agnostic pool of {target} is empty (it leaves the task itself out); add "
                        "importance.pool_datasets, or set importance.agnostic: magnitude or auto (the pre-trained "
                        "weights' |w|), or importance.include_target: true")
        return out
    key = agnostic_key(backbone_fp, [d.key for d in pool], job)
    if key in combined:
        return {**combined[key], "includes_target": imp.include_target, "datasets": [d.name for d in pool]}
    uri = layout.agnostic_map(store, key)
    out.update(key=key, uri=uri)
    names = ", ".join(d.name for d in pool)
    seeds = sorted({d.seed for d in pool})
    if seeds != [job.training.seed]:  # maps of another seed than the job's: say which (compare runs one per seed)
        names += f"; seed {', '.join(map(str, seeds))}"
    if not force and cache_hit(uri, f"task-agnostic importance for {target}", progress):
        out["cache"] = "hit"
        ctx.count("importance_loaded")
        say(f"task-agnostic importance for {target} ({names}): cache hit, nothing computed", progress)
    else:
        from shpeft_core.importance import ImportanceMap, combine_importance

        model = None
        if imp.magnitude_blend > 0:
            from shpeft_core.backbone import build_backbone

            model = build_backbone(backbone_dict(job), 2)
        maps = [ImportanceMap.load(d.uri) for d in pool]
        combine_importance(maps, normalization=imp.normalization, reduce=imp.reduce,
                           magnitude_blend=imp.magnitude_blend, model=model).save(uri)
        ctx.count("importance_computed")
        out["cache"] = "miss"
        say(f"task-agnostic importance for {target}: combined {len(pool)} maps ({names})", progress)
    combined[key] = out
    return out


def extra_variants(job: JobSpec, targets: list, methods_by_task: dict[str, set[str]]) -> dict[str, dict[str, str]]:
    """The maps each target's methods rank by besides the job's: {target: {variant: a method defining it}}
    (gps ranks by its own pass, whatever the job's estimator is); stage 1 computes them too."""
    from shpeft_core.methods import get_method

    est = job.importance.estimator
    out: dict[str, dict[str, str]] = {}
    for t in targets:
        for name in sorted(methods_by_task.get(t.name, set())):
            m = get_method(name)
            variant = m.importance_variant(est)
            if m.uses_importance and variant != est:
                out.setdefault(t.name, {}).setdefault(variant, name)
    return out
