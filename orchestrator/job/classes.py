"""A job with every task's classes written out: what the job id, the plans and the stored job file see.

A task of a format whose classes show in its layout (ImageFolder, DICOM folders) may leave ``num_classes``
and ``class_names`` out of the job file; :func:`with_classes` lists its source (no image decoded) and
writes them in, so a job whose classes were inferred has the same id, cache keys and artifacts as the
same job with them written out. A job that names them everywhere is returned as it is, without listing.
"""

from __future__ import annotations

from orchestrator.job.spec import JobSpec, JobSpecError, task_name

__all__ = ["with_classes"]


def with_classes(job: JobSpec) -> JobSpec:
    """``job`` with the classes of every inline task and pool dataset resolved from its source where the
    job leaves them out; JobSpecError names the entry whose layout gives no usable class list."""
    from tasks.classes import needs_classes, resolve_classes
    from tasks.spec import TaskSpec

    def resolved(entries: list, where: str) -> list:
        out = []
        for i, entry in enumerate(entries):
            if isinstance(entry, TaskSpec) and needs_classes(entry):
                try:
                    entry = resolve_classes(entry)
                except Exception as exc:  # DatasetError, an unreachable source (OSError), a bad folder name
                    raise JobSpecError(f"{where}[{i}] ({task_name(entry)}): classes from the folders: {exc}") from None
            out.append(entry)
        return out

    if not any(isinstance(e, TaskSpec) and needs_classes(e) for e in [*job.tasks, *job.importance.pool_datasets]):
        return job
    importance = job.importance.model_copy(update={"pool_datasets": resolved(job.importance.pool_datasets,
                                                                            "importance.pool_datasets")})
    return job.model_copy(update={"tasks": resolved(job.tasks, "tasks"), "importance": importance})
