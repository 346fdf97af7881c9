"""The job pipeline on Ray: preflight -> shared importance -> training or sweeps -> artifacts + catalogue.

``run_job`` checks what it can before Ray starts (``preflight``), then runs the stages, each in its own
module: importance_stage (per-dataset and task-agnostic maps, cached by content), train_stage (every
task at once, as the cluster holds), sweep (every task's sweep in one Tune run), evaluate (the saved
artifact on a fresh backbone). It keeps the rows: one per task in the job's catalogue, skipping tasks
whose artifact already exists and verifies. docs/architecture.md shows the flow.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from shpeft_core.io import atomic_write_bytes, check_writable
from shpeft_core.options import artifact_kind

from orchestrator.store import layout
from orchestrator.store.results import catalogue_uri, latest_rows, write_rows
from orchestrator.runtime.console import error_chain, log, now, print_results_table, quiet_frameworks, say, short_error
from orchestrator.stages.importance_maps import extra_estimators, run_importance_stage
from orchestrator.job.spec import JobSpec, job_id as compute_job_id, resolve_task, task_name
from orchestrator.job.keys import backbone_dict, task_config_hash
from orchestrator.job.plan import plan_for
from orchestrator.runtime.resources import connect_ray
from orchestrator.store.layout import normalise_store
from orchestrator.stages.training import train_all

__all__ = ["JobResult", "run_job", "preflight", "note_input_sizes"]


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





def preflight(job: JobSpec):
    """Checks that need no cluster, run before Ray starts: the store takes writes, and the backbone
    builds and has weights the job's methods can select. Returns the backbone (the driver needs it)."""
    from shpeft_core.eligibility import eligible_parameters
    from shpeft_core.methods import SPARSE_METHODS

    from orchestrator.job.spec import JobSpecError, task_name
    from orchestrator.stages.task_run import build_backbone

    check_writable(normalise_store(job.store))
    model = build_backbone(backbone_dict(job), 2)
    methods = {job.method.for_task(task_name(t)) for t in job.tasks}
    if methods & set(SPARSE_METHODS) and not eligible_parameters(model, job.selection.rules):
        layers = [n for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv2d")][:8]
        raise JobSpecError(
            f"selection.rules: no weight of {job.backbone.name} is eligible for sparse training "
            f"(rules {job.selection.rules or 'built-in ViT/Swin/ConvNeXt rules'}); write rules that full-match "
            f"module paths of its Linear/Conv2d layers, e.g. {layers}")
    return model


def note_input_sizes(model, targets: list, progress: bool) -> None:
    """Say when a task's images are resized to another size for the backbone (a choice the user may not know)."""
    from timm.data import resolve_data_config

    input_px = int(resolve_data_config(model=model)["input_size"][-1])
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img is not None:
        input_px = int(img[-1] if isinstance(img, (tuple, list)) else img)
    for t in targets:
        if t.image_size and int(t.image_size) != input_px:
            say(f"[{t.name}] note: images are {t.image_size} px and the backbone takes {input_px} px; they are "
                 f"resized to {input_px} px (set backbone.kwargs.img_size to train at another size)", progress)


def run_job(job: JobSpec, *, address: str | None = None, num_cpus: int | None = None, force: bool = False,
            progress: bool = True) -> JobResult:
    """Run every stage of ``job`` on Ray; returns the rows written to the catalogue and an exit code.

    Starts a local Ray (explicit ``num_cpus``, dashboard on 127.0.0.1) when Ray is not initialised and
    ``address`` is None, joins ``address`` when given, and leaves an initialised Ray alone.
    """
    import ray

    model = preflight(job)  # before Ray starts: an unusable store or backbone fails now
    quiet_frameworks()
    started = connect_ray(address, num_cpus)
    workers = None
    try:
        workers = early_workers(job)
        return _run(job, model, workers, force=force, progress=progress)
    finally:
        if workers is not None:
            workers.close()
        if started:
            ray.shutdown()


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
    return WorkerPool(trainer_slots(cpus, gpus, job, user_limit=job.training.max_concurrent_tasks), res)


def _run(job: JobSpec, model, workers, *, force: bool, progress: bool) -> JobResult:
    import logging

    from orchestrator.runtime.tasklog import StoreLogs

    store = normalise_store(job.store)
    jid = compute_job_id(job)
    logs = StoreLogs(store, jid)  # driver.log gets every line the console shows, from the first one
    with logs.attached(logging.getLogger("shpeft")):
        return _run_logged(job, model, store, jid, logs, workers, force=force, progress=progress)


def _run_logged(job: JobSpec, model, store: str, jid: str, logs, workers, *, force: bool,
                progress: bool) -> JobResult:
    from orchestrator.tracking.tracker import make_tracker

    t_job = time.perf_counter()
    counters = {"importance_computed": 0, "importance_loaded": 0, "tasks_trained": 0, "tasks_skipped": 0,
                "tasks_failed": 0}
    say(f"job {jid}: {len(job.tasks)} task(s), store {store}", progress)
    atomic_write_bytes(layout.job_file(store, jid),
                       json.dumps(job.model_dump(mode="json"), indent=1, sort_keys=True).encode())
    tracker = make_tracker(job, jid, store, progress)  # no backends (and no cost) without a tracking section
    tracker.start_job(job)
    try:
        result = _stages(job, model, store, jid, counters, tracker, logs, workers, force=force, progress=progress)
    except Exception:
        tracker.end_job(ok=False)
        raise
    tracker.end_job(ok=not result.failed, plots=result.plots)
    if progress:
        print_results_table(result.rows)
        say(f"job {jid}: {len(result.rows) - len(result.failed)} ok, {len(result.failed)} failed in "
            f"{time.perf_counter() - t_job:.1f}s; catalogue {result.catalogue_uri}"
            + (f"; report {result.report}" if result.report else ""), progress)
    return result


def _stages(job: JobSpec, model, store: str, jid: str, counters: dict, tracker, logs, workers, *, force: bool,
            progress: bool) -> JobResult:
    from shpeft_core.backbone import backbone_fingerprint

    from orchestrator.runtime.progress import ProgressPrinter, start_board

    rows: dict[str, dict[str, Any]] = {}
    targets, target_errors = [], {}
    for entry in job.tasks:
        try:
            targets.append(resolve_task(entry))
        except Exception as exc:
            target_errors[task_name(entry)] = short_error(exc)
    pool_extra = [resolve_task(e) for e in job.importance.pool_datasets]

    note_input_sizes(model, targets, progress)
    backbone_fp = backbone_fingerprint(model)
    methods = {t.name: {job.method.for_task(t.name)} for t in targets}
    board = start_board()
    listeners = [logs, tracker.on_event] if tracker.enabled else [logs]
    with ProgressPrinter(board, enabled=progress, listeners=listeners) as printer:
        log.info("job file %s; Ray's own session logs: %s", layout.job_file(store, jid), _ray_logs_dir())
        imaps = run_importance_stage(job, store, backbone_fp, targets, pool_extra, force, progress, counters,
                                  extra_estimators(job, targets, methods), workers=workers, board=board)

        previous = latest_rows(store, jid)
        plans = []
        for spec in targets:
            method = job.method.for_task(spec.name)
            d = imaps.specific(spec.name, job.importance.estimator)
            ag = imaps.agnostic.get(spec.name) or {}
            base = {"task": spec.name, "metric": spec.metric, "started_at": now(), "method": method,
                    "seed": job.training.seed, "mix": job.selection.mix,
                    "importance_key": d.key, "agnostic_key": ag.get("key"),
                    "importance_cache": "hit" if d.cache == "hit" and ag.get("cache") in ("hit", "") else "miss",
                    "importance_s": d.seconds, "granularity": job.selection.granularity}
            chash = task_config_hash(job, spec, d.key, ag.get("key"), method=method)
            try:
                plan = plan_for(job, spec, backbone_fp, imaps, method=method, seed=job.training.seed,
                                artifact=layout.task_artifact(store, spec.name, jid, chash, method),
                                epochs=(job.sweep.epochs or job.training.epochs) if job.sweep.enabled else None)
            except Exception as exc:
                rows[spec.name] = {**base, "status": "failed", "error": short_error(exc), "finished_at": now()}
                tracker.task_finished(rows[spec.name])
                continue
            base.update(config_hash=chash, artifact_kind=artifact_kind(method), granularity=plan.granularity)
            announce = {"kind": "plan", "task": spec.name, "method": method, "metric": spec.metric,
                        "epochs": plan.train["epochs"], "trials": job.sweep.trials_per_task if job.sweep.enabled else 0}
            if not force and layout.row_verified(previous.get(spec.name), chash):
                rows[spec.name] = {**previous[spec.name], "trained": False}
                counters["tasks_skipped"] += 1
                printer.post({**announce, "state": "skipped"})
                printer.post({"kind": "task_end", "task": spec.name, "state": "skipped",
                              "value": rows[spec.name].get(f"val_{spec.metric}")})
                say(f"[{spec.name}] artifact verified (sha256 {previous[spec.name]['sha256'][:12]}), skipped", progress)
                continue
            printer.post(announce)
            plans.append((plan, base, chash))
            tracker.planned(plan, chash)
        for name, err in target_errors.items():
            rows[name] = {"task": name, "status": "failed", "error": err, "started_at": now(), "finished_at": now()}
            tracker.task_finished(rows[name])
        if rows:
            write_rows(store, jid, rows.values())

        if job.sweep.enabled and plans:
            from orchestrator.stages.sweep import run_sweeps

            swept = run_sweeps(job, store, jid, [(plan, chash) for plan, _, chash in plans], board, force, progress,
                               tracker=tracker)
            for plan, base, _ in plans:
                got = dict(swept[plan.task_name])
                best = {k: got.pop(k) for k in ("lr", "best_trial") if k in got}  # tracked, not catalogue columns
                rows[plan.task_name] = _finish_row(base, lambda: got if "error" not in got else _raise(got["error"]),
                                                   printer.post)
                _after_task(rows[plan.task_name], counters, store, jid, progress, tracker, best, printer.post)
        else:
            def on_done(base: dict, get_result) -> None:
                rows[base["task"]] = _finish_row(base, get_result, printer.post)
                _after_task(rows[base["task"]], counters, store, jid, progress, tracker, post=printer.post)

            train_all(job, store, jid, plans, board, force, progress, on_done, workers=workers)

    ordered = [rows[task_name(e)] for e in job.tasks if task_name(e) in rows]
    failed = [r["task"] for r in ordered if r.get("status") != "ok"]
    plots: list[str] = []
    try:
        from orchestrator.reporting.plots import write_plots

        plots = write_plots(store, jid, ordered, imaps.named_uris(job.importance.estimator),
                            {t: a["uri"] for t, a in imaps.agnostic.items() if a.get("uri")})
    except Exception as exc:  # plots are a convenience; a plotting problem must not fail the job
        say(f"plots skipped: {short_error(exc)}", progress)
    report = None
    try:
        from orchestrator.reporting.job_report import write_job_report

        report, _ = write_job_report(store, jid)
    except Exception as exc:  # like the plots: a report problem is said in one line and never fails the job
        say(f"report skipped: {short_error(exc)} (retry with: shpeft report {store} {jid})", True)
    return JobResult(job_id=jid, store=store, rows=ordered, failed=failed, counters=counters,
                     catalogue_uri=catalogue_uri(store, jid), plots=plots, report=report)


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


def _after_task(row: dict, counters: dict, store: str, jid: str, progress: bool, tracker,
                params: dict | None = None, post=None) -> None:
    if post is not None:
        metric = row.get("metric") or "macro_f1"
        post({"kind": "task_end", "task": row["task"], "state": "done" if row["status"] == "ok" else "failed",
              "value": row.get(f"val_{metric}"), "error": row.get("error")})
    if row["status"] == "ok":
        layout.write_latest(store, {**row, "job_id": jid})
        counters["tasks_trained"] += 1
        metric = row.get("metric") or "macro_f1"
        say(f"[{row['task']}] done: val_{metric} {row.get('val_' + metric, float('nan')):.4f} "
             f"test_{metric} {row.get('test_' + metric, float('nan')):.4f} -> {row.get('delta_uri')}", progress)
    else:
        counters["tasks_failed"] += 1
        say(f"[{row['task']}] FAILED: {row.get('error')} (full log: shpeft logs {store} {jid} --task {row['task']})",
            progress)
    write_rows(store, jid, [row])
    tracker.task_finished(row, params)

