"""What a sweep searches and when it may stop a trial: each task's search space (from its method), one
Optuna study and one ASHA bracket per task behind Tune's single searcher and scheduler, and the epochs
after which ASHA can stop a trial (where a trial writes its artifact).

``PerTaskSearcher`` routes every suggestion and result to the task's OptunaSearch, ``PerTaskScheduler``
every result to the task's ASHAScheduler, so tasks never compete inside a rung while their trials share
the cluster (one Tune run has one searcher; a grid over tasks is not an option with Optuna). Suggestions
alternate between tasks with budget left, so every task's sweep advances together.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["search_space", "PerTaskSearcher", "PerTaskScheduler", "asha_stop_points", "trial_artifact_at"]


def search_space(plan, sweep) -> dict[str, Any]:
    """Optuna distributions of what the task's method can vary (``Method.search_space``: density for a
    mask, alpha for a hybrid) and the learning rate when ``sweep.lr_range`` is set."""
    from optuna.distributions import FloatDistribution

    from shpeft_core.methods import get_method

    def dist(lo: float, hi: float, log: bool):
        return FloatDistribution(lo, hi, log=log) if not math.isclose(lo, hi) else FloatDistribution(lo, lo)

    dims = get_method(plan.method).search_space(density_range=sweep.density_range, alpha_range=sweep.alpha_range)
    space = {name: dist(lo, hi, log=scale == "log") for name, (scale, lo, hi) in dims.items()}
    if sweep.lr_range is not None:
        space["lr"] = dist(*sweep.lr_range, log=True)
    if not space:
        raise ValueError(f"sweep of {plan.task_name}: method {plan.method} has nothing to search; set sweep.lr_range")
    return space


def _searcher_base():
    from ray.tune.search import Searcher

    return Searcher


class PerTaskSearcher(_searcher_base()):
    """One Optuna study per task behind Tune's single-searcher interface (see the module doc)."""

    def __init__(self, searchers: dict[str, Any], budget: dict[str, int], metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self._searchers = searchers
        self._left = dict(budget)
        self._owner: dict[str, str] = {}
        self._turn = 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # every study got its own space, metric and mode when it was built

    def suggest(self, trial_id: str):
        tasks = [t for t in self._searchers if self._left[t] > 0]
        if not tasks:
            return self.FINISHED
        for i in range(len(tasks)):
            task = tasks[(self._turn + i) % len(tasks)]
            config = self._searchers[task].suggest(trial_id)
            if config is None or config == self.FINISHED:
                continue
            self._turn += 1
            self._left[task] -= 1
            self._owner[trial_id] = task
            return {**config, "task": task}
        return None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._owner:
            self._searchers[self._owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._owner:
            self._searchers[self._owner[trial_id]].on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: a rerun resumes from the tasks' ledgers of finished trials, not Tune's state."""

    def restore(self, checkpoint_path: str) -> None:
        """See save: the ledgers, not a pickled searcher, are what a resumed sweep starts from."""


def _scheduler_base():
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler


class PerTaskScheduler(_scheduler_base()):
    """One ASHA bracket per task: a trial's results are only compared with its own task's trials."""

    def __init__(self, make_scheduler):
        super().__init__()
        self._make = make_scheduler
        self._by_task: dict[str, Any] = {}
        self._props: tuple[str | None, str | None] = (None, None)

    def set_search_properties(self, metric, mode, **spec) -> bool:
        self._props = (metric, mode)
        for s in self._by_task.values():
            s.set_search_properties(metric, mode, **spec)
        return True

    def _for(self, trial):
        task = trial.config.get("task", "")
        if task not in self._by_task:
            self._by_task[task] = self._make()
            self._by_task[task].set_search_properties(*self._props)
        return self._by_task[task]

    def on_trial_add(self, tune_controller, trial):
        self._for(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial):
        self._for(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        return self._for(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        self._for(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        self._for(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "; ".join(f"{t}: {s.debug_string()}" for t, s in self._by_task.items())


def asha_stop_points(max_t: int, grace_period: int, reduction_factor: float, brackets: int) -> frozenset[int]:
    """The training iterations after which ASHA can stop a trial that reports every iteration.

    Ray's ASHAScheduler gives bracket s the rungs grace_period * rf ** (k + s) (k < int(log(max_t /
    grace_period) / log(rf) - s + 1)) and decides about a trial only at the first result at or past a
    rung it has not recorded the trial in, or at max_t. A trial's last reported epoch is one of these.
    """
    import numpy as np

    points = {int(max_t)}
    for s in range(brackets):
        rungs = int(np.log(max_t / grace_period) / np.log(reduction_factor) - s + 1)
        points.update(math.ceil(grace_period * reduction_factor ** (k + s)) for k in range(rungs))
    return frozenset(p for p in points if 1 <= p <= max_t)


def trial_artifact_at(template: str, stop_points: frozenset[int], epoch: int) -> str | None:
    """Where a trial writes its artifact after ``epoch`` (0-based): after each epoch it may end on, named by
    the epochs it holds (``{epochs}`` in ``template``), so a ledger entry names exactly its last epoch's."""
    return template.replace("{epochs}", str(epoch + 1)) if epoch + 1 in stop_points else None
