"""Warm worker processes for one-worker runs: one Ray actor per slot, reused from run to run.

A plain Ray task may land in a new worker process that first imports torch, timm and the project
(about 3 s per process on a quiet CPU, twice that when every slot starts at once). Each actor here
pays that once, in its constructor, while the driver waits on its ``ready`` call; afterwards every run
the driver hands it starts in an already warm process. An actor holds one worker's resources for its
lifetime, so the pool is exactly the slots the stage may fill, and actors are spread over the nodes.

Fault tolerance is the driver's: when an actor's process or node dies (``RayActorError``), its run
goes back to the front of the queue (at most ``max_failures`` times per run) and the actor is
replaced by a fresh one, which Ray places wherever the cluster now has room. A replacement that
cannot be placed (its node is gone and the rest is busy) is never waited on: the live actors take
the queue. The run itself resumes from its newest checkpoint (see ``train_loop.run_with_checkpoints``).
A Python error in a run is that run's failure and is not retried; its actor stays in the pool.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

__all__ = ["WarmWorker", "run_on_pool"]


class WarmWorker:
    """One slot's long-lived worker process (a Ray actor class; see ``run_on_pool``)."""

    def __init__(self):
        # What every run needs, imported once per process instead of once per run.
        import timm  # noqa: F401
        import torch  # noqa: F401

        from . import evaluate, train_loop  # noqa: F401
        from tasks import loaders, transforms  # noqa: F401

    def ready(self) -> dict[str, Any]:
        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def call(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return fn(arg)


def _lost(exc: BaseException) -> bool:
    """The run's process or node is gone (retry elsewhere), as opposed to an error raised by the run."""
    from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError

    return isinstance(exc, (RayActorError, WorkerCrashedError, NodeDiedError))


def run_on_pool(fn: Callable[[Any], Any], items: list[tuple[Any, Any]], *, slots: int,
                resources: dict[str, float], max_failures: int,
                on_start: Callable[[Any], Any] | None = None,
                on_done: Callable[[Any, Callable[[], Any]], None]) -> None:
    """Run ``fn(arg)`` for every ``(key, arg)`` in ``items`` on ``slots`` warm actors, in order.

    ``on_start(key)`` is called when a run is handed to an actor (again after a retry); it may return
    a replacement ``arg`` for that attempt. ``on_done(key, get_result)`` is called once per item as it
    ends; ``get_result()`` returns what ``fn`` returned or raises the run's error.
    """
    import ray

    if not items:
        return
    actor_cls = ray.remote(WarmWorker).options(
        num_cpus=resources["CPU"], num_gpus=resources.get("GPU", 0), max_restarts=0, scheduling_strategy="SPREAD")
    slots = max(1, min(slots, len(items)))
    # A replacement that fails to start (its node lost again, a broken environment) is not retried forever.
    spare_starts = slots * (max_failures + 1)
    starting: dict[Any, Any] = {}  # ready() ref -> actor
    idle: list[Any] = []
    busy: dict[Any, tuple[Any, Any, Any, int]] = {}  # call ref -> (actor, key, arg, failures so far)
    queue: list[tuple[Any, Any, int]] = [(key, arg, 0) for key, arg in items]
    last_error: BaseException | None = None

    def start_actor() -> None:
        actor = actor_cls.remote()
        starting[actor.ready.remote()] = actor

    def retire(actor) -> None:
        ray.kill(actor, no_restart=True)

    for _ in range(slots):
        start_actor()
    try:
        while queue or busy:
            while queue and idle:
                key, arg, failures = queue.pop(0)
                actor = idle.pop(0)
                if on_start is not None:
                    arg = on_start(key) or arg
                busy[actor.call.remote(fn, arg)] = (actor, key, arg, failures)
            if not busy and not starting:
                # Every actor is gone and none could be replaced: the rest fails with the last cause.
                for key, _, _ in queue:
                    on_done(key, _raiser(last_error or RuntimeError("no worker could be started")))
                return
            done, _ = ray.wait(list(busy) + list(starting), num_returns=1)
            ref = done[0]
            if ref in starting:
                actor = starting.pop(ref)
                try:
                    ray.get(ref)
                except Exception as exc:
                    last_error = exc
                    retire(actor)
                    if spare_starts > 0:
                        spare_starts -= 1
                        start_actor()
                    continue
                if queue:
                    idle.append(actor)
                else:
                    retire(actor)  # nothing left for it: give its resources back now
                continue
            actor, key, arg, failures = busy.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:
                if not _lost(exc):
                    on_done(key, _raiser(exc))
                    _return(actor, idle, queue, retire)
                    continue
                last_error = exc
                retire(actor)
                if failures < max_failures:
                    queue.insert(0, (key, arg, failures + 1))  # resumes from its newest checkpoint
                    if len(busy) + len(starting) + len(idle) < slots:
                        start_actor()
                else:
                    on_done(key, _raiser(exc))
                continue
            on_done(key, lambda r=result: r)
            _return(actor, idle, queue, retire)
    finally:
        for actor in [*idle, *starting.values(), *(a for a, *_ in busy.values())]:
            retire(actor)


def _return(actor, idle: list, queue: list, retire) -> None:
    if queue:
        idle.append(actor)
    else:
        retire(actor)


def _raiser(exc: BaseException) -> Callable[[], Any]:
    def get() -> Any:
        raise exc

    return get
