"""Experiment tracking from the driver: a job's tasks and sweep trials as runs in every configured backend.

Everything is logged by the driver, never by workers: per-epoch metrics arrive through the progress
board (``ProgressPrinter`` hands each event to ``Tracker.on_event``), results and artifacts when a task
or trial ends. So a ``file:`` MLflow store or a TensorBoard folder on the driver's disk works on a
multi-node cluster whose workers cannot see that path, and a tracking server only needs to be
reachable from the driver.

Runs: one per job, task and sweep trial, nested job -> task -> trial where the backend nests (see each
backend module). Reruns of a job log under its one job run, a rerun after a killed driver continues the
runs of tasks that were training, and no run logs an epoch twice (a resumed task re-reports epochs its
killed attempt already logged).

Backends: ``_REGISTRY`` maps each ``tracking:`` section to its module under ``orchestrator.tracking``,
which defines a :class:`~orchestrator.tracking.base.TrackingBackend` subclass as ``BACKEND``; a module
(and its optional package) is imported only when a job has that section. Adding a backend: write
``orchestrator/tracking/<name>_backend.py``, add its line below and its section to the job file schema.

A tracking failure (server down, disk full) prints one warning and turns that backend off for the rest
of the job; it never fails the job. Nothing here is imported before a job runs, so the CLI starts
without mlflow.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import tempfile
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from shpeft_core.io import join_uri
from shpeft_core.options import SUMMARY_METRICS

from orchestrator.store import layout
from orchestrator.tracking.base import Key, TrackingBackend
from orchestrator.tracking.uris import local_or_none

__all__ = ["Tracker", "make_tracker", "check_tracking", "backend_class", "BACKENDS"]

log = logging.getLogger("shpeft.tracking")

# section under `tracking:` -> module under orchestrator.tracking that defines BACKEND (order: validation
# messages and the console's "tracking to ..." line)
_REGISTRY = {
    "mlflow": "mlflow_backend",
    "tensorboard": "tensorboard_backend",
    "wandb": "wandb_backend",
}
BACKENDS: tuple[str, ...] = tuple(_REGISTRY)

# Per-epoch values that are not metrics of the epoch (the epoch itself, a constant, a duplicate).
_NOT_LOGGED = {"epoch", "trainable", "val_metric"}
_FINAL_METRICS = SUMMARY_METRICS


def backend_class(name: str) -> type[TrackingBackend]:
    """The backend registered for the ``tracking.<name>`` section (its module imported now)."""
    if name not in _REGISTRY:
        raise KeyError(f"tracking.{name} is not a tracking backend; backends: {', '.join(BACKENDS)}")
    cls = importlib.import_module(f"orchestrator.tracking.{_REGISTRY[name]}").BACKEND
    if cls.name != name:  # pragma: no cover - a registry typo
        raise RuntimeError(f"orchestrator.tracking.{_REGISTRY[name]} defines backend {cls.name!r}, registered as {name!r}")
    return cls


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def check_tracking(job, data: bool = True) -> list[str]:
    """Problems of the job's tracking section, each naming its field (for `shpeft validate`).

    Checks the backends are installed and, with ``data``, that local tracking folders can be written
    (without writing: validate writes nothing). Nothing is contacted: a tracking server that is down only
    costs a warning at run time.
    """
    from shpeft_core.io import StorageError, check_store_usable

    from orchestrator.job.keys import job_id
    from orchestrator.store.layout import normalise_store

    tr, problems = job.tracking, []
    store = normalise_store(job.store)
    folders: list[tuple[str, str]] = []
    for name in BACKENDS:
        section = getattr(tr, name)
        if section is None:
            continue
        cls = backend_class(name)
        if not _installed(cls.package):
            problems.append(f"tracking.{name}: {cls.package} is not installed{cls.install_hint}")
        try:
            folder = cls.local_folder(section, store=store, job_id=job_id(job))
        except ValueError as exc:
            problems.append(f"{cls.folder_field}: {exc}")
            continue
        if folder:
            folders.append((cls.folder_field, folder))
    if data:
        for field, folder in folders:
            try:
                check_store_usable(folder)
            except StorageError as exc:
                problems.append(f"{field}: {exc}".replace("store ", "folder ", 1))
    return problems


@contextmanager
def _local_copy(uri: str) -> Iterator[str]:
    """A local path of an artifact file or lora folder (downloaded to a temporary folder when remote)."""
    from shpeft_core.io import read_bytes

    path = local_or_none(uri)
    if path is not None:
        yield path
        return
    from shpeft_core.artifacts import KINDS, artifact_files, kind_of

    name = uri.rstrip("/").rsplit("/", 1)[-1]
    kind = kind_of(uri)
    with tempfile.TemporaryDirectory(prefix="shpeft-track-") as d:
        target = os.path.join(d, name)
        if kind is not None and KINDS[kind].is_folder:
            os.makedirs(target)
            for f in artifact_files(uri, kind):
                with open(os.path.join(target, f.rsplit("/", 1)[-1]), "wb") as out:
                    out.write(read_bytes(f))
        else:
            with open(target, "wb") as out:
                out.write(read_bytes(uri))
        yield target


def _guarded(method):
    """A Tracker method that cannot fail the job: an unexpected error is reported once and ends tracking."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            with self._lock:
                return method(self, *args, **kwargs)
        except Exception as exc:
            from orchestrator.runtime.console import short_error

            if self.backends:
                self.backends = []
                self._warn(f"warning: tracking stopped ({short_error(exc)}); the job goes on without it")
            log.debug("tracking failed", exc_info=exc)
    return wrapper


