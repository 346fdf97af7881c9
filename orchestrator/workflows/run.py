"""`shpeft run`: preflight -> shared importance -> training or sweeps -> artifacts + catalogue.

``run_job`` checks what it can before Ray starts (``workflows.preflight``), then runs the stages, each in
its own module of ``orchestrator.stages`` and each given the job's ``StageContext``: importance_maps
(per-dataset and task-agnostic maps, cached by content), training (every task at once, as the cluster
holds), sweep (every task's sweep in one Tune run), evaluation (the saved artifact on a fresh backbone).
It keeps the rows: one per task in the job's catalogue, skipping tasks whose artifact already exists
and verifies. docs/architecture.md shows the flow.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from shpeft_core.io import atomic_write_bytes
from shpeft_core.methods import get_method
from shpeft_core.options import DEFAULT_METRIC

from orchestrator.job.agnostic import uses_agnostic
from orchestrator.job.spec import JobSpec, task_name
from orchestrator.job.keys import job_id as compute_job_id
from orchestrator.reporting.tables import print_results_table
from orchestrator.runtime.console import error_chain, log, now, say, short_error
from orchestrator.runtime.session import ray_session
from orchestrator.stages import RUN_IMPORTS
from orchestrator.stages.context import StageContext, plan_task
from orchestrator.stages.importance_maps import run_importance_stage
from orchestrator.stages.training import train_all
from orchestrator.store import layout
from orchestrator.store.layout import normalise_store
from orchestrator.store.results import catalogue_uri, heal_catalogue, latest_rows, write_rows
from orchestrator.workflows.preflight import preflight, resolve_targets

__all__ = ["JobResult", "run_job"]


@dataclass
class JobResult:
    job_id: str
    store: str
    rows: list[dict[str, Any]]
    failed: list[str]
    counters: dict[str, int] = field(default_factory=dict)
    catalogue_uri: str = ""
    plots: list[str] = field(default_factory=list)
    report: str | None = None  # <store>/plots/<job_id>/report.md

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0





def run_job(job: JobSpec, *, address: str | None = None, num_cpus: int | None = None, force: bool = False,
            progress: bool = True) -> JobResult:
    """Run every stage of ``job`` on Ray; returns the rows written to the catalogue and an exit code.

    Starts a local Ray (explicit ``num_cpus``, dashboard on 127.0.0.1) when Ray is not initialised and
    ``address`` is None, joins ``address`` when given, and leaves an initialised Ray alone.
    """
    from orchestrator.job.classes import with_classes

    job = with_classes(job)  # classes left to a task's folders are written in: the job its id names
    model = preflight(job)  # before Ray starts: an unusable store or backbone fails now
    with ray_session(address, num_cpus):
        workers = early_workers(job)
        try:
            return _run(job, model, workers, force=force, progress=progress)
        finally:
            if workers is not None:
                workers.close()


def early_workers(job: JobSpec):
    """The warm worker pool, started before the importance stage so its imports overlap the driver's work,
    or None where it would not serve the training stage (data-parallel training; a sweep, whose Tune trials
    need the resources) or cannot serve the importance stage (importance wanting a GPU the workers lack,
    or the reverse). Its actors hold the workers' resources from now on."""
    from orchestrator.stages.importance_maps import importance_gpu
    from orchestrator.runtime.resources import cluster_resources, trainer_slots, worker_resources
    from orchestrator.runtime.worker_pool import WorkerPool

    res = worker_resources(job)
    if job.training.workers_per_task != 1 or job.sweep.enabled or importance_gpu(job) != bool(res.get("GPU")):
        return None
    cpus, gpus = cluster_resources()
    slots = trainer_slots(cpus, gpus, job, user_limit=job.training.max_concurrent_tasks)
    # No more warm processes than the job has runs for: its tasks' maps (two each at most: gps adds grad1),
    # its pool datasets' and its tasks' trainings; one task on a big machine starts one, not one per CPU.
    useful = 2 * len(job.tasks) + len(job.importance.pool_datasets)
    return WorkerPool(min(slots, useful), res, preload=RUN_IMPORTS)


def _run(job: JobSpec, model, workers, *, force: bool, progress: bool) -> JobResult:
    import logging

    from shpeft_core.backbone import backbone_fingerprint

    from orchestrator.runtime.tasklog import StoreLogs

    store = normalise_store(job.store)
    jid = compute_job_id(job)
    ctx = StageContext(job=job, store=store, job_id=jid, backbone_fp=backbone_fingerprint(model), force=force,
                       progress=progress, workers=workers,
                       counters={k: 0 for k in ("importance_computed", "importance_loaded", "tasks_trained",
                                                "tasks_skipped", "tasks_failed")})
    logs = StoreLogs(store, jid)  # driver.log gets every line the console shows, from the first one
    with logs.attached(logging.getLogger("shpeft")):
        return _run_logged(ctx, model, logs)


