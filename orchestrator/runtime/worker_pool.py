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

__all__ = ["WarmWorker", "WorkerPool", "run_on_pool"]


class WarmWorker:
    """One slot's long-lived worker process (a Ray actor class; see ``run_on_pool``). It imports the
    ``preload`` modules when it starts: what every run it will serve needs, once per process instead of
    once per run (the caller names them; the pool knows nothing of what runs on it)."""

    def __init__(self, preload: tuple[str, ...] = ()):
        import importlib

        for name in preload:
            importlib.import_module(name)

    def ready(self) -> dict[str, Any]:
        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def call(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return fn(arg)


class WorkerPool:
    """``slots`` warm actors holding ``resources`` each; ``run`` may be called several times (one stage after
    another reuses the same processes), ``close`` ends them. Actors start as soon as the pool is made, so
    their imports overlap whatever the driver does before the first ``run``."""

    def __init__(self, slots: int, resources: dict[str, float], preload: tuple[str, ...] = ()):
        import ray

        self._cls = ray.remote(WarmWorker).options(
            num_cpus=resources["CPU"], num_gpus=resources.get("GPU", 0), max_restarts=0,
            scheduling_strategy="SPREAD")
        self.slots = max(1, slots)
        self.resources = dict(resources)
        self.preload = tuple(preload)
        self._starting: dict[Any, Any] = {}  # ready() ref -> actor
        self._idle: list[Any] = []
        for _ in range(self.slots):
            self._start()

    def _start(self) -> None:
        actor = self._cls.remote(self.preload)
        self._starting[actor.ready.remote()] = actor

    def close(self) -> None:
        import ray

        for actor in [*self._idle, *self._starting.values()]:
            ray.kill(actor, no_restart=True)
        self._idle, self._starting = [], {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, fn: Callable[[Any], Any], items: list[tuple[Any, Any]], *, max_failures: int,
            on_start: Callable[[Any], Any] | None = None,
            on_done: Callable[[Any, Callable[[], Any]], None], keep: bool = True) -> None:
        """Run ``fn(arg)`` for every ``(key, arg)`` in ``items``, in order, on the pool's actors.

        ``on_start(key)`` is called when a run is handed to an actor (again after a retry); it may return a
        replacement ``arg`` for that attempt. ``on_done(key, get_result)`` is called once per item as it
        ends; ``get_result()`` returns what ``fn`` returned or raises the run's error. With ``keep=False``
        an actor with nothing left to do is ended at once (its resources go back to the cluster).
        """
        import ray

        starting, idle = self._starting, self._idle
        # A replacement that fails to start (its node lost again, a broken environment) is not retried forever.
        spare_starts = self.slots * (max_failures + 1)
        busy: dict[Any, tuple[Any, Any, Any, int]] = {}  # call ref -> (actor, key, arg, failures so far)
        queue: list[tuple[Any, Any, int]] = [(key, arg, 0) for key, arg in items]
        last_error: BaseException | None = None

        def put_back(actor) -> None:
            if queue or keep:
                idle.append(actor)
            else:
                ray.kill(actor, no_restart=True)

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
                        ray.kill(actor, no_restart=True)
                        if spare_starts > 0:
                            spare_starts -= 1
                            self._start()
                        continue
                    put_back(actor)
                    continue
                actor, key, arg, failures = busy.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:
                    if not _lost(exc):
                        on_done(key, _raiser(exc))
                        put_back(actor)
                        continue
                    last_error = exc
                    ray.kill(actor, no_restart=True)
                    if failures < max_failures:
                        queue.insert(0, (key, arg, failures + 1))  # resumes from its newest checkpoint
                    else:
                        on_done(key, _raiser(exc))
                    if keep or queue:
                        self._start()
                    continue
                on_done(key, lambda r=result: r)
                put_back(actor)
        finally:
            # what is still running belongs to no one once the driver leaves (an error or an interrupt)
            for actor, *_ in busy.values():
                ray.kill(actor, no_restart=True)


def run_on_pool(fn: Callable[[Any], Any], items: list[tuple[Any, Any]], *, slots: int,
                resources: dict[str, float], max_failures: int,
                on_start: Callable[[Any], Any] | None = None,
                on_done: Callable[[Any, Callable[[], Any]], None], preload: tuple[str, ...] = ()) -> None:
    """``WorkerPool(slots, resources, preload).run(...)`` on a pool of its own (at most one actor per item),
    ended after, each actor as soon as nothing is left for it."""
    if not items:
        return
    with WorkerPool(min(slots, len(items)), resources, preload) as pool:
        pool.run(fn, items, max_failures=max_failures, on_start=on_start, on_done=on_done, keep=False)


def _lost(exc: BaseException) -> bool:
    """The run's process or node is gone (retry elsewhere), as opposed to an error raised by the run."""
    from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError

    return isinstance(exc, (RayActorError, WorkerCrashedError, NodeDiedError))


def _raiser(exc: BaseException) -> Callable[[], Any]:
    def get() -> Any:
        raise exc

    return get
