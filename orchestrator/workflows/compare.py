"""`shpeft compare`: SH-PEFT beside the methods users would pick instead, in one harness.

Every (task, method, seed) run goes through the same loaders, transforms, schedule, epochs, head
initialisation and evaluation of its saved artifact; sparse methods share the importance cache with
`shpeft run`. Each (task, method)'s learning rate is first chosen on validation (compare_tuning.py);
the job-level ``training.lr`` is never used (``method.lr`` pins a method's rate). Each seed draws its
own importance batches and warm head unless ``fixed_importance``. Runs are one-worker runs on one warm
worker pool (a comparison launches many small runs, where a Ray Train worker group or a new process per
run would cost more to start than the run itself; compare_runs.py). Finished runs are kept in
``<store>/reports/<id>/results.parquet`` (tuning runs in tuning.parquet) and skipped, after their
artifact verifies, when the same comparison runs again. The report (Markdown + PNGs) is written beside it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from shpeft_core.methods import get_method, method_names
from shpeft_core.options import MIXES

from orchestrator.job.spec import JobSpec, JobSpecError, content_hash, task_name

from orchestrator.job.keys import job_id as compute_job_id
from orchestrator.runtime.console import say
from orchestrator.runtime.session import ray_session
from orchestrator.stages.context import StageContext
from orchestrator.stages.importance_maps import run_importance_stage
from orchestrator.store import layout
from orchestrator.store.layout import normalise_store, report_dir
from orchestrator.workflows.compare_runs import RESULT_COLUMNS, CompareRuns, tune_learning_rates
from orchestrator.workflows.compare_tuning import TUNE_EXTENSIONS
from orchestrator.workflows.preflight import preflight, resolve_targets

__all__ = ["CompareResult", "DEFAULT_METHODS", "SMOKE_TEST_METHODS", "Entry", "default_methods", "parse_methods",
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
@dataclass(frozen=True)
class Entry:
    """One --methods entry: a method, its hybrid rule (None: the job's) and its own density (None: the job's)."""

    method: str
    mix: str | None = None
    density: float | None = None

    def label(self, job_mix: str) -> str:
        lab = get_method(self.method).label(self.mix or job_mix)
        return lab if self.density is None else f"{lab} @ {self.density:g}"

    @property
    def text(self) -> str:
        return self.method + (f":{self.mix}" if self.mix else "") + (f"@{self.density:g}" if self.density else "")


def parse_methods(text: str | tuple[str, ...] | list[str]) -> list[Entry]:
    """'shpeft,shpeft:rank_sum,shpeft@0.001,linear' -> entries; raises ValueError naming the bad entry.
    ``@density`` runs a mask method at its own density (e.g. a paper-like 1e-3 beside the job's)."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    out = []
    for item in items:
        head, at, dens = item.partition("@")
        method, _, mix = head.partition(":")
        if method not in method_names():
            raise ValueError(f"--methods: {item!r} is not a method; methods: {', '.join(method_names())}")
        if mix and (mix not in MIXES or not get_method(method).takes_mix):
            takers = [m for m in method_names() if get_method(m).takes_mix]
            raise ValueError(f"--methods: {item!r}: only {' and '.join(takers)} {'takes' if len(takers) == 1 else 'take'} "
                             f"a rule, one of {MIXES}")
        density = None
        if at:
            if not get_method(method).uses_mask:
                raise ValueError(f"--methods: {item!r}: only mask methods take a density (@)")
            try:
                density = float(dens)
            except ValueError:
                density = -1.0
            if not 0 < density <= 1:
                raise ValueError(f"--methods: {item!r}: the density after @ must be a number in (0, 1]")
        out.append(Entry(method, mix or None, density))
    if not out:
        raise ValueError("--methods: no method given")
    return list(dict.fromkeys(out))


def compare_settings(job: JobSpec, methods: str | None, seeds: int, *,
                     smoke_test: bool = False) -> tuple[JobSpec, list[str], int]:
    """What `shpeft compare` runs: (job, method entries for ``run_compare``, seeds).

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
    return job, [e.text for e in chosen], seeds


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


def run_compare(job: JobSpec, *, methods=DEFAULT_METHODS, seeds: int = 3, address: str | None = None,
                num_cpus: int | None = None, force: bool = False, progress: bool = True, tune: bool = True,
                tune_points: int = 3, tune_extensions: int = TUNE_EXTENSIONS, fixed_importance: bool = False,
                equal_budget: bool = False, reference: str = "shpeft") -> CompareResult:
    """Run methods x tasks x seeds on Ray and write results.parquet and report.md; see the module doc.

    ``tune``: choose each (task, method)'s learning rate on validation first (``compare_tuning``), from
    ``tune_points`` values and at most ``tune_extensions`` steps beyond an end of the grid that won;
    ``fixed_importance``: every seed uses the maps of ``training.seed`` (by default
    each seed draws its own importance batches and warm head); ``equal_budget``: every mask method selects
    the job's k (GPS included); ``reference``: the method the report's paired statistics compare against.
    """
    from orchestrator.job.classes import with_classes

    job = with_classes(job)  # classes left to a task's folders are written in, as `shpeft run` does
    model = preflight(job)  # before Ray starts
    points = tune_points if tune else 0
    settings = {"tune": points, "tune_extensions": tune_extensions if points else 0,
                "fixed_importance": fixed_importance, "equal_budget": equal_budget, "reference": reference}
    with ray_session(address, num_cpus):
        return _compare(job, model, parse_methods(methods), seeds, force=force, progress=progress, settings=settings)


def _compare(job: JobSpec, model, entries: list[Entry], seeds: int, *, force: bool, progress: bool,
             settings: dict[str, Any]) -> CompareResult:
    from shpeft_core.backbone import backbone_fingerprint

    from orchestrator.reporting.compare_report import write_report

    t_all = time.perf_counter()
    store = normalise_store(job.store)
    seed_list = [job.training.seed + i for i in range(seeds)]
    # Steps beyond the grid are keyed only where they differ from the default (and matter: tuning is on),
    # so a report's id is what it was before they could be chosen.
    keyed = dict(settings)
    if not settings["tune"] or settings["tune_extensions"] == TUNE_EXTENSIONS:
        del keyed["tune_extensions"]
    rid = content_hash({"job": compute_job_id(job), "methods": [e.text for e in entries], "seeds": seed_list,
                        **keyed}, length=12)
    root = report_dir(store, rid)
    labels = [e.label(job.selection.mix) for e in entries]
    say(f"compare {rid}: {len(job.tasks)} task(s) x {len(entries)} method(s) ({', '.join(labels)}) x "
         f"{seeds} seed(s); store {store}", progress)
    if job.training.lr is not None:
        say(f"compare: training.lr {job.training.lr:g} is not used; each method starts from method.lr (pinned) "
             f"or its own default{', tuned on validation' if settings['tune'] else ''}", progress)
    job = job.model_copy(update={"training": job.training.model_copy(update={"lr": None})})

    resolved = resolve_targets(job, model, progress)
    if resolved.errors:  # a comparison needs every task: name the first that cannot be read
        name, err = next(iter(resolved.errors.items()))
        raise JobSpecError(f"tasks: {name}: {err}")
    targets = resolved.specs
    ctx = StageContext(job=job, store=store, job_id=rid, backbone_fp=backbone_fingerprint(model), force=force,
                       progress=progress, counters={"importance_computed": 0, "importance_loaded": 0})

    def importance_seed(seed: int) -> int:
        return job.training.seed if settings["fixed_importance"] else seed

    wanted = {e.method for e in entries}
    imaps = run_importance_stage(ctx, targets, resolved.pool_extra, {t.name: wanted for t in targets},
                                 seeds=sorted({importance_seed(s) for s in seed_list}))
    runs = CompareRuns(ctx, imaps, job, root, importance_seed, settings["equal_budget"], progress)
    with runs.pool():
        chosen, tuning = tune_learning_rates(runs, targets, entries, seed_list[0], settings["tune"], force,
                                             settings["tune_extensions"])
        rows = runs.final(targets, entries, seed_list, chosen, tuning, force)
    task_names = [task_name(e) for e in job.tasks]
    report_uri, plots = write_report(root, rows, job=job, task_order=task_names, labels=labels,
                                     agnostic=imaps.agnostic, seconds=time.perf_counter() - t_all, tuning=tuning,
                                     settings=settings)
    if progress:
        from orchestrator.reporting.tables import print_compare_table

        print_compare_table(rows, task_names, labels, job.selection.mix)
        say(f"compare {rid}: report {report_uri}", progress)
    return CompareResult(report_id=rid, store=store, rows=rows, report_uri=report_uri,
                         results_uri=layout.compare_results(root), plots=plots)
