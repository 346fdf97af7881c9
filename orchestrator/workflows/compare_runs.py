"""The runs of one `shpeft compare`: learning-rate tuning on validation, then the seeds, on one warm pool.

Invariants: every run is planned by ``stages.context.plan_task`` (the same plan `shpeft run` makes), so a
comparison's run differs from another only by what it compares; artifacts are named by their config
hash, so the tuning run at the chosen point and the first seed's final run are one artifact (trained
once, evaluated on test only as a final run); a finished run is reused, after its artifact verifies,
when the same comparison runs again; results.parquet and tuning.parquet are rewritten atomically after
every run, so a killed comparison resumes where it stopped.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

import pyarrow as pa

from shpeft_core.methods import get_method
from shpeft_core.options import DEFAULT_METRIC, EVAL_SPLITS, SUMMARY_METRICS

from orchestrator.runtime.console import say, short_error
from orchestrator.stages.context import plan_task
from orchestrator.stages.evaluation import evaluate_artifact
from orchestrator.store import layout
from orchestrator.store.layout import row_verified
from orchestrator.store.results import read_table_rows, write_table_rows
from orchestrator.workflows.compare_tuning import (TUNE_EXTENSIONS, choose_lr, lr_grid, read_tuning, starting_lr,
                                                   write_tuning)

__all__ = ["RESULT_COLUMNS", "SCHEMA", "CompareRuns", "tune_learning_rates", "read_results", "write_results"]

RESULT_COLUMNS = [
    ("task", pa.string()), ("method", pa.string()), ("mix", pa.string()), ("seed", pa.int64()),
    ("variant", pa.string()),  # the method's label in tables: its rule and, given with @, its own density
    ("density", pa.float64()), ("alpha", pa.float64()), ("effective_alpha", pa.float64()),
    ("lr", pa.float64()), ("lr_source", pa.string()),  # default | job (method.lr) | tuned (on validation)
    ("importance_seed", pa.int64()), ("epochs", pa.int64()),
    *[(f"{s}_{m}", pa.float64()) for s in EVAL_SPLITS for m in SUMMARY_METRICS],
    ("trainable", pa.int64()), ("dense_values", pa.int64()), ("budget", pa.string()),
    ("artifact_bytes", pa.int64()), ("artifact_kind", pa.string()),
    ("artifact_uri", pa.string()), ("sha256", pa.string()), ("config_hash", pa.string()),
    ("train_s", pa.float64()), ("reused_tuning_run", pa.bool_()), ("status", pa.string()), ("error", pa.string()),
]
SCHEMA = pa.schema([pa.field(n, t) for n, t in RESULT_COLUMNS])


def read_results(uri: str) -> list[dict[str, Any]]:
    return read_table_rows(uri)


def write_results(uri: str, rows: list[dict[str, Any]]) -> None:
    write_table_rows(uri, rows, SCHEMA)


def _run_one(arg) -> dict[str, Any]:
    """One run inside a pool actor: (plan, mode). ``tune``: train, then evaluate the saved artifact on
    validation only; ``final``: train, then evaluate on validation and test; ``evaluate``: the artifact of
    the tuning run at the chosen point, evaluated on validation and test without training again."""
    from orchestrator.stages.task_run import run_plan

    plan, mode = arg
    t0 = time.perf_counter()
    # The saved artifact is evaluated below; per-epoch validation would only draw a curve nobody reads.
    out = run_plan(plan, validate_each_epoch=False) if mode != "evaluate" else {}
    train_s = time.perf_counter() - t0
    ev = evaluate_artifact(plan, on=("val",) if mode == "tune" else EVAL_SPLITS)
    return {**ev, "train_s": train_s, "trainable": out.get("trainable", ev.get("trainable")),
            "artifact_bytes": ev["bytes"]}


class CompareRuns:
    """Plans and runs a comparison's (task, method entry, seed[, point]) on one warm worker pool."""

    def __init__(self, ctx, imaps, job, root: str, importance_seed, equal_budget: bool, progress: bool):
        self.ctx, self.imaps, self.job, self.root = ctx, imaps, job, root
        self.importance_seed, self.equal_budget, self.progress = importance_seed, bool(equal_budget), progress
        self.results_uri = layout.compare_results(root)
        self.tuning_uri = layout.compare_tuning(root)
        self._pool = None

    @contextmanager
    def pool(self):
        """One warm pool for the tuning and the final runs: torch and the project imported once per slot."""
        from orchestrator.runtime.resources import cluster_resources, trainer_slots, worker_resources
        from orchestrator.runtime.worker_pool import WorkerPool
        from orchestrator.stages import RUN_IMPORTS

        job = self.job
        cpus, gpus = cluster_resources()
        one_worker = job.model_copy(update={"training": job.training.model_copy(update={"workers_per_task": 1})})
        slots = trainer_slots(cpus, gpus, one_worker, user_limit=job.training.max_concurrent_tasks)
        with WorkerPool(slots, worker_resources(job), RUN_IMPORTS) as pool:
            self._pool = pool
            try:
                yield pool
            finally:
                self._pool = None

    def variant_job(self, entry):
        """The job an entry runs: its hybrid rule and its own density over the job's."""
        sel = {k: v for k, v in (("mix", entry.mix), ("density", entry.density)) if v is not None}
        return self.job if not sel else self.job.model_copy(
            update={"selection": self.job.selection.model_copy(update=sel)})

    def plan(self, spec, entry, seed: int, point: dict[str, Any] | None = None):
        slug = entry.text.replace(":", "-").replace("@", "-d")
        folder = layout.compare_artifacts_dir(self.root, spec.name)
        return plan_task(self.ctx, self.imaps, spec, method=entry.method, seed=seed, job=self.variant_job(entry),
                         importance_seed=self.importance_seed(seed), point=point, equal_budget=self.equal_budget,
                         artifact=lambda h: layout.artifact_uri(folder, f"{slug}-{h}", entry.method))

    def execute(self, items: list[tuple[Any, Any]], on_done, what: str) -> None:
        from orchestrator.runtime.progress import counting_bar

        if not items:
            return
        with counting_bar(what, len(items), enabled=self.progress) as advance:
            def done(key, get_result):
                on_done(key, get_result)
                advance()

            self._pool.run(_run_one, items, max_failures=1, on_done=done, keep=True)

    def final(self, targets, entries, seed_list: list[int], chosen: dict, tuning: list[dict], force: bool):
        """Every (task, entry, seed) at its chosen learning rate, evaluated on validation and test."""
        job = self.job
        previous = {} if force else {(r["task"], r.get("variant"), r["seed"]): r for r in read_results(self.results_uri)}
        tuned_runs = {r["config_hash"]: r for r in tuning if r.get("status") == "ok"}
        rows: dict[tuple, dict[str, Any]] = {}
        pending: list[tuple[tuple, dict, Any, str]] = []
        for spec in targets:
            for e in entries:
                m = get_method(e.method)
                label = e.label(job.selection.mix)
                lr, source = chosen[(spec.name, label)]
                for seed in seed_list:
                    key = (spec.name, label, seed)
                    base = {"task": spec.name, "method": e.method, "seed": seed, "variant": label,
                            "mix": (e.mix or job.selection.mix) if m.takes_mix else None, "lr_source": source,
                            "importance_seed": self.importance_seed(seed), "artifact_kind": m.artifact,
                            "reused_tuning_run": False}
                    try:
                        plan, chash = self.plan(spec, e, seed, {"lr": lr} if source == "tuned" else None)
                    except Exception as exc:
                        rows[key] = {**base, "status": "failed", "error": short_error(exc)}
                        continue
                    base.update(config_hash=chash, density=plan.density if m.uses_mask else None,
                                alpha=plan.alpha if m.uses_importance else None,
                                lr=plan.train["head_lr"] if m.head_only else plan.train["lr"],
                                epochs=plan.train["epochs"], artifact_uri=plan.artifact_uri,
                                budget=m.budget_label(density=plan.density, granularity=plan.granularity,
                                                      equal_budget=self.equal_budget, settings=plan.settings))
                    if row_verified(previous.get(key), chash, "artifact_uri"):
                        rows[key] = previous[key]
                        continue
                    tuned = tuned_runs.get(chash)
                    if row_verified(tuned, chash, "artifact_uri"):
                        base.update(reused_tuning_run=True, train_s=tuned.get("train_s"), trainable=tuned.get("trainable"))
                        pending.append((key, base, plan, "evaluate"))
                    else:
                        pending.append((key, base, plan, "final"))
        total = len(rows) + len(pending)
        if rows:
            say(f"compare: {len(rows)} run(s) already done and verified, {len(pending)} to run", self.progress)
        bases = {key: base for key, base, _, _ in pending}

        def finished(key: tuple, get_result) -> None:
            base = bases[key]
            try:
                out = get_result()
                if base.get("reused_tuning_run"):  # trained as a tuning run: its cost and count are that run's
                    out = {**out, "train_s": base.get("train_s"), "trainable": base.get("trainable")}
                rows[key] = {**base, **{k: v for k, v in out.items() if k in SCHEMA.names}, "status": "ok", "error": None}
            except Exception as exc:
                rows[key] = {**base, "status": "failed", "error": short_error(exc)}
            r = rows[key]
            if r["status"] == "ok":
                say(f"[{len(rows)}/{total}] {r['task']} {r['variant']} seed {r['seed']} (lr {r['lr']:.3g} "
                     f"{r['lr_source']}): val {DEFAULT_METRIC} {r['val_' + DEFAULT_METRIC]:.3f} test "
                     f"{r['test_' + DEFAULT_METRIC]:.3f} ({r['train_s'] or 0:.0f}s)", self.progress)
            else:
                say(f"[{len(rows)}/{total}] {r['task']} {r['variant']} seed {r['seed']}: FAILED {r['error']}",
                    self.progress)
            write_results(self.results_uri, list(rows.values()))

        self.execute([(key, (plan, mode)) for key, _, plan, mode in pending], finished, "compare")
        ordered = [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1], k[2]))]
        write_results(self.results_uri, ordered)
        return ordered


