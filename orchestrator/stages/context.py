"""The contract every stage shares: one context object for a job (or a comparison), and the one function
that turns (task, method, seed) into a plan.

``StageContext`` carries what each stage needs besides its own inputs -- the job, its store and id, the
backbone's fingerprint, whether to redo cached work, the console switch, the counters, the progress
board, the warm worker pool and the tracker -- so a stage's signature names only what is its own.
``plan_task`` is how both ``run`` and ``compare`` plan a run, so the two cannot drift apart in what makes
a run the same run (its config hash) or where its maps come from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from orchestrator.job.keys import task_config_hash
from orchestrator.job.plan import TaskPlan, plan_for, task_maps
from orchestrator.job.spec import JobSpec
from orchestrator.runtime.console import say
from orchestrator.store import layout

__all__ = ["StageContext", "plan_task"]


@dataclass
class StageContext:
    job: JobSpec
    store: str  # normalised (orchestrator.store.layout.normalise_store)
    job_id: str
    backbone_fp: str
    force: bool = False  # redo work whose cached result verifies
    progress: bool = True  # print milestone lines (the log in the store gets them either way)
    counters: dict[str, int] = field(default_factory=dict)
    board: Any = None  # the progress board actor (runtime.progress.ProgressBoard), or None
    workers: Any = None  # the warm worker pool (runtime.worker_pool.WorkerPool), or None
    tracker: Any = None  # tracking.tracker.Tracker, or None

    def say(self, message: str) -> None:
        say(message, self.progress)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n


def plan_task(ctx: StageContext, imaps, spec, *, method: str, seed: int, artifact: Callable[[str], str],
              job: JobSpec | None = None, epochs: int | None = None, importance_seed: int | None = None,
              point: dict[str, Any] | None = None, equal_budget: bool = False) -> tuple[TaskPlan, str]:
    """The plan of (task ``spec``, ``method``, ``seed``) and its config hash.

    ``artifact(config_hash)`` names where the run writes its artifact; ``job`` overrides the context's
    (a comparison's variant of it, e.g. another hybrid rule); ``importance_seed`` draws the maps (None:
    the job's seed); ``point`` holds values chosen for this run over the job's ({"lr", "alpha", "rank"}):
    they enter the hash and the plan. Raises the error of a map the run needs.
    """
    job = job or ctx.job
    d, head, ag = task_maps(job, spec, imaps, method, importance_seed)
    chash = task_config_hash(job, spec, d.key, ag.get("key"), method=method, seed=seed, head_key=head.key,
                             point=point, equal_budget=equal_budget)
    plan = plan_for(job, spec, ctx.backbone_fp, imaps, method=method, seed=seed, artifact=artifact(chash),
                    epochs=epochs, importance_seed=importance_seed, equal_budget=equal_budget)
    if point:
        plan = plan.with_search_point(lr=point.get("lr"), alpha=point.get("alpha"),
                                      settings={"rank": int(point["rank"])} if "rank" in point else None)
    return dataclasses.replace(plan, data_cache=layout.data_cache(ctx.store)), chash
