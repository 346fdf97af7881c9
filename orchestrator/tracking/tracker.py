"""Experiment tracking from the driver: a job's tasks and sweep trials as MLflow, TensorBoard and W&B runs.

Everything is logged by the driver, never by workers: per-epoch metrics arrive through the progress
board (``ProgressPrinter`` hands each event to ``Tracker.on_event``), results and artifacts when a task
or trial ends. So a ``file:`` MLflow store or a TensorBoard folder on the driver's disk works on a
multi-node cluster whose workers cannot see that path, and a tracking server only needs to be
reachable from the driver.

Runs: MLflow has one parent run per job, a nested run per task and, under a task's run, one per sweep
trial (tags ``shpeft.job_id``, ``shpeft.task``, ``shpeft.trial``). TensorBoard gets one event folder per
task (``<dir>/<job_id>/<task>``) and trial (``.../<task>/trial-<id>``). W&B gets one run per task and
trial, grouped by job id. Reruns of a job log under its one MLflow parent run, a rerun after a killed
driver continues the runs of tasks that were training, and no run logs an epoch twice (a resumed task
re-reports epochs its killed attempt already logged).

A tracking failure (server down, disk full) prints one warning and turns that backend off for the rest
of the job; it never fails the job. Nothing here is imported before a job runs, so the CLI starts
without mlflow.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from shpeft_core.io import join_uri, local_path

from orchestrator.store import layout

__all__ = ["Tracker", "make_tracker", "resolve_mlflow_uri", "tensorboard_root", "check_tracking"]

log = logging.getLogger("shpeft.tracking")

# Per-epoch values that are not metrics of the epoch (the epoch itself, a constant, a duplicate).
_NOT_LOGGED = {"epoch", "trainable", "val_metric"}
_FINAL_METRICS = ("accuracy", "macro_f1", "auc", "loss")

Key = tuple  # ("job",), ("task", name) or ("trial", name, trial_id)


def _local(uri: str) -> str | None:
    """The local path of a store or folder URI, None for a remote one (without needing its fsspec backend)."""
    if "://" in uri and not uri.startswith(("file://", "local://")):
        return None
    return local_path(uri)


def resolve_mlflow_uri(uri: str | None, store: str) -> str:
    """The tracking URI with local paths made absolute (against the working directory, as the store is).

    None means $MLFLOW_TRACKING_URI, else ``file:<store>/mlruns`` (a local store only).
    """
    if uri is None:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            root = _local(store)
            if root is None:
                raise ValueError(f"the store {store} is not a local folder; set tracking.mlflow.uri")
            return "file:" + os.path.join(root, "mlruns")
    if ":" not in uri or (len(uri) > 1 and uri[1] == ":"):  # a bare path (or a Windows drive)
        return "file:" + os.path.abspath(os.path.expanduser(uri))
    scheme, rest = uri.split(":", 1)
    if scheme == "file":
        path = rest[2:] if rest.startswith("//") else rest
        return "file:" + os.path.abspath(os.path.expanduser(path or "."))
    if scheme == "sqlite" and rest.startswith("///") and not rest.startswith("////"):
        return "sqlite:///" + os.path.abspath(os.path.expanduser(rest[3:]))
    return uri


def _mlflow_local_dir(uri: str) -> str | None:
    """The local folder a file: or sqlite: tracking URI writes to (None for servers)."""
    if uri.startswith("file:"):
        return uri[len("file:"):]
    if uri.startswith("sqlite:///"):
        return os.path.dirname(uri[len("sqlite:///"):]) or "."
    return None


def tensorboard_root(directory: str | None, store: str, job_id: str) -> str:
    """The job's TensorBoard folder: ``<dir>/<job_id>`` (dir relative to the working directory) or
    ``<store>/tensorboard/<job_id>``; a local folder (event files are written by the driver)."""
    if directory is None:
        root = _local(store)
        if root is None:
            raise ValueError(f"the store {store} is not a local folder; set tracking.tensorboard.dir")
        return os.path.join(root, "tensorboard", job_id)
    if "://" in directory and _local(directory) is None:
        raise ValueError(f"{directory} is not a local folder")
    return os.path.join(os.path.abspath(os.path.expanduser(_local(directory) or directory)), job_id)


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

    from orchestrator.job.spec import job_id
    from orchestrator.store.layout import normalise_store

    tr, problems = job.tracking, []
    store = normalise_store(job.store)
    folders: list[tuple[str, str]] = []
    if tr.mlflow is not None:
        if not _installed("mlflow"):
            problems.append("tracking.mlflow: mlflow is not installed (pip install 'shpeft[tracking]')")
        try:
            uri = resolve_mlflow_uri(tr.mlflow.uri, store)
            if _mlflow_local_dir(uri):
                folders.append(("tracking.mlflow.uri", _mlflow_local_dir(uri)))
        except ValueError as exc:
            problems.append(f"tracking.mlflow.uri: {exc}")
    if tr.tensorboard is not None:
        if not _installed("tensorboardX"):
            problems.append("tracking.tensorboard: tensorboardX is not installed (pip install 'shpeft[tracking]')")
        try:
            folders.append(("tracking.tensorboard.dir", tensorboard_root(tr.tensorboard.dir, store, job_id(job))))
        except ValueError as exc:
            problems.append(f"tracking.tensorboard.dir: {exc}")
    if tr.wandb is not None and not _installed("wandb"):
        problems.append("tracking.wandb: wandb is not installed")
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

    path = _local(uri)
    if path is not None:
        yield path
        return
    from shpeft_core.methods import artifact_files

    name = uri.rstrip("/").rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory(prefix="shpeft-track-") as d:
        target = os.path.join(d, name)
        if name.endswith(".lora"):
            os.makedirs(target)
            for f in artifact_files(uri):
                with open(os.path.join(target, f.rsplit("/", 1)[-1]), "wb") as out:
                    out.write(read_bytes(f))
        else:
            with open(target, "wb") as out:
                out.write(read_bytes(uri))
        yield target


def _run_name(key: Key) -> str:
    return "job" if key[0] == "job" else key[1] if key[0] == "task" else f"{key[1]}-trial-{key[2]}"


# --------------------------------------------------------------------------------------------- backends
# Each backend: start_run(key, parent, tags) / logged_steps(key) / log_params / log_metrics(key, metrics,
# step) / log_artifact(key, path, folder) / log_text(key, name, text) / end_run(key, ok), and optionally
# close_stale(job_id). Any may raise; the Tracker turns a failing backend off.


class _Mlflow:
    name = "mlflow"

    def __init__(self, section, store: str):
        self.uri = resolve_mlflow_uri(section.uri, store)
        if self.uri.startswith("file:"):
            # MLflow 3 refuses the file store unless opted in; a local folder is what works offline.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # A tracking server that is down should cost seconds, not MLflow's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.uri)
        self.experiment_name = section.experiment
        self.experiment_id: str | None = None
        self.ids: dict[Key, str] = {}

    def _experiment(self) -> str:
        if self.experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is not None:
                self.experiment_id = exp.experiment_id
            else:
                # A sqlite store would put artifacts in ./mlruns of whatever the working directory is.
                art = None
                if self.uri.startswith("sqlite:///"):
                    art = "file:" + os.path.join(_mlflow_local_dir(self.uri), "mlartifacts")
                self.experiment_id = self.client.create_experiment(self.experiment_name, artifact_location=art)
        return self.experiment_id

    def _find(self, key: Key, tags: dict[str, str], parent: str | None) -> str | None:
        """An earlier run to continue: the job's run always (one parent run per job, reruns included);
        a task's run only if its driver was killed while it trained (a failed task's rerun starts afresh)."""
        if key[0] == "trial":
            return None  # Tune gives a rerun's trials new ids
        conds = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        if parent:
            conds.append(f"tags.`mlflow.parentRunId` = '{parent}'")
        runs = self.client.search_runs([self._experiment()], " and ".join(conds), max_results=1,
                                       order_by=["attributes.start_time DESC"])
        if not runs or (key[0] != "job" and runs[0].info.status != "RUNNING"):
            return None
        return runs[0].info.run_id

    def start_run(self, key: Key, parent: Key | None, tags: dict[str, str]) -> None:
        parent_id = self.ids.get(parent) if parent else None
        run_id = self._find(key, tags, parent_id)
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
        else:
            all_tags = {**tags, **({"mlflow.parentRunId": parent_id} if parent_id else {})}
            run_id = self.client.create_run(self._experiment(), run_name=_run_name(key), tags=all_tags).info.run_id
        self.ids[key] = run_id

    def logged_steps(self, key: Key) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.ids[key], "train_loss")}

    def log_params(self, key: Key, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        have = self.client.get_run(self.ids[key]).data.params
        new = [Param(k, str(v)) for k, v in params.items() if k not in have]
        if new:
            self.client.log_batch(self.ids[key], params=new)

    def log_metrics(self, key: Key, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.ids[key], metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def log_artifact(self, key: Key, path: str, folder: str) -> None:
        if os.path.isdir(path):
            self.client.log_artifacts(self.ids[key], path, f"{folder}/{os.path.basename(path)}")
        else:
            self.client.log_artifact(self.ids[key], path, folder)

    def log_text(self, key: Key, name: str, text: str) -> None:
        self.client.log_text(self.ids[key], text, name)

    def end_run(self, key: Key, ok: bool) -> None:
        self.client.set_terminated(self.ids[key], "FINISHED" if ok else "FAILED")

    def close_stale(self, job_id: str) -> None:
        """Mark KILLED the job's runs a killed earlier driver left RUNNING and this one did not continue."""
        mine = set(self.ids.values())
        where = f"tags.`shpeft.job_id` = '{job_id}' and attributes.status = 'RUNNING'"
        for run in self.client.search_runs([self._experiment()], where, max_results=1000):
            if run.info.run_id not in mine:
                self.client.set_terminated(run.info.run_id, "KILLED")


