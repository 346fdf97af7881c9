"""Stage 3: the sweeps of every task at once, as one Ray Tune run.

Each task keeps its own seeded Optuna TPE study and its own ASHA bracket (``sweep_search``), so tasks
never compete inside a rung while their trials share the cluster.

A one-worker trial trains inside the trial (it holds the worker's resources); a data-parallel trial
holds 0.01 CPU and builds a TorchTrainer reporting to Tune. ``max_concurrent_trials`` is what the
cluster holds at once (see ``trainer_slots``), so nothing waits on resources another waiter holds.

Resume: every finished trial is appended to ``ledger.json`` in its task's sweep folder as it ends. A
rerun of a killed sweep warm-starts each task's study with its finished trials and runs only the rest
of the budget; a task whose ``trials.json`` exists is done. The best trial's artifact is the task's.
Both files carry their own checksum: a damaged ledger starts that task's sweep again, a damaged
summary is made again from the ledger.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import zlib
from typing import Any

from shpeft_core.io import DamagedFileError, exists, read_sealed_json, remove, write_sealed_json

from orchestrator.stages import RUN_IMPORTS
from orchestrator.store import layout
from orchestrator.runtime.console import say, short_error
from orchestrator.stages.evaluation import evaluate_artifact
from orchestrator.store.evaluation_files import EvalFileError, read_eval, write_eval
from orchestrator.runtime.resources import TRIAL_CPU, cluster_resources, ray_storage, trainer_slots, worker_resources
from orchestrator.stages.training import fault_for
from orchestrator.runtime.worker_pool import run_on_pool
from orchestrator.stages.sweep_search import (PerTaskScheduler, PerTaskSearcher, asha_stop_points, search_space,
                                              trial_artifact_at)

__all__ = ["run_sweeps"]


def _remove_leftover_placement_groups(before: set[str]) -> None:
    """Free trial trainers' worker placement groups that outlive their trial.

    With Tune over Train V2 on Ray 2.60 the trainers' placement groups can stay reserved after the
    Tuner returns, which would starve everything scheduled afterwards. Only groups created during
    the sweep are touched (nothing else in the job creates any then).
    """
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for pg_id, info in ray.util.placement_group_table().items():
        if pg_id not in before and info.get("state") == "CREATED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))


def _direct_trial(plan, board, trial_id: str, trial_artifact, checkpoint_root: str,
                  stop_points: frozenset[int], fault: dict | None) -> None:
    """A one-worker trial: the training loop runs in the trial with a checkpoint each epoch in the store
    (a retried trial resumes after the newest), and reports to Tune only after the epochs ASHA can stop it
    on. Tune's ``report`` blocks until its controller has taken the result, which cost a report each epoch
    a third of an epoch on a busy 2-CPU machine; ASHA decides on exactly the same epochs' metrics."""
    from ray import tune

    from orchestrator.stages.task_run import run_with_checkpoints

    last = int(plan.train["epochs"]) - 1

    def after_epoch(epoch: int, metrics: dict[str, Any]) -> None:
        if epoch == last:
            # Evaluated here, before the last report (after which ASHA stops the trial at max_t), in this warm
            # process: when this trial is its task's best, the task's final evaluation is already done.
            evaluate_artifact(dataclasses.replace(plan, artifact_uri=trial_artifact(epoch)))  # its eval file
        if epoch + 1 in stop_points:
            tune.report(metrics)

    run_with_checkpoints(plan, checkpoint_root, board=board, fault=fault, trial=trial_id,
                         trial_artifact=trial_artifact, after_epoch=after_epoch)