def _run_logged(ctx: StageContext, model, logs) -> JobResult:
    from orchestrator.tracking.tracker import make_tracker

    job, store, jid = ctx.job, ctx.store, ctx.job_id
    t_job = time.perf_counter()
    ctx.say(f"job {jid}: {len(job.tasks)} task(s), store {store}")
    atomic_write_bytes(layout.job_file(store, jid),
                       json.dumps(job.model_dump(mode="json"), indent=1, sort_keys=True).encode())
    ctx.tracker = make_tracker(job, jid, store, ctx.progress)  # no backends (and no cost) without tracking
    ctx.tracker.start_job(job)
    try:
        result = _stages(ctx, model, logs)
    except Exception:
        ctx.tracker.end_job(ok=False)
        raise
    ctx.tracker.end_job(ok=not result.failed, plots=result.plots)
    if ctx.progress:
        print_results_table(result.rows, store, jid)
        ctx.say(f"job {jid}: {len(result.rows) - len(result.failed)} ok, {len(result.failed)} failed in "
                f"{time.perf_counter() - t_job:.1f}s; catalogue {result.catalogue_uri}"
                + (f"; report {result.report}" if result.report else ""))
    return result


def _stages(ctx: StageContext, model, logs) -> JobResult:
    from orchestrator.runtime.progress import ProgressBoard, ProgressPrinter

    job, store, jid, tracker = ctx.job, ctx.store, ctx.job_id, ctx.tracker
    rows: dict[str, dict[str, Any]] = {}
    targets = resolve_targets(job, model, ctx.progress)
    ctx.board = ProgressBoard.remote()
    listeners = [logs, tracker.on_event] if tracker.enabled else [logs]
    with ProgressPrinter(ctx.board, enabled=ctx.progress, listeners=listeners) as printer:
        log.info("job file %s; Ray's own session logs: %s", layout.job_file(store, jid), _ray_logs_dir())
        imaps = run_importance_stage(ctx, targets.specs, targets.pool_extra,
                                     {t.name: {job.method.for_task(t.name)} for t in targets.specs})
        plans = _plans(ctx, imaps, targets.specs, rows, printer.post)
        for name, err in targets.errors.items():
            rows[name] = {"task": name, "status": "failed", "error": err, "started_at": now(), "finished_at": now()}
            _failed_before_training(rows[name], store, jid, printer.post)
            tracker.task_finished(rows[name])
        if rows:
            write_rows(store, jid, rows.values())

        if job.sweep.enabled and plans:
            from orchestrator.stages.sweep import run_sweeps

            swept = run_sweeps(ctx, [(plan, chash) for plan, _, chash in plans])
            for plan, base, _ in plans:
                got = dict(swept[plan.task_name])
                best = {k: got.pop(k) for k in ("lr", "best_trial") if k in got}  # tracked, not catalogue columns
                rows[plan.task_name] = _finish_row(base, lambda: got if "error" not in got else _raise(got["error"]),
                                                   printer.post)
                _after_task(ctx, rows[plan.task_name], best, printer.post)
        else:
            def on_done(base: dict, get_result) -> None:
                rows[base["task"]] = _finish_row(base, get_result, printer.post)
                _after_task(ctx, rows[base["task"]], post=printer.post)

            train_all(ctx, plans, on_done)

    ordered = [rows[task_name(e)] for e in job.tasks if task_name(e) in rows]
    failed = [r["task"] for r in ordered if r.get("status") != "ok"]
    plots: list[str] = []
    try:
        from orchestrator.reporting.plots import write_plots

        plots = write_plots(store, jid, ordered, imaps.named_uris(job.importance.estimator),
                            {t: a["uri"] for t, a in imaps.agnostic.items() if a.get("uri")})
    except Exception as exc:  # plots are a convenience; a plotting problem must not fail the job
        ctx.say(f"plots skipped: {short_error(exc)}")
    report = None
    try:
        from orchestrator.reporting.job_report import write_job_report

        report, _ = write_job_report(store, jid)
    except Exception as exc:  # like the plots: a report problem is said in one line and never fails the job
        say(f"report skipped: {short_error(exc)} (retry with: shpeft report {store} {jid})", True)
    return JobResult(job_id=jid, store=store, rows=ordered, failed=failed, counters=ctx.counters,
                     catalogue_uri=catalogue_uri(store, jid), plots=plots, report=report)


