"""Stage 2: every task trained, as many at once as the cluster holds (see resources.trainer_slots).

A one-worker task trains in a warm pool actor holding one worker's resources (``worker_pool``: one
long-lived process per slot, so torch and the project are imported once per slot, not once per task)
and checkpoints each epoch into the store (moved to another actor on a worker crash or a lost node,
resuming from its newest checkpoint); a data-parallel task gets a Ray Train TorchTrainer, launched from
a zero-CPU Ray task. Each finished artifact is evaluated where it was trained.
"""

from __future__ import annotations

import os
import time
from typing import Any

from shpeft_core.io import remove

from orchestrator.stages import RUN_IMPORTS
from orchestrator.store import layout
from orchestrator.runtime.console import now, say
from orchestrator.stages.evaluation import evaluate_artifact
from orchestrator.runtime.resources import cluster_resources, ray_storage, trainer_slots, worker_resources

__all__ = ['train_all', 'train_task', 'train_direct', 'fault_for']


def train_direct(launch: dict[str, Any]) -> dict[str, Any]:
    """A one-worker task, trained in this process (a pool actor; on a retry it resumes from its checkpoint)."""
    from orchestrator.stages.task_run import run_with_checkpoints

    t0 = time.perf_counter()
    plan = launch["plan"]
    out = run_with_checkpoints(plan, layout.run_checkpoints(launch["run_root"]), board=launch["board"],
                               fault=launch["fault"])
    train_s = time.perf_counter() - t0
    import ray

    return {**evaluate_artifact(plan), "train_s": train_s, "resumed_from_epoch": out["resumed_from_epoch"],
            "node": ray.get_runtime_context().get_node_id()}


def train_task(launch: dict[str, Any]) -> dict[str, Any]:
    """Runs in a zero-CPU Ray task: one data-parallel task's TorchTrainer, then the artifact evaluation."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from orchestrator.stages.task_run import train_task_loop

    t0 = time.perf_counter()
    plan = launch["plan"]
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


def fault_for(task: str, run_root: str) -> dict | None:
    """Test hook: SHPEFT_FAULT_INJECT='<task>:<epoch>' kills that task's rank-0 worker once at that epoch."""
    spec = os.environ.get("SHPEFT_FAULT_INJECT", "")
    if not spec or ":" not in spec:
        return None
    name, epoch = spec.rsplit(":", 1)
    if name != task:
        return None
    return {"epoch": int(epoch), "marker": layout.fault_marker(run_root)}


def train_all(ctx, plans: list[tuple], on_done) -> None:
    """Stage 2: every (plan, base row, config hash) of ``plans``, at most `slots` tasks in flight (each slot
    = one whole trainer).

    ``on_done(base_row, get_result)`` is called as each task ends; ``get_result()`` returns its row fields
    or raises the task's error. One-worker tasks run on ``ctx.workers`` (a ``worker_pool.WorkerPool``
    started earlier in the job, e.g. before the importance stage) or on a pool of their own.
    """
    import ray

    job, store, jid, board, force, progress = ctx.job, ctx.store, ctx.job_id, ctx.board, ctx.force, ctx.progress
    workers = ctx.workers

    if not plans:
        return
    cpus, gpus = cluster_resources()
    slots = trainer_slots(cpus, gpus, job, user_limit=job.training.max_concurrent_tasks)
    say(f"training {len(plans)} task(s), up to {slots} at once "
         f"({job.training.workers_per_task} worker(s) x {worker_resources(job)} each; cluster {cpus:g} CPU {gpus:g} GPU)",
         progress)
    res = worker_resources(job)
    train_storage = ray_storage(layout.train_runs_root(store))  # Ray Train's run folder: runs/<run_name>
    launches = []
    for plan, base, chash in plans:
        run_name = f"{jid}-{plan.task_name}-{chash}"
        run_root = layout.run_root(store, jid, plan.task_name, chash)
        if force:
            remove(run_root, recursive=True)
        launch = {
            "plan": plan, "board": board, "fault": fault_for(plan.task_name, run_root),
            "run_name": run_name, "ray_storage": train_storage, "run_root": run_root,
            "workers": job.training.workers_per_task, "worker_resources": res,
            "max_failures": job.training.max_failures,
            "eval_cpus": res["CPU"], "eval_gpus": res.get("GPU", 0),
        }
        base = {**base, "density": plan.density, "alpha": plan.alpha, "delta_uri": plan.artifact_uri}
        launches.append((launch, base))

    def started(i: int) -> None:
        launch, base = launches[i]
        base["started_at"] = now()
        say(f"[{launch['plan'].task_name}] training {launch['plan'].method} (run {launch['run_name']})", progress)

    if job.training.workers_per_task == 1:
        # One worker: the training runs in a warm pool actor holding the worker's resources. A crashed
        # worker process or a lost node sends the task to another actor (resuming from its newest
        # checkpoint); a Python error fails the task.
        from orchestrator.runtime.worker_pool import run_on_pool

        items = [(i, launch) for i, (launch, _) in enumerate(launches)]
        finished = lambda i, get_result: on_done(launches[i][1], get_result)  # noqa: E731
        if workers is not None:
            workers.run(train_direct, items, max_failures=job.training.max_failures, on_start=started,
                        on_done=finished, keep=False)
        else:
            run_on_pool(train_direct, items, slots=slots, resources=res, max_failures=job.training.max_failures,
                        preload=RUN_IMPORTS,
                        on_start=started, on_done=finished)
        return

    # Data parallel: a zero-CPU launcher waits on its TorchTrainer. It prefers the driver's node and is
    # retried if its node is lost (the trainer then restores its checkpoint).
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    submit = ray.remote(train_task).options(num_cpus=0, max_retries=job.training.max_failures,
                                            retry_exceptions=False, scheduling_strategy=here)
    queue = list(range(len(launches)))
    in_flight: dict[Any, int] = {}
    while queue or in_flight:
        while queue and len(in_flight) < slots:
            i = queue.pop(0)
            started(i)
            in_flight[submit.remote(launches[i][0])] = i
        done, _ = ray.wait(list(in_flight), num_returns=1)
        i = in_flight.pop(done[0])
        on_done(launches[i][1], lambda: ray.get(done[0]))