class _Tensorboard:
    name = "tensorboard"

    def __init__(self, section, store: str, job_id: str):
        from tensorboardX import SummaryWriter

        self.root = tensorboard_root(section.dir, store, job_id)
        self._writer_cls = SummaryWriter
        self.writers: dict[Key, Any] = {}
        self.params: dict[Key, dict[str, Any]] = {}

    def _folder(self, key: Key) -> str:
        if key[0] == "job":
            return os.path.join(self.root, "_job")
        if key[0] == "task":
            return os.path.join(self.root, key[1])
        return os.path.join(self.root, key[1], f"trial-{key[2]}")

    def start_run(self, key: Key, parent: Key | None, tags: dict[str, str]) -> None:
        self.writers[key] = self._writer_cls(logdir=self._folder(key), flush_secs=10)

    def logged_steps(self, key: Key) -> set[int]:
        return set()

    def log_params(self, key: Key, params: dict[str, Any]) -> None:
        self.params.setdefault(key, {}).update(params)  # written once, as a table, when the run ends

    def log_metrics(self, key: Key, metrics: dict[str, float], step: int) -> None:
        w = self.writers[key]
        for k, v in metrics.items():
            w.add_scalar(k, float(v), step)

    def log_artifact(self, key: Key, path: str, folder: str) -> None:
        if path.endswith(".png"):
            import numpy as np
            from PIL import Image

            with Image.open(path) as im:
                self.writers[key].add_image(os.path.basename(path)[:-4], np.asarray(im.convert("RGB")), 0,
                                            dataformats="HWC")
        elif path.endswith(".md"):
            with open(path, encoding="utf-8") as f:
                self.writers[key].add_text(os.path.basename(path), f.read(), 0)
        # Model artifacts stay in the store (and MLflow/W&B); TensorBoard is for curves.

    def log_text(self, key: Key, name: str, text: str) -> None:
        self.writers[key].add_text(name, text, 0)

    def end_run(self, key: Key, ok: bool) -> None:
        params = self.params.pop(key, {})
        if params:
            rows = "".join(f"| {k} | {v} |\n" for k, v in sorted(params.items()))
            self.writers[key].add_text("params", "| param | value |\n|---|---|\n" + rows, 0)
        self.writers.pop(key).close()