class _Sweep:
    """One task's sweep: its plan, folder, ledger of finished trials, and budget left."""

    def __init__(self, store: str, plan, config_hash: str, sweep, force: bool, progress: bool = False):
        self.plan, self.name = plan, plan.task_name
        self.root = layout.sweep_root(store, plan.task_name, config_hash)
        if force:
            remove(self.root, recursive=True)
        self.summary_uri = layout.sweep_summary(self.root)
        self.ledger_uri = layout.sweep_ledger(self.root)
        self.ledger, self.summary = self._read_state(progress)
        self.budget = max(0, sweep.trials_per_task - len(self.ledger))

    def _read_state(self, progress: bool) -> tuple[list[dict], dict | None]:
        """The finished trials and the summary of an earlier run, each once it verifies. A damaged ledger
        starts the task's sweep again; a damaged summary is made again from the ledger."""
        try:
            ledger = read_sealed_json(self.ledger_uri).get("trials") if exists(self.ledger_uri) else []
            if not isinstance(ledger, list):
                raise DamagedFileError(f"{self.ledger_uri}: no list of trials in it")
        except DamagedFileError as exc:
            say(f"[{self.name}] {exc}; its sweep starts again", progress)
            remove(self.root, recursive=True)
            return [], None
        try:
            summary = read_sealed_json(self.summary_uri) if exists(self.summary_uri) else None
        except DamagedFileError as exc:
            say(f"[{self.name}] {exc}; the summary is made again from the trials", progress)
            summary = None
        return ledger, summary

    def trial_checkpoints(self, trial_id: str) -> str:
        return layout.sweep_checkpoints(self.root, trial_id)

    def trial_uri(self, trial_id: str, epochs: int | str | None) -> str:
        return layout.sweep_trial_artifact(self.root, trial_id, epochs, self.plan.method)

    def record(self, entry: dict) -> None:
        self.ledger.append(entry)
        write_sealed_json(self.ledger_uri, {"task": self.name, "trials": self.ledger})

    def finish(self, seconds: float) -> dict:
        ok = [t for t in self.ledger if t["error"] is None and t["val_metric"] is not None and exists(t["delta_uri"])]
        if not ok:
            errors = "; ".join(t["error"] for t in self.ledger if t["error"]) or "no trial reported a metric"
            raise RuntimeError(f"sweep of {self.name}: every trial failed: {errors}")
        # Best by the last reported metric: the trial's artifact holds exactly that epoch's weights.
        best = max(ok, key=lambda t: (t["val_metric"], -t["density"]))
        self.summary = {"task": self.name, "metric": self.plan.metric, "trials": self.ledger, "best": best,
                        "seconds": seconds}
        write_sealed_json(self.summary_uri, self.summary)
        return self.summary


def _post_trial_end(board, task: str, trial_id: str, value) -> None:
    """Tells the console a trial ended (finished, or stopped early by ASHA)."""
    if board is not None:
        board.push.remote({"kind": "trial_end", "task": task, "trial": trial_id, "val_metric": value})


def _trial_evaluation(name: str, trial_artifact: str, artifact: str, kind: str, progress: bool) -> dict | None:
    """The best trial's own evaluation, when its file verifies and is of the task artifact's very bytes: it
    becomes the task's evaluation file (only the artifact's path in it changes) and its catalogue fields are
    returned. None when the task's artifact must be evaluated again."""
    from shpeft_core.artifacts import artifact_sha256

    try:
        doc = read_eval(layout.eval_file(trial_artifact))
    except EvalFileError as exc:
        say(f"[{name}] {exc}; evaluating the artifact again", progress)
        return None
    if not doc or not doc.get("row") or doc.get("artifact_sha256") != artifact_sha256(artifact, kind):
        return None
    write_eval(layout.eval_file(artifact), {**doc, "artifact_uri": artifact})
    return doc["row"]


def _ledger_callback(sweeps: dict[str, _Sweep], board=None, tracker=None):
    from ray.tune import Callback

    class Ledger(Callback):
        """Records each finished trial in its task's ledger as it ends (what a resumed sweep starts from)."""

        def __init__(self):
            self._started: dict[str, float] = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self._started.setdefault(trial.trial_id, time.time())  # a retried trial keeps its first start

        def _record(self, trial, error: str | None) -> None:
            sw = sweeps[trial.config["task"]]
            m = trial.last_result or {}
            entry = {
                "started_at": self._started.get(trial.trial_id), "finished_at": time.time(),
                "trial_id": trial.trial_id,
                "density": float(trial.config.get("density", sw.plan.density)),
                "alpha": float(trial.config.get("alpha", sw.plan.alpha)),
                "lr": float(trial.config.get("lr", sw.plan.train["lr"])),
                "val_metric": m.get("val_metric"), "epochs": m.get("epochs"),
                "trainable": m.get("trainable"), "error": error,
                "resumed_from_epoch": m["resumed_from_epoch"] if m.get("resumed_from_epoch", -1) >= 0 else None,
                "delta_uri": sw.trial_uri(trial.trial_id, m.get("epochs")),
            }
            sw.record(entry)
            if tracker is not None:
                tracker.trial_finished(sw.name, entry)  # never raises

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._record(trial, None)
            _post_trial_end(board, trial.config["task"], trial.trial_id, (trial.last_result or {}).get("val_metric"))

        def on_trial_error(self, iteration, trials, trial, **info):
            self._record(trial, f"trial {trial.trial_id} failed (see the task's log: shpeft logs STORE JOB)")
            _post_trial_end(board, trial.config["task"], trial.trial_id, None)

    return Ledger()


