"""Stage 3: a per-task Ray Tune sweep over density (log-uniform) and alpha (uniform).

One Tuner per task (an OptunaSearch holds one study), tasks swept one after another so a single
Tune run owns the cluster at a time. Each trial is a function reserving 0.01 CPU that builds a
TorchTrainer and reports every epoch to Tune (TuneReportCallback), so ASHA can stop it early.
At most ``slots`` trials run at once, where every slot can hold its whole trainer (see trainer_slots),
so a trial never waits on CPUs another waiting trial holds. The best trial's last delta is kept.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from typing import Any

from shpeft_core.io import atomic_write_bytes, exists, join_uri, read_bytes, remove

__all__ = ["run_task_sweep"]


def _space(lo: float, hi: float, log: bool):
    from ray import tune

    if math.isclose(lo, hi):
        return lo
    return tune.loguniform(lo, hi) if log else tune.uniform(lo, hi)


def _remove_leftover_placement_groups(before: set[str]) -> None:
    """Free trial trainers' worker placement groups that outlive their trial.

    With Tune over Train V2 on Ray 2.60 the trainers' placement groups can stay reserved after the
    Tuner returns, which would starve everything scheduled afterwards. Only groups created during
    this sweep are touched (sweeps run one at a time, and nothing else in the job creates any then).
    """
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for pg_id, info in ray.util.placement_group_table().items():
        if pg_id not in before and info.get("state") == "CREATED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))


def _copy_artifact(src: str, dst: str, kind: str) -> None:
    from shpeft_core.methods import artifact_files

    if kind != "lora":
        atomic_write_bytes(dst, read_bytes(src))
        return
    for f in artifact_files(src):
        atomic_write_bytes(join_uri(dst, f.rsplit("/", 1)[-1]), read_bytes(f))


def _direct_trial(plan, board, trial_id: str, trial_uri: str) -> None:
    """A one-worker trial: the training loop runs in the trial, reporting to Tune with a checkpoint each epoch."""
    import tempfile

    from ray import tune

    from shpeft_core.train import load_train_state, save_train_state

    from .train_loop import run_plan

    resume_state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume_state = load_train_state(d)

    def report(epoch: int, metrics: dict[str, Any], state) -> None:
        with tempfile.TemporaryDirectory(prefix="shpeft-ckpt-") as d:
            save_train_state(state, d)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    run_plan(plan, resume_state=resume_state, report=report, board=board, trial=trial_id,
             trial_artifact_uri=trial_uri)


def run_task_sweep(job, store: str, plan, config_hash: str, board, force: bool, progress: bool) -> dict[str, Any]:
    """Sweep one task; copies the best trial's artifact to the plan's artifact URI and evaluates it."""
    import optuna
    import ray
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from shpeft_core.methods import SPARSE_METHODS, artifact_kind

    from .pipeline import (TRIAL_CPU, _cluster_resources, _ray_storage, _say, _worker_resources, artifact_uri,
                           evaluate_artifact, trainer_slots)
    from .train_loop import train_task_loop

    t0 = time.perf_counter()
    sw = job.sweep
    name = plan.task_name
    kind = artifact_kind(plan.method)
    sweep_root = join_uri(store, "sweeps", f"{name}-{config_hash}")
    summary_uri = join_uri(sweep_root, "trials.json")
    if force:
        remove(sweep_root, recursive=True)

    space: dict[str, Any] = {}
    if plan.method in SPARSE_METHODS:
        space["density"] = _space(*sw.density_range, log=True)
        if plan.method in ("shpeft",):
            space["alpha"] = _space(*sw.alpha_range, log=False)
    if sw.lr_range is not None:
        space["lr"] = _space(*sw.lr_range, log=True)
    if not space:
        raise ValueError(f"sweep of {name}: method {plan.method} has nothing to search; set sweep.lr_range")

    summary = json.loads(read_bytes(summary_uri)) if exists(summary_uri) else None
    if summary is None:
        cpus, gpus = _cluster_resources()
        direct = job.training.workers_per_task == 1
        slots = trainer_slots(cpus, gpus, job, per_slot_overhead_cpu=0.0 if direct else TRIAL_CPU,
                              user_limit=sw.max_concurrent_trials)
        res = _worker_resources(job)
        # A one-worker trial trains in the trial itself and holds the worker's resources; a data-parallel
        # trial holds 0.01 CPU while its TorchTrainer's workers hold theirs.
        trial_resources = {"cpu": res["CPU"], "gpu": res.get("GPU", 0)} if direct else {"cpu": TRIAL_CPU}
        epochs = int(plan.train["epochs"])
        _say(f"[{name}] sweep over {sorted(space)}: {sw.trials_per_task} trials (Optuna TPE seed {sw.seed} + ASHA), "
             f"up to {slots} at once", progress)
        train_storage = _ray_storage(join_uri(sweep_root, "train"))
        tune_storage = _ray_storage(join_uri(sweep_root, "tune"))
        scaling = dict(num_workers=job.training.workers_per_task, use_gpu=job.training.use_gpu,
                       resources_per_worker=_worker_resources(job))
        max_failures = job.training.max_failures

        direct = job.training.workers_per_task == 1

        def trial(config: dict[str, Any]) -> None:
            trial_id = tune.get_context().get_trial_id()
            trial_plan = plan.with_search_point(density=config.get("density"), alpha=config.get("alpha"),
                                                lr=config.get("lr"), artifact_uri="", sweep_trial=trial_id)
            trial_uri = artifact_uri(join_uri(sweep_root, "trials"), trial_id, plan.method)
            if direct:
                _direct_trial(trial_plan, board, trial_id, trial_uri)
                return
            trainer = TorchTrainer(
                train_task_loop,
                train_loop_config={"plan": trial_plan, "board": board, "fault": None, "trial": trial_id,
                                   "trial_artifact_uri": trial_uri},
                scaling_config=ray.train.ScalingConfig(**scaling),
                run_config=ray.train.RunConfig(
                    name=f"trial-{trial_id}", storage_path=train_storage[0], storage_filesystem=train_storage[1],
                    callbacks=[TuneReportCallback()],
                    failure_config=ray.train.FailureConfig(max_failures=max_failures),
                    checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                ),
            )
            trainer.fit()

        # Per-task stream of the job's seed: tasks explore different points, reproducibly.
        sampler = optuna.samplers.TPESampler(seed=(sw.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31,
                                             n_startup_trials=max(1, min(10, sw.trials_per_task // 2)))
        tuner = tune.Tuner(
            tune.with_resources(trial, trial_resources),
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="val_metric", mode="max",
                search_alg=OptunaSearch(sampler=sampler),
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=epochs,
                                        grace_period=min(sw.asha.grace_period, epochs),
                                        reduction_factor=sw.asha.reduction_factor, brackets=sw.asha.brackets),
                num_samples=sw.trials_per_task,
                max_concurrent_trials=slots,
            ),
            run_config=tune.RunConfig(name="tune", storage_path=tune_storage[0], storage_filesystem=tune_storage[1],
                                      verbose=0, failure_config=tune.FailureConfig(max_failures=max_failures)),
        )
        pgs_before = set(ray.util.placement_group_table())
        try:
            grid = tuner.fit()
        finally:
            _remove_leftover_placement_groups(pgs_before)
        trials = []
        for res in grid:
            m = res.metrics or {}
            tid = m.get("trial_id")
            trials.append({
                "trial_id": tid,
                "density": float(res.config.get("density", plan.density)),
                "alpha": float(res.config.get("alpha", plan.alpha)),
                "lr": float(res.config.get("lr", plan.train["lr"])),
                "val_metric": m.get("val_metric"), "epochs": m.get("training_iteration"),
                "trainable": m.get("trainable"),
                "error": None if res.error is None else str(res.error)[:500],
                "delta_uri": artifact_uri(join_uri(sweep_root, "trials"), tid, plan.method) if tid else None,
            })
        ok = [t for t in trials if t["error"] is None and t["val_metric"] is not None and t["delta_uri"]
              and exists(t["delta_uri"])]
        if not ok:
            errors = "; ".join(t["error"] for t in trials if t["error"]) or "no trial reported a metric"
            raise RuntimeError(f"sweep of {name}: every trial failed: {errors}")
        # Best by the last reported metric: the trial's artifact holds exactly that epoch's weights.
        best = max(ok, key=lambda t: (t["val_metric"], -t["density"]))
        summary = {"task": name, "metric": plan.metric, "trials": trials, "best": best,
                   "seconds": time.perf_counter() - t0}
        atomic_write_bytes(summary_uri, json.dumps(summary, indent=1).encode())
    else:
        _say(f"[{name}] sweep already finished, reusing its best trial", progress)

    best = summary["best"]
    _copy_artifact(best["delta_uri"], plan.artifact_uri, kind)
    final = plan.with_search_point(density=best["density"], alpha=best["alpha"], lr=best.get("lr"))
    res = _worker_resources(job)
    ev = ray.get(ray.remote(evaluate_artifact).options(num_cpus=res["CPU"], num_gpus=res.get("GPU", 0)).remote(final))
    return {**ev, "density": best["density"], "alpha": best["alpha"], "delta_uri": plan.artifact_uri,
            "sweep_trials": len(summary["trials"]), "sweep_s": summary["seconds"], "train_s": None}