class _Wandb:
    name = "wandb"

    def __init__(self, section, job_id: str):
        import wandb

        self._wandb = wandb
        self.section, self.job_id = section, job_id
        self.runs: dict[Key, Any] = {}

    def start_run(self, key: Key, parent: Key | None, tags: dict[str, str]) -> None:
        s = self.section
        # Tasks train concurrently: each gets its own run object in this process ("create_new").
        self.runs[key] = self._wandb.init(project=s.project, entity=s.entity, mode=s.mode, group=self.job_id,
                                          job_type=key[0], name=f"{self.job_id}-{_run_name(key)}", config=tags,
                                          reinit="create_new")

    def logged_steps(self, key: Key) -> set[int]:
        return set()

    def log_params(self, key: Key, params: dict[str, Any]) -> None:
        self.runs[key].config.update(params, allow_val_change=True)

    def log_metrics(self, key: Key, metrics: dict[str, float], step: int) -> None:
        self.runs[key].log({**metrics, "epoch": step})

    def log_artifact(self, key: Key, path: str, folder: str) -> None:
        name = f"{self.job_id}-{_run_name(key)}-{folder}".replace("/", "-")
        art = self._wandb.Artifact(name, type="model" if folder == "artifact" else folder)
        (art.add_dir if os.path.isdir(path) else art.add_file)(path)
        self.runs[key].log_artifact(art)

    def log_text(self, key: Key, name: str, text: str) -> None:
        self.runs[key].summary[name] = text

    def end_run(self, key: Key, ok: bool) -> None:
        self.runs.pop(key).finish(exit_code=0 if ok else 1)


# ---------------------------------------------------------------------------------------------- tracker


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
        self._each(lambda b: getattr(b, "close_stale", lambda _: None)(self.job_id))
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
    makers = []
    if tr.mlflow is not None:
        makers.append(("mlflow", lambda: _Mlflow(tr.mlflow, store)))
    if tr.tensorboard is not None:
        makers.append(("tensorboard", lambda: _Tensorboard(tr.tensorboard, store, job_id)))
    if tr.wandb is not None:
        makers.append(("wandb", lambda: _Wandb(tr.wandb, job_id)))
    for name, make in makers:
        try:
            tracker.backends.append(make())
        except Exception as exc:
            from orchestrator.runtime.console import short_error

            tracker._warn(f"warning: tracking to {name} is off for this job: {short_error(exc)}")
    if tracker.backends:
        from orchestrator.runtime.console import say

        say("tracking to " + ", ".join(b.name + (f" {b.uri}" if b.name == "mlflow" else f" {b.root}"
                                                  if b.name == "tensorboard" else "") for b in tracker.backends),
            progress)
    return tracker
