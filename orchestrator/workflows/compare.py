"""`shpeft compare`: SH-PEFT beside the methods users would pick instead, in one harness.

Every (task, method, seed) run goes through the same loaders, transforms, schedule, epochs, head
initialisation and evaluation of its saved artifact; sparse methods share the importance cache with
`shpeft run`. Runs are one-worker runs on the warm worker pool (a comparison launches many small runs,
where a Ray Train worker group or a new process per run would cost more to start than the run itself). Finished runs are
kept in ``<store>/reports/<id>/results.parquet`` and skipped, after their artifact verifies, when
the same comparison runs again. The report (Markdown + PNGs) is written beside it.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shpeft_core.io import atomic_write_bytes, exists, read_bytes
from shpeft_core.methods import get_method, method_names
from shpeft_core.options import DEFAULT_METRIC, EVAL_SPLITS, MIXES, SUMMARY_METRICS

from orchestrator.job.spec import JobSpec, JobSpecError, content_hash, task_name

from orchestrator.job.keys import job_id as compute_job_id
from orchestrator.runtime.console import say, short_error
from orchestrator.runtime.resources import cluster_resources, trainer_slots, worker_resources
from orchestrator.runtime.session import ray_session
from orchestrator.runtime.worker_pool import run_on_pool
from orchestrator.stages import RUN_IMPORTS
from orchestrator.stages.context import StageContext, plan_task
from orchestrator.stages.evaluation import evaluate_artifact
from orchestrator.stages.importance_maps import run_importance_stage
from orchestrator.store import layout
from orchestrator.store.layout import normalise_store, report_dir, row_verified
from orchestrator.workflows.preflight import preflight, resolve_targets

__all__ = ["CompareResult", "DEFAULT_METHODS", "SMOKE_TEST_METHODS", "default_methods", "parse_methods",
           "compare_settings", "run_compare", "RESULT_COLUMNS"]


def default_methods() -> tuple[str, ...]:
    """Every registered method, a hybrid once per rule (``shpeft`` with the job's rule, then the others)."""
    out = []
    for name in method_names():
        out.append(name)
        if get_method(name).takes_mix:
            out += [f"{name}:{mix}" for mix in MIXES[1:]]
    return tuple(out)


DEFAULT_METHODS = default_methods()
SMOKE_TEST_METHODS = "shpeft,linear,full"  # `compare --smoke-test` without --methods
RESULT_COLUMNS = [
    ("task", pa.string()), ("method", pa.string()), ("mix", pa.string()), ("seed", pa.int64()),
    ("density", pa.float64()), ("alpha", pa.float64()), ("lr", pa.float64()), ("epochs", pa.int64()),
    *[(f"{s}_{m}", pa.float64()) for s in EVAL_SPLITS for m in SUMMARY_METRICS],
    ("trainable", pa.int64()), ("artifact_bytes", pa.int64()), ("artifact_kind", pa.string()),
    ("artifact_uri", pa.string()), ("sha256", pa.string()), ("config_hash", pa.string()),
    ("train_s", pa.float64()), ("status", pa.string()), ("error", pa.string()),
]
SCHEMA = pa.schema([pa.field(n, t) for n, t in RESULT_COLUMNS])


def parse_methods(text: str | tuple[str, ...] | list[str]) -> list[tuple[str, str | None]]:
    """'shpeft,shpeft:rank_sum,linear' -> [(method, mix or None)]; raises ValueError naming the bad entry."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    out = []
    for item in items:
        method, _, mix = item.partition(":")
        if method not in method_names():
            raise ValueError(f"--methods: {item!r} is not a method; methods: {', '.join(method_names())}")
        if mix and (mix not in MIXES or not get_method(method).takes_mix):
            takers = [m for m in method_names() if get_method(m).takes_mix]
            raise ValueError(f"--methods: {item!r}: only {' and '.join(takers)} {'takes' if len(takers) == 1 else 'take'} "
                             f"a rule, one of {MIXES}")
        out.append((method, mix or None))
    if not out:
        raise ValueError("--methods: no method given")
    return list(dict.fromkeys(out))


def compare_settings(job: JobSpec, methods: str | None, seeds: int, *,
                     smoke_test: bool = False) -> tuple[JobSpec, list[str], int]:
    """What `shpeft compare` runs: (job, method names for ``run_compare``, seeds).

    ``methods`` is the --methods text; None means every default method. ``smoke_test`` is a quick check:
    one epoch, one seed and, unless methods were given, only SMOKE_TEST_METHODS. Raises ValueError naming
    a method that does not exist.
    """
    chosen = parse_methods(methods) if methods else list(parse_methods(DEFAULT_METHODS))
    if smoke_test:
        job = job.model_copy(update={"training": job.training.model_copy(update={"epochs": 1})})
        seeds = 1
        if not methods:
            chosen = parse_methods(SMOKE_TEST_METHODS)
    return job, [m if mix is None else f"{m}:{mix}" for m, mix in chosen], seeds


def method_label(method: str, mix: str | None, job_mix: str) -> str:
    return get_method(method).label(mix or job_mix)


@dataclass
class CompareResult:
    report_id: str
    store: str
    rows: list[dict[str, Any]]
    report_uri: str = ""
    results_uri: str = ""
    plots: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if any(r["status"] != "ok" for r in self.rows) else 0


def _read_results(uri: str) -> list[dict[str, Any]]:
    if not exists(uri):
        return []
    return pq.read_table(io.BytesIO(read_bytes(uri))).to_pylist()


def _write_results(uri: str, rows: list[dict[str, Any]]) -> None:
    table = pa.Table.from_pylist([{n: r.get(n) for n, _ in RESULT_COLUMNS} for r in rows], schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(uri, buf.getvalue())


def _run_one(plan) -> dict[str, Any]:
    """One comparison run inside a Ray task: train in this process, then evaluate the saved artifact."""
    from orchestrator.stages.task_run import run_plan

    t0 = time.perf_counter()
    out = run_plan(plan)
    train_s = time.perf_counter() - t0
    ev = evaluate_artifact(plan)
    return {**ev, "train_s": train_s, "trainable": out.get("trainable"), "artifact_bytes": ev["bytes"]}


def run_compare(job: JobSpec, *, methods=DEFAULT_METHODS, seeds: int = 3, address: str | None = None,
                num_cpus: int | None = None, force: bool = False, progress: bool = True) -> CompareResult:
    """Run methods x tasks x seeds on Ray and write results.parquet and report.md; see the module doc."""
    from orchestrator.job.classes import with_classes

    job = with_classes(job)  # classes left to a task's folders are written in, as `shpeft run` does
    model = preflight(job)  # before Ray starts
    with ray_session(address, num_cpus):
        return _compare(job, model, parse_methods(methods), seeds, force=force, progress=progress)


def _compare(job: JobSpec, model, methods: list[tuple[str, str | None]], seeds: int, *, force: bool,
             progress: bool) -> CompareResult:
    from shpeft_core.backbone import backbone_fingerprint

    from orchestrator.reporting.compare_report import write_report

    t_all = time.perf_counter()
    store = normalise_store(job.store)
    seed_list = [job.training.seed + i for i in range(seeds)]
    rid = content_hash({"job": compute_job_id(job), "methods": methods, "seeds": seed_list}, length=12)
    root = report_dir(store, rid)
    results_uri = layout.compare_results(root)
    labels = [method_label(m, mix, job.selection.mix) for m, mix in methods]
    say(f"compare {rid}: {len(job.tasks)} task(s) x {len(methods)} method(s) ({', '.join(labels)}) x "
         f"{seeds} seed(s); store {store}", progress)

    resolved = resolve_targets(job, model, progress)
    if resolved.errors:  # a comparison needs every task: name the first that cannot be read
        name, err = next(iter(resolved.errors.items()))
        raise JobSpecError(f"tasks: {name}: {err}")
    targets = resolved.specs
    ctx = StageContext(job=job, store=store, job_id=rid, backbone_fp=backbone_fingerprint(model), force=force,
                       progress=progress, counters={"importance_computed": 0, "importance_loaded": 0})
    wanted = {m for m, _ in methods}
    imaps = run_importance_stage(ctx, targets, resolved.pool_extra, {t.name: wanted for t in targets})

    previous = {(r["task"], r["method"], r["mix"], r["seed"]): r for r in ([] if force else _read_results(results_uri))}
    rows: dict[tuple, dict[str, Any]] = {}
    pending: list[tuple[tuple, dict, Any]] = []
    res = worker_resources(job)
    for spec in targets:
        for method, mix in methods:
            mix_job = job if mix is None else job.model_copy(
                update={"selection": job.selection.model_copy(update={"mix": mix})})
            for seed in seed_list:
                m = get_method(method)
                key = (spec.name, method, mix_job.selection.mix if m.takes_mix else None, seed)
                name = f"{method}-{key[2]}-s{seed}" if m.takes_mix else f"{method}-s{seed}"
                base = {"task": spec.name, "method": method, "mix": key[2], "seed": seed,
                        "artifact_kind": m.artifact}
                try:
                    plan, chash = plan_task(
                        ctx, imaps, spec, method=method, seed=seed, job=mix_job,
                        artifact=lambda _: layout.artifact_uri(layout.compare_artifacts_dir(root, spec.name),
                                                               name, method))
                except Exception as exc:
                    rows[key] = {**base, "status": "failed", "error": short_error(exc)}
                    continue
                base.update(config_hash=chash, density=plan.density if m.uses_mask else None,
                            alpha=plan.alpha if m.uses_importance else None,
                            lr=plan.train["lr"], epochs=plan.train["epochs"], artifact_uri=plan.artifact_uri)
                if row_verified(previous.get(key), chash, "artifact_uri"):
                    rows[key] = previous[key]
                    continue
                pending.append((key, base, plan))
    done_before = len(rows)
    total = done_before + len(pending)
    if done_before:
        say(f"compare {rid}: {done_before} run(s) already done and verified, {len(pending)} to run", progress)
    bases = {key: base for key, base, _ in pending}

    def finished(key: tuple, get_result) -> None:
        base = bases[key]
        try:
            out = get_result()
            rows[key] = {**base, **{k: v for k, v in out.items() if k in SCHEMA.names}, "status": "ok", "error": None}
        except Exception as exc:
            rows[key] = {**base, "status": "failed", "error": short_error(exc)}
        r = rows[key]
        label = method_label(r["method"], r["mix"], job.selection.mix)
        metric = DEFAULT_METRIC
        if r["status"] == "ok":
            say(f"[{len(rows)}/{total}] {r['task']} {label} seed {r['seed']}: val {metric} "
                 f"{r['val_' + metric]:.3f} test {r['test_' + metric]:.3f} ({r['train_s']:.0f}s)", progress)
        else:
            say(f"[{len(rows)}/{total}] {r['task']} {label} seed {r['seed']}: FAILED {r['error']}", progress)
        _write_results(results_uri, list(rows.values()))
        advance()

    # Every run on the warm worker pool: torch and the project are imported once per slot, not per run.
    cpus, gpus = cluster_resources()
    one_worker = job.model_copy(update={"training": job.training.model_copy(update={"workers_per_task": 1})})
    slots = trainer_slots(cpus, gpus, one_worker, user_limit=job.training.max_concurrent_tasks)
    from orchestrator.runtime.progress import counting_bar

    with counting_bar("compare", len(pending), enabled=progress) as advance:
        run_on_pool(_run_one, [(key, plan) for key, _, plan in pending], slots=slots, resources=res,
                    preload=RUN_IMPORTS,
                    max_failures=1, on_done=finished)
    ordered = [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1], k[2] or "", k[3]))]
    _write_results(results_uri, ordered)
    task_names = [task_name(e) for e in job.tasks]
    report_uri, plots = write_report(root, ordered, job=job, task_order=task_names, labels=labels,
                                     agnostic=imaps.agnostic, seconds=time.perf_counter() - t_all)
    if progress:
        from orchestrator.reporting.tables import print_compare_table

        print_compare_table(ordered, task_names, labels, job.selection.mix)
        say(f"compare {rid}: report {report_uri}", progress)
    return CompareResult(report_id=rid, store=store, rows=ordered, report_uri=report_uri, results_uri=results_uri,
                         plots=plots)