def _plans(ctx: StageContext, imaps, specs: list, rows: dict, post) -> list[tuple]:
    """(plan, base row, config hash) of every task to train; a task whose verified artifact exists gets its
    previous row instead, a task that cannot be planned a failed row."""
    job, store, jid = ctx.job, ctx.store, ctx.job_id
    for line in heal_catalogue(store, jid):  # a damaged file, or rows a failed write left out
        say(line, True)
    previous = latest_rows(store, jid)
    epochs = (job.sweep.epochs or job.training.epochs) if job.sweep.enabled else None
    plans = []
    for spec in specs:
        method = job.method.for_task(spec.name)
        d = imaps.specific(spec.name, job.importance.estimator)
        ag = imaps.agnostic.get(spec.name) or {}
        used = uses_agnostic(job, method)  # which agnostic map the run reads, if any, for the catalogue
        base = {"task": spec.name, "metric": spec.metric, "started_at": now(), "method": method,
                "seed": job.training.seed, "mix": job.selection.mix,
                "importance_key": d.key, "agnostic_key": ag.get("key"),
                "agnostic_source": ag.get("source") if used else None,
                "agnostic_pool": ", ".join(ag.get("datasets") or []) if used and ag.get("datasets") else None,
                "importance_cache": "hit" if d.cache == "hit" and ag.get("cache") in ("hit", "") else "miss",
                "importance_s": d.seconds, "granularity": job.selection.granularity}
        try:
            plan, chash = plan_task(ctx, imaps, spec, method=method, seed=job.training.seed, epochs=epochs,
                                    artifact=lambda h: layout.task_artifact(store, spec.name, jid, h, method))
        except Exception as exc:
            rows[spec.name] = {**base, "status": "failed", "error": short_error(exc), "finished_at": now()}
            _failed_before_training(rows[spec.name], store, jid, post)
            ctx.tracker.task_finished(rows[spec.name])
            continue
        base.update(config_hash=chash, artifact_kind=get_method(method).artifact, granularity=plan.granularity)
        announce = {"kind": "plan", "task": spec.name, "method": method, "metric": spec.metric,
                    "epochs": plan.train["epochs"], "trials": job.sweep.trials_per_task if job.sweep.enabled else 0}
        if not ctx.force and layout.row_verified(previous.get(spec.name), chash):
            rows[spec.name] = {**previous[spec.name], "trained": False}
            ctx.count("tasks_skipped")
            post({**announce, "state": "skipped"})
            post({"kind": "task_end", "task": spec.name, "state": "skipped",
                  "value": rows[spec.name].get(f"val_{spec.metric}")})
            ctx.say(f"[{spec.name}] artifact verified (sha256 {previous[spec.name]['sha256'][:12]}), skipped")
            continue
        post(announce)
        plans.append((plan, base, chash))
        ctx.tracker.planned(plan, chash)
    return plans


def _failed_before_training(row: dict, store: str, jid: str, post) -> None:
    """A task that could not be planned: its whole message in its log and on the console, as a failed run's."""
    post({"kind": "log", "task": row["task"], "lines": [f"{now()} failed before training: {row['error']}"]})
    say(f"[{row['task']}] FAILED: {row['error']} (full log: shpeft logs {store} {jid} --task {row['task']})",
        True)  # failures are said even with --no-progress


def _raise(message: str):
    exc = RuntimeError(message)
    exc.shpeft_logged = True  # a sweep's error arrives as text; its trials' tracebacks are in the task's log
    raise exc


def _finish_row(base: dict, work, post=None) -> dict[str, Any]:
    try:
        out = work()
        return {**base, **out, "status": "ok", "trained": True, "error": None, "finished_at": now()}
    except Exception as exc:
        # The console gets one line; the whole traceback goes to the task's log in the store, once: a
        # worker's own error is there already (tasklog.captured_output), a lost process's is not.
        if post is not None and not any(getattr(e, "shpeft_logged", False) for e in error_chain(exc)):
            post({"kind": "log", "task": base["task"], "lines": traceback.format_exc().splitlines()})
        return {**base, "status": "failed", "trained": False, "error": short_error(exc), "finished_at": now()}


def _ray_logs_dir() -> str:
    try:
        import ray

        return ray._private.worker._global_node.get_logs_dir_path()  # no public API names this folder
    except Exception:
        return "(unknown)"


def _after_task(ctx: StageContext, row: dict, params: dict | None = None, post=None) -> None:
    store, jid, progress = ctx.store, ctx.job_id, ctx.progress
    if post is not None:
        metric = row.get("metric") or DEFAULT_METRIC
        post({"kind": "task_end", "task": row["task"], "state": "done" if row["status"] == "ok" else "failed",
              "value": row.get(f"val_{metric}"), "error": row.get("error")})
    if row["status"] == "ok":
        layout.write_latest(store, {**row, "job_id": jid})
        ctx.count("tasks_trained")
        metric = row.get("metric") or DEFAULT_METRIC
        say(f"[{row['task']}] done: val_{metric} {row.get('val_' + metric, float('nan')):.4f} "
             f"test_{metric} {row.get('test_' + metric, float('nan')):.4f} -> {row.get('delta_uri')}", progress)
    else:
        ctx.count("tasks_failed")
        say(f"[{row['task']}] FAILED: {row.get('error')} (full log: shpeft logs {store} {jid} --task {row['task']})",
            True)  # failures are said even with --no-progress
    write_rows(store, jid, [row])
    ctx.tracker.task_finished(row, params)