def tune_learning_rates(runs: CompareRuns, targets, entries, seed: int, points: int, force: bool,
                        extensions: int = TUNE_EXTENSIONS):
    """Each (task, entry)'s learning rate, chosen on validation from ``lr_grid`` around its default.

    Where the best value sits at an end of what was tried, one more value a grid step beyond it is tried
    (at most ``extensions`` times per (task, entry)), so a rate is not chosen at the edge of the grid
    only because the grid ended there. Returns ({(task, label): (lr, source)}, the tuning rows).
    ``points`` 0: no tuning (each method's default, or its pinned method.lr). A (task, entry) whose tries
    all failed keeps its default."""
    job = runs.job
    previous = {} if force else {(r["task"], r["variant"], r["lr"]): r for r in read_tuning(runs.tuning_uri)}
    chosen: dict[tuple[str, str], tuple[float, str]] = {}
    searched: dict[tuple[str, str], tuple[Any, Any]] = {}  # (task, label) -> (spec, entry)
    rows: dict[tuple, dict[str, Any]] = {}
    bases: dict[tuple, dict[str, Any]] = {}

    def add(spec, e, lr: float, pending: list) -> None:
        m = get_method(e.method)
        label = e.label(job.selection.mix)
        key = (spec.name, label, lr)
        base = {"task": spec.name, "variant": label, "method": e.method, "seed": seed, "lr": lr,
                "mix": (e.mix or job.selection.mix) if m.takes_mix else None, "metric": spec.metric,
                "artifact_kind": m.artifact}
        try:
            plan, chash = runs.plan(spec, e, seed, {"lr": lr})
        except Exception as exc:
            rows[key] = {**base, "status": "failed", "error": short_error(exc)}
            return
        base.update(config_hash=chash, artifact_uri=plan.artifact_uri)
        if row_verified(previous.get(key), chash, "artifact_uri"):
            rows[key] = previous[key]
            return
        bases[key] = base
        pending.append((key, (plan, "tune")))

    def finished(key: tuple, get_result) -> None:
        base = bases[key]
        try:
            out = get_result()
            rows[key] = {**base, "val_score": out.get(f"val_{base['metric']}"), "sha256": out.get("sha256"),
                         "train_s": out.get("train_s"), "trainable": out.get("trainable"), "status": "ok",
                         "error": None}
            say(f"tuning {base['task']} {base['variant']} lr {base['lr']:.3g}: val {base['metric']} "
                 f"{rows[key]['val_score']:.3f}", runs.progress)
        except Exception as exc:
            rows[key] = {**base, "status": "failed", "error": short_error(exc)}
            say(f"tuning {base['task']} {base['variant']} lr {base['lr']:.3g}: FAILED {rows[key]['error']}",
                runs.progress)
        write_tuning(runs.tuning_uri, list(rows.values()))

    def scores(task: str, label: str) -> dict[float, float | None]:
        return {lr: (r.get("val_score") if r.get("status") == "ok" else None)
                for (t, lab, lr), r in rows.items() if t == task and lab == label}

    pending: list[tuple[tuple, Any]] = []
    for spec in targets:
        for e in entries:
            label = e.label(job.selection.mix)
            lr0, source = starting_lr(job, e.method)
            chosen[(spec.name, label)] = (lr0, source)
            if not points or source == "job":
                continue
            searched[(spec.name, label)] = (spec, e)
            for lr in lr_grid(lr0, points):
                add(spec, e, lr, pending)
    if pending:
        say(f"tuning: {len(pending)} run(s) on validation ({len(rows)} already done)", runs.progress)
    for round_ in range(extensions + 1):
        runs.execute(pending, finished, "tuning")
        pending = []
        if round_ == extensions:
            break
        for (task, label), (spec, e) in searched.items():  # one step beyond an edge that won
            tried = scores(task, label)
            best = choose_lr(tried, chosen[(task, label)][0]) if tried else None
            if best is None or len(tried) < 2:
                continue
            step = lr_grid(best, 3)
            beyond = step[0] if best == min(tried) else step[-1] if best == max(tried) else None
            if beyond is not None and beyond not in tried:
                add(spec, e, beyond, pending)
        if pending:
            say(f"tuning: {len(pending)} more run(s) beyond the end of the grid that won", runs.progress)
    for (task, label), (lr0, _) in list(chosen.items()):
        tried = scores(task, label)
        best = choose_lr(tried, lr0) if tried else None
        if best is not None and len(tried) > 1:  # one value tried (--tune-points 1) chose nothing
            chosen[(task, label)] = (best, "tuned")
    ordered = [rows[k] for k in sorted(rows)]
    if ordered:
        write_tuning(runs.tuning_uri, ordered)
    return chosen, ordered
