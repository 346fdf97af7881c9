"""The Weights & Biases backend: one run per task and sweep trial (and the job), grouped by job id.

Invariants: runs are named ``<job_id>-<run name>`` with the run's tags as their first config; tasks train
concurrently, so each run is its own run object in the driver (``reinit="create_new"``); artifacts are
W&B artifacts of type ``model`` (or the folder they go under). wandb is imported when the backend is
built, never before.
"""

from __future__ import annotations

import os
from typing import Any

from orchestrator.tracking.base import Key, TrackingBackend, run_name

__all__ = ["WandbBackend", "BACKEND"]


class WandbBackend(TrackingBackend):
    """One W&B run per task and trial (and the job), grouped by the job id."""

    name = "wandb"
    package = "wandb"

    def __init__(self, section, *, store: str, job_id: str):
        import wandb

        self._wandb = wandb
        self.section, self.job_id = section, job_id
        self.runs: dict[Key, Any] = {}

    def start_run(self, key: Key, parent: Key | None, tags: dict[str, str]) -> None:
        s = self.section
        # Tasks train concurrently: each gets its own run object in this process ("create_new").
        self.runs[key] = self._wandb.init(project=s.project, entity=s.entity, mode=s.mode, group=self.job_id,
                                          job_type=key[0], name=f"{self.job_id}-{run_name(key)}", config=tags,
                                          reinit="create_new")

    def logged_steps(self, key: Key) -> set[int]:
        return set()

    def log_params(self, key: Key, params: dict[str, Any]) -> None:
        self.runs[key].config.update(params, allow_val_change=True)

    def log_metrics(self, key: Key, metrics: dict[str, float], step: int) -> None:
        self.runs[key].log({**metrics, "epoch": step})

    def log_artifact(self, key: Key, path: str, folder: str) -> None:
        name = f"{self.job_id}-{run_name(key)}-{folder}".replace("/", "-")
        art = self._wandb.Artifact(name, type="model" if folder == "artifact" else folder)
        (art.add_dir if os.path.isdir(path) else art.add_file)(path)
        self.runs[key].log_artifact(art)

    def log_text(self, key: Key, name: str, text: str) -> None:
        self.runs[key].summary[name] = text

    def end_run(self, key: Key, ok: bool) -> None:
        self.runs.pop(key).finish(exit_code=0 if ok else 1)


BACKEND = WandbBackend