class Tracker:
    """A job's runs in every configured backend; thread-safe (progress events arrive on another thread).

    No method raises: a failing backend is reported once and dropped. With no backends it does nothing.
    """

    def __init__(self, backends: list, *, job_id: str = "", store: str = "", artifacts: str = "all",
                 sweep: bool = False, warn=None):
        self.backends = list(backends)
        self.job_id, self.store, self.artifacts, self.sweep = job_id, store, artifacts, sweep
        self._warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._lock = threading.RLock()
        self._open: dict[Key, dict] = {}  # key -> {"seen": steps, "close": (ok, expected epochs) once ended}
        self._closed: set[Key] = set()
        self._steps: dict[tuple[str, Key], set[int]] = {}  # steps each backend already holds, per run
        self._task_params: dict[str, dict] = {}
        self._history: dict[Key, dict[int, dict]] = {}  # per-epoch metrics of trials (copied to the task)
        self._trial_epochs: dict[Key, int] = {}
        self._best: dict[str, Key] = {}  # a swept task's best trial, whose curve is the task's

    @property
    def enabled(self) -> bool:
        return bool(self.backends)

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks (ours holds the Tracker) with the experiment's state; open writers and
        # clients are the driver's live state, so a copy is a Tracker that logs nothing.
        return {"job_id": self.job_id, "store": self.store, "artifacts": self.artifacts, "sweep": self.sweep}

    def __setstate__(self, state: dict) -> None:
        self.__init__([], **state)

    # -- failure handling
    def _each(self, fn, *args) -> None:
        for b in list(self.backends):
            try:
                fn(b, *args)
            except Exception as exc:  # a tracking problem must never fail the job
                self._drop(b, exc)

    def _drop(self, backend, exc: BaseException) -> None:
        from orchestrator.runtime.console import short_error

        if backend in self.backends:
            self.backends.remove(backend)
            self._warn(f"warning: tracking to {backend.name} failed ({short_error(exc)}); "
                       f"the job goes on without {backend.name} tracking")
            log.debug("tracking backend %s failed", backend.name, exc_info=exc)

    # -- runs
    def _parent(self, key: Key) -> Key | None:
        return None if key[0] == "job" else ("job",) if key[0] == "task" else ("task", key[1])

    def _tags(self, key: Key) -> dict[str, str]:
        tags = {"shpeft.job_id": self.job_id, "shpeft.kind": key[0]}
        if key[0] != "job":
            tags["shpeft.task"] = key[1]
            tags["shpeft.config_hash"] = str(self._task_params.get(key[1], {}).get("config_hash", ""))
        if key[0] == "trial":
            tags["shpeft.trial"] = key[2]
        return tags

    def _ensure(self, key: Key) -> dict:
        if key in self._open:
            return self._open[key]
        parent = self._parent(key)
        if parent is not None:
            self._ensure(parent)
        tags = self._tags(key)
        run = {"seen": set(), "close": None}
        self._open[key] = run

        def start(b):
            b.start_run(key, parent, tags)
            steps = b.logged_steps(key)
            self._steps[(b.name, key)] = set(steps)
            run["seen"] |= steps
        self._each(start)
        if key[0] != "job":
            base = dict(self._task_params.get(key[1], {}))
            if key[0] == "trial" or self.sweep:
                for k in ("density", "alpha", "lr"):  # searched: known when the trial (or sweep) ends
                    base.pop(k, None)
            if key[0] == "trial":
                base["trial"] = key[2]
            self._each(lambda b: b.log_params(key, base))
        return run

    def _log_epoch(self, key: Key, step: int, metrics: dict[str, float]) -> None:
        if key in self._closed:
            return  # a late repeat of an epoch of a run that already has them all
        run = self._ensure(key)
        for b in list(self.backends):
            done = self._steps.setdefault((b.name, key), set())
            if step in done:
                continue  # a resumed attempt re-reports epochs its killed attempt logged
            try:
                b.log_metrics(key, metrics, step)
                done.add(step)
            except Exception as exc:
                self._drop(b, exc)
        run["seen"].add(step)
        self._maybe_close(key)

    def _maybe_close(self, key: Key) -> None:
        run = self._open.get(key)
        if not run or run["close"] is None:
            return
        ok, expected = run["close"]
        if expected is None or set(range(expected)) <= run["seen"]:
            self._close(key, ok)

    def _close(self, key: Key, ok: bool) -> None:
        if self._open.pop(key, None) is not None:
            self._closed.add(key)
            self._each(lambda b: b.end_run(key, ok))

    def _log_artifact(self, key: Key, uri: str, folder: str = "artifact") -> None:
        if not uri or not self.backends:
            return
        try:
            with _local_copy(uri) as path:
                self._each(lambda b: b.log_artifact(key, path, folder))
        except Exception as exc:  # the artifact cannot be read: nothing to upload, keep the run
            self._warn(f"warning: tracking could not read {uri}: {exc}")

    # -- the pipeline's calls
    @_guarded
    def start_job(self, job) -> None:
        """Open the job's parent run with job-level params and the validated job file."""
        import json

        if not self.backends:
            return
        self._ensure(("job",))
        params = {"job_id": self.job_id, "backbone": job.backbone.name, "tasks": len(job.tasks),
                  "sweep": job.sweep.enabled, "epochs": job.training.epochs, "seed": job.training.seed}
        self._each(lambda b: b.log_params(("job",), params))
        self._each(lambda b: b.log_text(("job",), "job.json",
                                        json.dumps(job.model_dump(mode="json"), indent=1, sort_keys=True)))

    @_guarded
    def planned(self, plan, config_hash: str) -> None:
        """Remember a task's params (its run opens at its first epoch or when it ends)."""
        self._task_params[plan.task_name] = {
            "task": plan.task_name, "method": plan.method, "density": plan.density, "alpha": plan.alpha,
            "mix": plan.mix, "lr": plan.train["lr"], "epochs": plan.train["epochs"], "seed": plan.seed,
            "backbone": plan.backbone["name"], "config_hash": config_hash, "job_id": self.job_id,
            "metric": plan.metric,
        }

    @_guarded
    def on_event(self, event: dict[str, Any]) -> None:
        """A progress event (ProgressPrinter listener): per-epoch metrics with step = epoch."""
        if event.get("kind") != "epoch" or not self.backends:
            return
        metrics = {k: float(v) for k, v in (event.get("metrics") or {}).items()
                   if k not in _NOT_LOGGED and isinstance(v, (int, float)) and v == v}
        task, trial, step = event.get("task"), event.get("trial"), int(event["epoch"])
        key = ("trial", task, str(trial)) if trial else ("task", task)
        if trial:
            self._history.setdefault(key, {})[step] = metrics
        self._log_epoch(key, step, metrics)
        if trial and self._best.get(task) == key:  # arrived after the task's row
            self._log_epoch(("task", task), step, metrics)

    @_guarded
    def trial_finished(self, task: str, entry: dict[str, Any]) -> None:
        """A sweep trial ended (a ledger entry): its searched params, last val metric and artifact."""
        if not self.backends:
            return
        key = ("trial", task, str(entry["trial_id"]))
        run = self._ensure(key)
        params = {k: entry[k] for k in ("density", "alpha", "lr") if entry.get(k) is not None}
        self._each(lambda b: b.log_params(key, params))
        if entry.get("val_metric") is not None:
            self._each(lambda b: b.log_metrics(key, {"final_val_metric": float(entry["val_metric"])},
                                               int(entry.get("epochs") or 0)))
        ok = entry.get("error") is None
        if entry.get("epochs"):
            self._trial_epochs[key] = int(entry["epochs"])
        if ok and self.artifacts == "all":
            self._log_artifact(key, entry.get("delta_uri"))
        run["close"] = (ok, int(entry["epochs"]) if ok and entry.get("epochs") else None)
        self._maybe_close(key)

    @_guarded
    def task_finished(self, row: dict[str, Any], params: dict[str, Any] | None = None) -> None:
        """A task's catalogue row: final params, val/test metrics of the saved artifact, the artifact.

        ``params`` adds what the row lacks (a sweep's best lr and trial)."""
        if not self.backends or row.get("trained") is False and row.get("status") == "ok":
            return  # a verified artifact reused from an earlier run was tracked by that run
        task = row["task"]
        key = ("task", task)
        if task not in self._task_params:  # failed before it was planned
            self._task_params[task] = {"task": task, "job_id": self.job_id}
        run = self._ensure(key)
        params = {**{k: row[k] for k in ("density", "alpha") if row.get(k) is not None}, **(params or {})}
        best = ("trial", task, str(params["best_trial"])) if params.get("best_trial") else None
        if best and self.sweep:
            # The task's curve is its best trial's: the artifact is that trial's last epoch.
            self._best[task] = best
            for step, m in sorted(self._history.get(best, {}).items()):
                self._log_epoch(key, step, m)
        self._each(lambda b: b.log_params(key, params))
        ok = row.get("status") == "ok"
        epochs = int(self._task_params[task].get("epochs") or 0)
        final = {f"final_{split}_{m}": row[f"{split}_{m}"] for split in ("val", "test") for m in _FINAL_METRICS
                 if row.get(f"{split}_{m}") is not None}
        final.update({k: row[k] for k in ("trainable", "sparse_values", "bytes", "train_s", "sweep_s")
                      if isinstance(row.get(k), (int, float))})
        if final:
            self._each(lambda b: b.log_metrics(key, final, epochs))
        if ok and self.artifacts != "none":
            self._log_artifact(key, row.get("delta_uri"))
        elif not ok and row.get("error"):
            self._each(lambda b: b.log_text(key, "error.txt", str(row["error"])))
        # Close once every epoch is logged (the last progress events can arrive after the row).
        expected = (self._trial_epochs.get(best) if best else None) if self.sweep else epochs or None
        expected = expected if ok else None
        run["close"] = (ok, expected)
        self._maybe_close(key)

    @_guarded
    def end_job(self, ok: bool, plots: list[str] | None = None) -> None:
        """Upload the job's plots (and report.md) to the parent run and close every run still open."""
        if not self.backends:
            return
        if self.artifacts != "none":
            for uri in _job_files(self.store, self.job_id, plots):
                self._log_artifact(("job",), uri, "plots")
        for key in [k for k in self._open if k[0] != "job"]:
            close = self._open[key]["close"]
            self._close(key, close[0] if close else False)
        self._each(lambda b: b.close_stale(self.job_id))
        self._close(("job",), ok)


