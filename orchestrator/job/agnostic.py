"""Which task-agnostic map each target task gets (``importance.agnostic``), decided from the job alone.

- ``pool``: the importance pooled over the job's other datasets: every target and ``pool_datasets`` entry
  (or ``importance.pool``), leaving the task itself out unless ``include_target``. Empty for a job with
  one task and no pool datasets: such a job cannot run a hybrid, and `shpeft validate` says so.
- ``magnitude``: the pre-trained weights' |w| (``shpeft_core.importance.magnitude_importance``); no data.
- ``auto`` (the default): the pool, or the magnitude map when the pool is empty (docs/method.md has the
  validation runs behind that choice).

The importance stage, the plans, the catalogue rows and `shpeft validate` all ask here, so they agree.
"""

from __future__ import annotations

from shpeft_core.methods import get_method

from orchestrator.job.spec import JobSpec, task_name

__all__ = ["pool_members", "agnostic_source", "uses_agnostic", "empty_pool_problems", "agnostic_notes"]

def pool_members(job: JobSpec, target: str, target_names: list[str], pool_names: list[str]) -> list[str]:
    """The datasets whose maps form ``target``'s pooled map (leave-one-out unless include_target)."""
    imp = job.importance
    names = imp.pool if imp.pool is not None else [*target_names, *pool_names]
    return [n for n in names if imp.include_target or n != target]


def agnostic_source(job: JobSpec, members: list[str]) -> str:
    """'pool' or 'magnitude': where a task whose pool holds ``members`` takes its agnostic map from."""
    choice = job.importance.agnostic
    if choice == "auto":
        return "pool" if members else "magnitude"
    return choice


def uses_agnostic(job: JobSpec, method: str) -> bool:
    """Whether a run of ``method`` reads the task-agnostic map (``Method.needs_agnostic``) at the job's alpha,
    or anywhere in the sweep's alpha range for a method that takes alpha."""
    m = get_method(method)
    alphas = [job.selection.alpha]
    if job.sweep.enabled and m.takes_alpha:
        alphas.append(job.sweep.alpha_range[0])
    return any(m.needs_agnostic(a) for a in alphas)


def empty_pool_problems(job: JobSpec, methods: list[str] | None = None) -> list[str]:
    """One problem per task whose runs need a pooled agnostic map that would be empty (``importance.agnostic:
    pool`` with nothing to pool), naming the task and the ways out. ``methods``: the methods that will run
    (``shpeft compare``'s); default the job's own per task."""
    if job.importance.agnostic != "pool":
        return []
    targets = [task_name(t) for t in job.tasks]
    pool = [task_name(t) for t in job.importance.pool_datasets]
    problems = []
    for i, name in enumerate(targets):
        wanted = methods if methods is not None else [job.method.for_task(name)]
        if not any(uses_agnostic(job, m) for m in wanted) or pool_members(job, name, targets, pool):
            continue
        problems.append(
            f"tasks[{i}] ({name}): its task-agnostic pool is empty (the pool leaves the task itself out, and no "
            f"other dataset is in it); add importance.pool_datasets, or set importance.agnostic: magnitude "
            f"(the pre-trained weights' |w|, no data) or auto, or importance.include_target: true, or "
            f"selection.alpha: 1 (task-specific only)")
    return problems


def agnostic_notes(job: JobSpec) -> list[str]:
    """One line per task whose hybrid takes the magnitude map because it has no other dataset to pool
    (``importance.agnostic: auto``): a choice the user did not write, so `shpeft validate` says it."""
    if job.importance.agnostic != "auto":
        return []
    targets = [task_name(t) for t in job.tasks]
    pool = [task_name(t) for t in job.importance.pool_datasets]
    return [f"{name}: no other dataset to pool, so its task-agnostic map is the pre-trained weights' magnitude "
            f"|w| (importance.agnostic: auto; add importance.pool_datasets for a pooled map)"
            for name in targets
            if uses_agnostic(job, job.method.for_task(name)) and not pool_members(job, name, targets, pool)]
