"""Every check that can run before any compute, with every problem reported at once (`shpeft validate`).

The schema is checked when the job file is loaded; this adds what needs the outside world: the timm model
and its keyword arguments, local weight files, catalogue names and their overrides, each dataset's files
(listed and counted, not decoded), the store (writable, backend installed), eligible weights, whether
one task's workers fit the cluster, the tracking section (backends installed, local folders writable), and
that every task that runs a hybrid has a task-agnostic map to mix in. Each problem names its field. Nothing
is written: the store and tracking folders are checked for what can be known without writing
(``shpeft_core.io.check_store_usable``); ``shpeft run`` writes a probe when it starts.
"""

from __future__ import annotations

import os

from orchestrator.job.spec import CatalogueTaskRef, JobSpec, resolve_task, task_name

__all__ = ["validate_job"]


def _first_line(exc: BaseException) -> str:
    """One line: a pydantic error's fields and messages, else the exception's first line."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors())
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _check_backbone(job: JobSpec, problems: list[str]):
    import timm

    from shpeft_core.backbone import BackboneSpec, create_backbone

    name = job.backbone.name
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        problems.append(f"backbone.name: {name!r} is not a timm model" + (f" (similar: {close})" if close else ""))
        return None
    source = job.backbone.source
    if source not in (None, "", "random", "hub") and "://" not in source and not os.path.isfile(source):
        problems.append(f"backbone.source: {source} does not exist")
        return None
    try:
        # Random weights: checks the name and kwargs without fetching anything.
        return create_backbone(BackboneSpec(name, None, dict(job.backbone.kwargs)), 2)
    except Exception as exc:  # timm reports bad kwargs as TypeError / ValueError / AssertionError
        problems.append(f"backbone.kwargs: timm.create_model({name!r}, **{job.backbone.kwargs}) fails: "
                        f"{_first_line(exc)}")
        return None


def _check_tasks(job: JobSpec, problems: list[str], data: bool) -> None:
    from tasks.check import check_dataset

    entries = [(f"tasks[{i}]", e) for i, e in enumerate(job.tasks)]
    entries += [(f"importance.pool_datasets[{i}]", e) for i, e in enumerate(job.importance.pool_datasets)]
    for where, entry in entries:
        field = f"{where}.catalogue/overrides" if isinstance(entry, CatalogueTaskRef) else where
        try:
            spec = resolve_task(entry)
        except Exception as exc:
            problems.append(f"{field}: {_first_line(exc)}")
            continue
        if not data:
            continue
        try:
            check_dataset(spec, decode=False, fingerprint=False)
        except Exception as exc:
            problems.append(f"{where} ({task_name(entry)}): {_first_line(exc)}")


def _check_agnostic_pool(job: JobSpec, problems: list[str], methods: list[str] | None) -> None:
    """A hybrid whose pooled task-agnostic map would be empty (one task, no pool datasets) fails here, not
    on the cluster after its importance pass."""
    from orchestrator.job.agnostic import empty_pool_problems

    problems.extend(empty_pool_problems(job, methods))


def validate_job(job: JobSpec, *, data: bool = True, cpus: float | None = None, gpus: float | None = None,
                 methods: list[str] | None = None) -> list[str]:
    """Problems found in ``job`` (empty when it can run). ``data=False`` skips what needs the data and
    the store (a client submitting to a cluster may not reach them). ``cpus``/``gpus``: the cluster's size.
    ``methods``: the methods that will run (``shpeft compare``'s), default the job's own."""
    from shpeft_core.eligibility import eligible_parameters
    from shpeft_core.io import StorageError, check_store_usable
    from shpeft_core.methods import get_method

    from orchestrator.runtime.resources import trainer_slots
    from orchestrator.store.layout import normalise_store

    problems: list[str] = []
    model = _check_backbone(job, problems)
    methods = {job.method.for_task(task_name(t)) for t in job.tasks}
    if (model is not None and any(get_method(m).uses_mask for m in methods)
            and not eligible_parameters(model, job.selection.rules)):
        problems.append(f"selection.rules: no weight of {job.backbone.name} is eligible for sparse training")
    _check_tasks(job, problems, data)
    _check_agnostic_pool(job, problems, methods)
    if data:
        try:
            check_store_usable(normalise_store(job.store))
        except StorageError as exc:
            problems.append(f"store: {exc}")
    if job.tracking.enabled:
        from orchestrator.tracking.tracker import check_tracking

        problems.extend(check_tracking(job, data=data))
    if cpus is not None:
        try:
            trainer_slots(float(cpus), float(gpus or 0), job)
        except RuntimeError as exc:
            problems.append(f"training.workers_per_task / cpus_per_worker / gpus_per_worker: {exc}")
    return problems