def run_sweeps(ctx, plans: list[tuple]) -> dict[str, dict]:
    """Sweep every (plan, config_hash) at once; returns {task: row fields} (or {task: {"error": ...}}).

    Beside the row fields, each task's result carries its best trial's "lr" and "best_trial" id (for
    tracking; not catalogue columns). ``ctx.tracker`` hears of each trial as it ends."""
    job, store, job_id, board, force, progress = ctx.job, ctx.store, ctx.job_id, ctx.board, ctx.force, ctx.progress
    tracker = ctx.tracker
    import optuna
    import ray
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from shpeft_core.artifacts import copy_artifact
    from shpeft_core.methods import get_method

    from orchestrator.stages.task_run import train_task_loop

    t0 = time.perf_counter()
    sw = job.sweep
    sweeps = {plan.task_name: _Sweep(store, plan, chash, sw, force, progress) for plan, chash in plans}
    out: dict[str, dict] = {}
    spaces = {}
    for name, s in sweeps.items():
        try:
            spaces[name] = search_space(s.plan, sw)
        except ValueError as exc:
            out[name] = {"error": str(exc)}
    todo = {n: s for n, s in sweeps.items() if n in spaces and s.summary is None and s.budget > 0}
    for name in sweeps:
        if name in spaces and sweeps[name].summary is not None:
            say(f"[{name}] sweep already finished, reusing its best trial", progress)
        for t in sweeps[name].ledger:  # trials a resumed sweep already has
            _post_trial_end(board, name, t["trial_id"], t.get("val_metric"))

    if todo:
        cpus, gpus = cluster_resources()
        direct = job.training.workers_per_task == 1
        slots = trainer_slots(cpus, gpus, job, per_slot_overhead_cpu=0.0 if direct else TRIAL_CPU,
                              user_limit=sw.max_concurrent_trials)
        res = worker_resources(job)
        # A one-worker trial trains in the trial itself and holds the worker's resources; a data-parallel
        # trial holds 0.01 CPU while its TorchTrainer's workers hold theirs.
        trial_resources = {"cpu": res["CPU"], "gpu": res.get("GPU", 0)} if direct else {"cpu": TRIAL_CPU}
        resumed = {n: len(s.ledger) for n, s in todo.items() if s.ledger}
        say(f"sweeping {len(todo)} task(s) at once: {sw.trials_per_task} trials each (Optuna TPE seed {sw.seed} "
             f"+ ASHA per task), up to {slots} trials in flight"
             + (f"; resuming after {resumed} finished trial(s)" if resumed else ""), progress)
        tune_root = layout.tune_root(store, job_id)
        train_storage = ray_storage(layout.tune_train_root(tune_root))
        tune_storage = ray_storage(tune_root)
        scaling = dict(num_workers=job.training.workers_per_task, use_gpu=job.training.use_gpu,
                       resources_per_worker=res)
        max_failures = job.training.max_failures
        trial_plans = {n: s.plan for n, s in todo.items()}
        trial_uris = {n: s.trial_uri("{trial}", "{epochs}") for n, s in todo.items()}
        trial_checkpoints = {n: s.trial_checkpoints("{trial}") for n, s in todo.items()}
        # test hook (SHPEFT_FAULT_INJECT): one trial of the task loses its process once
        faults = {n: fault_for(n, s.root) for n, s in todo.items()}

        def trial(config: dict[str, Any]) -> None:
            trial_id = tune.get_context().get_trial_id()
            task = config["task"]
            trial_plan = trial_plans[task].with_search_point(
                density=config.get("density"), alpha=config.get("alpha"), lr=config.get("lr"),
                artifact_uri="", sweep_trial=trial_id)
            artifact_at = functools.partial(trial_artifact_at, trial_uris[task].replace("{trial}", trial_id),
                                            stop_points)
            if direct:
                _direct_trial(trial_plan, board, trial_id, artifact_at,
                              trial_checkpoints[task].replace("{trial}", trial_id), stop_points, faults[task])
                return
            TorchTrainer(
                train_task_loop,
                train_loop_config={"plan": trial_plan, "board": board, "fault": None, "trial": trial_id,
                                   "trial_artifact": artifact_at},
                scaling_config=ray.train.ScalingConfig(**scaling),
                run_config=ray.train.RunConfig(
                    name=f"trial-{trial_id}", storage_path=train_storage[0], storage_filesystem=train_storage[1],
                    callbacks=[TuneReportCallback()],
                    failure_config=ray.train.FailureConfig(max_failures=max_failures),
                    checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                ),
            ).fit()

        def study(name: str, s: _Sweep):
            # Per-task stream of the job's seed: tasks explore different points, reproducibly.
            seed = (sw.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, min(10, sw.trials_per_task // 2)))
            done = [t for t in s.ledger if t["val_metric"] is not None]
            points = [{k: t[k] for k in spaces[name]} for t in done]
            return OptunaSearch(space=spaces[name], metric="val_metric", mode="max", sampler=sampler,
                                points_to_evaluate=points or None,
                                evaluated_rewards=[t["val_metric"] for t in done] or None)

        epochs = max(int(s.plan.train["epochs"]) for s in todo.values())
        # A trial's artifact is written only after the epochs it can end on (its last reported one is
        # what the ledger records): ASHA's rungs, and each task's last epoch.
        stop_points = asha_stop_points(epochs, min(sw.asha.grace_period, epochs), sw.asha.reduction_factor,
                                       sw.asha.brackets) | {int(s.plan.train["epochs"]) for s in todo.values()}
        searcher = PerTaskSearcher({n: study(n, s) for n, s in todo.items()}, {n: s.budget for n, s in todo.items()},
                                   metric="val_metric", mode="max")
        scheduler = PerTaskScheduler(lambda: ASHAScheduler(
            time_attr="epochs", max_t=epochs, grace_period=min(sw.asha.grace_period, epochs),
            reduction_factor=sw.asha.reduction_factor, brackets=sw.asha.brackets))
        tuner = tune.Tuner(
            tune.with_resources(trial, trial_resources),
            tune_config=tune.TuneConfig(metric="val_metric", mode="max", search_alg=searcher, scheduler=scheduler,
                                        num_samples=sum(s.budget for s in todo.values()),
                                        max_concurrent_trials=slots,
                                        # a direct trial's process (torch imported, kernels chosen) serves
                                        # the next trial; trainer trials start new workers either way
                                        reuse_actors=direct),
            run_config=tune.RunConfig(name=f"run-{int(time.time())}", storage_path=tune_storage[0],
                                      storage_filesystem=tune_storage[1], verbose=0,
                                      callbacks=[_ledger_callback(todo, board, tracker)],
                                      failure_config=tune.FailureConfig(max_failures=max_failures)),
        )
        pgs_before = set(ray.util.placement_group_table())
        try:
            tuner.fit()
        finally:
            _remove_leftover_placement_groups(pgs_before)
        # Finished trials live in the ledgers and trial artifacts; Tune's own folders and the trials'
        # checkpoints (also those of a killed earlier run of this job) are no longer needed.
        remove(tune_root, recursive=True)
        for s in todo.values():
            remove(layout.sweep_checkpoints(s.root), recursive=True)

    seconds = time.perf_counter() - t0
    finals = {}
    for name, s in sweeps.items():
        if name in out:
            continue
        try:
            summary = s.summary or s.finish(seconds)
            best = summary["best"]
            copy_artifact(best["delta_uri"], s.plan.artifact_uri, get_method(s.plan.method).artifact)
            finals[name] = (s.plan.with_search_point(density=best["density"], alpha=best["alpha"], lr=best.get("lr")),
                            summary)
        except Exception as exc:
            out[name] = {"error": short_error(exc)}

    def evaluated(name: str, get_result) -> None:
        summary = finals[name][1]
        best = summary["best"]
        try:
            out[name] = {**get_result(), "density": best["density"], "alpha": best["alpha"],
                         "delta_uri": sweeps[name].plan.artifact_uri, "sweep_trials": len(summary["trials"]),
                         "sweep_s": summary["seconds"], "train_s": None,
                         "lr": best.get("lr"), "best_trial": best.get("trial_id")}
        except Exception as exc:
            out[name] = {"error": short_error(exc)}

    to_evaluate = []
    for name, (plan, summary) in finals.items():
        row = _trial_evaluation(name, summary["best"]["delta_uri"], plan.artifact_uri, get_method(plan.method).artifact,
                                progress)
        if row is not None:
            evaluated(name, lambda row=row: row)
        else:
            to_evaluate.append((name, plan))
    # The others' best artifacts evaluated at once, in warm processes (one import of torch per slot).
    cpus, gpus = cluster_resources()
    run_on_pool(evaluate_artifact, to_evaluate, preload=RUN_IMPORTS, slots=trainer_slots(cpus, gpus, job),
                resources=worker_resources(job),
                max_failures=job.training.max_failures, on_done=evaluated)
    return out