def _job_files(store: str, job_id: str, plots: list[str] | None) -> list[str]:
    """The job's PNGs under <store>/plots/<job_id>/ and a report.md there, if any."""
    from fsspec.core import url_to_fs

    root = layout.plots_dir(store, job_id)
    found = list(plots or [])
    try:
        fs, path = url_to_fs(root)
        if fs.exists(path):
            names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
            found += [join_uri(root, n) for n in names if n.endswith(".png") or n == "report.md"]
    except OSError:
        pass
    return list(dict.fromkeys(found))


def make_tracker(job, job_id: str, store: str, progress: bool = True, warn=None) -> Tracker:
    """The job's Tracker from its tracking section (one with no backends when the section is off).

    A backend that cannot start (package missing, server down) is reported once and left out.
    ``warn(message)`` reports tracking problems (default: a line on stderr).
    """
    tr = job.tracking
    tracker = Tracker([], job_id=job_id, store=store, artifacts=tr.artifacts, sweep=job.sweep.enabled, warn=warn)
    for name in BACKENDS:
        section = getattr(tr, name)
        if section is None:
            continue
        try:
            tracker.backends.append(backend_class(name)(section, store=store, job_id=job_id))
        except Exception as exc:
            from orchestrator.runtime.console import short_error

            tracker._warn(f"warning: tracking to {name} is off for this job: {short_error(exc)}")
    if tracker.backends:
        from orchestrator.runtime.console import say

        say("tracking to " + ", ".join(b.name + (f" {b.destination}" if b.destination else "")
                                       for b in tracker.backends), progress)
    return tracker
