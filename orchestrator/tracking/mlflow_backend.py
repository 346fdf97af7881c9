"""The MLflow backend: one parent run per job, a nested run per task and, under it, one per sweep trial.

Invariants: runs are tagged ``shpeft.job_id``, ``shpeft.kind``, ``shpeft.task``, ``shpeft.trial``; every
rerun of a job logs under its one parent run; a task's run is continued only when a killed driver left it
``RUNNING`` (a failed task's rerun starts a new run), and ``close_stale`` ends what was left and not
continued as ``KILLED``. A ``file:`` store is allowed (MLflow 3 asks for an opt-in) and a tracking
server that is down costs seconds (one retry, a 10 s timeout) unless the environment says otherwise.
mlflow is imported when the backend is built, never before.
"""

from __future__ import annotations

import os
import time
from typing import Any

from orchestrator.tracking.base import Key, TrackingBackend, run_name
from orchestrator.tracking.uris import mlflow_local_dir, resolve_mlflow_uri

__all__ = ["MlflowBackend", "BACKEND"]


class MlflowBackend(TrackingBackend):
    """One parent run per job, a nested run per task and per trial, in the section's experiment."""

    name = "mlflow"
    package = "mlflow"
    install_hint = " (pip install 'shpeft[tracking]')"
    folder_field = "tracking.mlflow.uri"

    def __init__(self, section, *, store: str, job_id: str):
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
                    art = "file:" + os.path.join(mlflow_local_dir(self.uri), "mlartifacts")
                self.experiment_id = self.client.create_experiment(self.experiment_name, artifact_location=art)
        return self.experiment_id

    @classmethod
    def local_folder(cls, section, *, store: str, job_id: str) -> str | None:
        return mlflow_local_dir(resolve_mlflow_uri(section.uri, store))

    @property
    def destination(self) -> str:
        return self.uri

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
            run_id = self.client.create_run(self._experiment(), run_name=run_name(key), tags=all_tags).info.run_id
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


BACKEND = MlflowBackend
