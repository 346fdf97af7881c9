"""One typed, frozen plan per training run: what to train, on which data, from which importance, to where.

Built once from the job file by :func:`build_plan` and handed unchanged to every stage (plain training,
each sweep trial, each comparison run). Ray-only things (the progress board, a fault to inject) travel
beside it, never inside it. This is also the one place that assembles a delta's metadata.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from shpeft_core.methods import get_method
from shpeft_core.options import DEFAULT_METRIC

from orchestrator.job.spec import JobSpec

__all__ = ["TaskPlan", "build_plan", "plan_for", "task_maps"]


@dataclass(frozen=True)
class TaskPlan:
    task: dict[str, Any]  # TaskSpec as JSON
    backbone: dict[str, Any]  # BackboneSection as JSON
    method: str
    seed: int
    density: float
    alpha: float
    mix: str
    granularity: str
    rules: tuple[str, ...] | None
    specific_uri: str | None  # the task map the method ranks by; also holds the warmed head unless head_uri
    agnostic_uri: str | None  # the task-agnostic map for this task
    head_init: str  # warm | random
    train: dict[str, Any]  # TrainConfig keyword arguments (without device)
    batch_size: int
    data_workers: int
    use_gpu: bool
    settings: dict[str, Any] | None  # the method's own settings (Method.settings), e.g. LoRA's rank
    artifact_uri: str | None  # where the finished run writes its artifact
    metadata: dict[str, str] = field(default_factory=dict)  # artifact header metadata
    data_cache: str | None = None  # the store's data cache (prepared arrays) for the loaders; set by stages
    head_uri: str | None = None  # the map whose warmed head the run starts from, where not specific_uri (gps)
    equal_budget: bool = False  # the mask takes the job's k where its own rule would not (per row)
    importance_seed: int | None = None  # the seed that drew the maps' batches and warm head

    @property
    def task_name(self) -> str:
        return self.task["name"]

    @property
    def num_classes(self) -> int:
        return int(self.task["num_classes"])

    @property
    def metric(self) -> str:
        return self.task.get("metric") or DEFAULT_METRIC

    @property
    def kind(self) -> str:
        """The task kind (shpeft_core.objectives): what the loss and the probabilities are."""
        return self.task.get("kind") or "single_label"

    @property
    def head_map_uri(self) -> str | None:
        """The map holding the warmed head this run starts from."""
        return self.head_uri or self.specific_uri

    def with_search_point(self, *, density: float | None = None, alpha: float | None = None,
                          lr: float | None = None, artifact_uri: str | None = None,
                          settings: dict[str, Any] | None = None, **meta: str) -> "TaskPlan":
        """The same plan at another (density, alpha, lr, method settings such as LoRA's rank): a sweep
        trial or a comparison's tuned point. A head-only method's lr is its head's."""
        m = get_method(self.method)
        density = self.density if density is None else float(density)
        alpha = m.alpha(self.alpha if alpha is None else float(alpha))
        train = dict(self.train) if lr is None else {**self.train, "lr": float(lr)}
        if lr is not None and m.head_only:
            train["head_lr"] = float(lr)
        own = self.settings if settings is None else {**(self.settings or {}), **settings}
        metadata = {**self.metadata, "density": repr(density), "alpha": repr(alpha), "lr": repr(train["lr"]), **meta}
        return dataclasses.replace(self, density=density, alpha=alpha, train=train, metadata=metadata, settings=own,
                                   artifact_uri=artifact_uri if artifact_uri is not None else self.artifact_uri)


def build_plan(job, spec, *, method: str, seed: int, backbone_fp: str, specific: tuple[str, str] | None,
               agnostic: tuple[str, str] | None, agnostic_includes_target: bool, artifact_uri: str | None,
               epochs: int | None = None, agnostic_source: str = "", head: tuple[str, str] | None = None,
               importance_seed: int | None = None, equal_budget: bool = False) -> TaskPlan:
    """The plan of one (task, method, seed). ``specific``/``agnostic``/``head`` are (key, uri) of the maps
    (``head``: where the warm head comes from when it is not ``specific``); ``agnostic_source`` says what
    the agnostic map is (pool, pool+magnitude or magnitude); ``importance_seed`` drew the maps."""
    from shpeft_core.backbone import source_label

    tr = job.training
    m = get_method(method)
    lr = job.method.lr.get(method, tr.lr if tr.lr is not None else m.default_lr)
    train = {
        "epochs": epochs or tr.epochs, "lr": lr, "head_lr": tr.head_lr if tr.head_lr is not None else lr,
        "weight_decay": tr.weight_decay, "warmup_epochs": tr.warmup_epochs, "seed": seed,
        "label_smoothing": tr.label_smoothing,
    }
    alpha = m.alpha(job.selection.alpha)
    metadata = {
        "backbone": job.backbone.name,
        "backbone_source": source_label(job.backbone.source),
        "backbone_kwargs": json.dumps(job.backbone.kwargs, sort_keys=True),
        "backbone_fingerprint": backbone_fp,
        "num_classes": str(spec.num_classes),
        "class_names": json.dumps(spec.names()),
        "method": method,
        "density": repr(float(job.selection.density)),
        "alpha": repr(float(alpha)),
        "mix": job.selection.mix,
        "estimator": m.importance_estimator(job.importance.estimator) if m.uses_importance else "none",
        "importance_key": (specific[0] if specific and m.uses_importance else ""),
        "agnostic_importance_key": (agnostic[0] if agnostic and m.needs_agnostic(job.selection.alpha) else ""),
        "agnostic_includes_target": json.dumps(bool(agnostic_includes_target)),
        "agnostic_source": agnostic_source if agnostic and m.needs_agnostic(job.selection.alpha) else "",
        "granularity": m.granularity(job.selection.granularity),
        "head_init": tr.head_init,
        "seed": str(seed),
        "importance_seed": str(job.training.seed if importance_seed is None else importance_seed),
        "lr": repr(lr),
        "task": spec.name,
        "metric": spec.metric,
    }
    if spec.kind != "single_label":  # serving forms probabilities by it (absent: single_label)
        metadata["task_kind"] = spec.kind
    if equal_budget:
        metadata["equal_budget"] = "true"
    return TaskPlan(
        task=spec.model_dump(mode="json"),
        backbone=job.backbone.model_dump(mode="json"),
        method=method,
        seed=seed,
        density=float(job.selection.density),
        alpha=alpha,
        mix=job.selection.mix,
        granularity=metadata["granularity"],
        rules=tuple(job.selection.rules) if job.selection.rules else None,
        specific_uri=specific[1] if specific else None,
        agnostic_uri=agnostic[1] if agnostic else None,
        head_init=tr.head_init,
        train=train,
        batch_size=tr.batch_size,
        data_workers=tr.data_workers,
        use_gpu=tr.use_gpu,
        settings=m.settings(job.method),
        artifact_uri=artifact_uri,
        metadata=metadata,
        head_uri=head[1] if head and specific and head[1] != specific[1] else None,
        equal_budget=bool(equal_budget),
        importance_seed=importance_seed,
    )


def task_maps(job: JobSpec, spec, imaps, method: str, importance_seed: int | None = None):
    """(the map the method ranks by, the map its warm head comes from, the task-agnostic map) of a task at
    ``importance_seed`` (None: the job's seed)."""
    m = get_method(method)
    est = job.importance.estimator
    ranked = imaps.specific(spec.name, m.importance_variant(est) if m.uses_importance else est, importance_seed)
    head = imaps.specific(spec.name, est, importance_seed)
    return ranked, head, imaps.agnostic_for(spec.name, importance_seed)


def plan_for(job: JobSpec, spec, backbone_fp: str, imaps, *, method: str, seed: int,
             artifact: str | None, epochs: int | None = None, importance_seed: int | None = None,
             equal_budget: bool = False):
    """The TaskPlan of (task, method, seed) with its importance maps resolved (drawn with ``importance_seed``,
    None: the job's seed)."""
    m = get_method(method)
    d, head, ag = task_maps(job, spec, imaps, method, importance_seed)
    needs_agnostic = m.needs_agnostic(job.selection.alpha)
    error = d.error or head.error or (ag.get("error") if needs_agnostic else None)
    if error:
        raise RuntimeError(error)
    return build_plan(job, spec, method=method, seed=seed, backbone_fp=backbone_fp,
                      specific=(d.key, d.uri), head=(head.key, head.uri),
                      agnostic=(ag["key"], ag["uri"]) if ag.get("key") and needs_agnostic else None,
                      agnostic_includes_target=job.importance.include_target, artifact_uri=artifact,
                      epochs=epochs, agnostic_source=ag.get("source") or "", importance_seed=importance_seed,
                      equal_budget=equal_budget)
