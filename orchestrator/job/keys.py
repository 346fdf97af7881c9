"""Content keys: what makes an importance map, a task-agnostic map or a task's artifact the same one."""

from __future__ import annotations

from typing import Any

from shpeft_core.methods import get_method

from orchestrator.job.spec import JobSpec, TrainingSection, affects_results, content_hash

__all__ = ['backbone_dict', 'importance_key', 'agnostic_key', 'magnitude_key', 'task_config_hash', 'job_id']


def backbone_dict(job: JobSpec) -> dict[str, Any]:
    return job.backbone.model_dump(mode="json")


def importance_key(backbone_fp: str, dataset_fp: str, job: JobSpec, num_classes: int,
                   estimator: str | None = None, *, seed: int | None = None, own: dict[str, Any] | None = None) -> str:
    """Content key of one dataset's importance map: the weights, the data and the estimator settings.

    ``seed`` draws its batches and warm head (default: ``training.seed``, the key ``shpeft run`` uses);
    ``own`` is a method's own settings over the job's (``Method.own_importance``, e.g. GPS's pass): its
    fields replace the job's and its ``views`` marks the map apart, so it cannot share a key with a map
    of the job's settings."""
    imp = job.importance
    own = {k: v for k, v in (own or {}).items() if k != "name"}
    key = {
        "kind": "dataset-importance",
        "backbone": job.backbone.name,
        "backbone_kwargs": job.backbone.kwargs,
        "backbone_fingerprint": backbone_fp,
        "dataset_fingerprint": dataset_fp,
        "num_classes": num_classes,
        "estimator": own.get("estimator") or estimator or imp.estimator,
        "batches": imp.batches,
        "batch_size": imp.batch_size or job.training.batch_size,
        "loss": imp.loss,
        "head_warmup": imp.head_warmup,
        "rules": job.selection.rules,
        "seed": job.training.seed if seed is None else int(seed),
        "format": "warm-head",  # maps carry the warmed head since this format
    }
    key.update(own)  # only a method's own settings add keys (views), so the job's maps keep theirs
    return content_hash(key, length=24)


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


def magnitude_key(backbone_fp: str, job: JobSpec) -> str:
    """Content key of the magnitude map: the weights and which of them are eligible, nothing else."""
    return content_hash(
        {"kind": "magnitude-importance", "backbone_fingerprint": backbone_fp, "rules": job.selection.rules},
        length=24,
    )


def task_config_hash(job: JobSpec, spec, specific_key: str, agnostic: str | None, *, method: str | None = None,
                     seed: int | None = None, head_key: str | None = None, point: dict[str, Any] | None = None,
                     equal_budget: bool = False) -> str:
    """Everything that changes a task's artifact; the training fields marked resource-only are left out.

    ``head_key``: the map the warm head comes from where it is not ``specific_key`` (a method ranking by a
    map of its own); ``point``: values a comparison chose for this run over the job's (lr, alpha, rank);
    ``equal_budget``: the mask takes the job's k where its own rule would not. Each enters the hash only
    when given, so the keys of runs without them hold."""
    tr = {k: v for k, v in job.training.model_dump(mode="json").items() if affects_results(TrainingSection, k)}
    tr["seed"] = job.training.seed if seed is None else seed
    method = method or job.method.for_task(spec.name)
    revision = get_method(method).revision
    return content_hash(
        {
            # a method's revision enters only once it is raised, so the keys of unchanged methods hold
            **({"method_revision": revision} if revision else {}),
            "backbone": backbone_dict(job),
            "task": spec.model_dump(mode="json"),
            "importance": [specific_key, agnostic] + ([head_key] if head_key and head_key != specific_key else []),
            "method": method,
            # the method's own settings; named "lora" (the first method to have any) so existing keys hold
            "lora": get_method(method).settings(job.method),
            "selection": job.selection.model_dump(mode="json"),
            "training": tr,
            "sweep": job.sweep.model_dump(mode="json") if job.sweep.enabled else None,
            **({"point": point} if point else {}),
            **({"equal_budget": True} if equal_budget else {}),
        }
    )


def job_id(job: JobSpec) -> str:
    """Short hex id derived from the job's content (canonical JSON of the validated job).

    Where a job is tracked is not part of what it computes: the tracking section is left out, so adding
    it keeps the job's id (and its finished artifacts). Classes a task leaves to its folders are resolved
    first (orchestrator.job.classes): the job has the id of the one with them written out."""
    from orchestrator.job.classes import with_classes

    return content_hash(with_classes(job).model_dump(mode="json", exclude={"tracking"}), length=12)
