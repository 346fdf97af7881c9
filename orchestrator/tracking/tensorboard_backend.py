"""The TensorBoard backend: event files written by the driver, one folder per task and sweep trial.

Invariants: the job's folder is ``<dir>/<job_id>`` or ``<store>/tensorboard/<job_id>`` on the driver's
disk; a task logs to ``<task>/``, a trial to ``<task>/trial-<id>/``, the job itself to ``_job/``.
Params are written once, as a Markdown table, when a run ends; PNGs and Markdown become images and
text, model artifacts are not copied (they stay in the store). tensorboardX is imported when the backend
is built, never before.
"""

from __future__ import annotations

import os
from typing import Any

from orchestrator.tracking.base import Key, TrackingBackend
from orchestrator.tracking.uris import tensorboard_root

__all__ = ["TensorboardBackend", "BACKEND"]


class TensorboardBackend(TrackingBackend):
    """One event folder per task and trial under the job's folder; params as a table when a run ends."""

    name = "tensorboard"
    package = "tensorboardX"
    install_hint = " (pip install 'shpeft[tracking]')"
    folder_field = "tracking.tensorboard.dir"

    def __init__(self, section, *, store: str, job_id: str):
        from tensorboardX import SummaryWriter

        self.root = tensorboard_root(section.dir, store, job_id)
        self._writer_cls = SummaryWriter
        self.writers: dict[Key, Any] = {}
        self.params: dict[Key, dict[str, Any]] = {}

    @classmethod
    def local_folder(cls, section, *, store: str, job_id: str) -> str | None:
        return tensorboard_root(section.dir, store, job_id)

    @property
    def destination(self) -> str:
        return self.root

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


BACKEND = TensorboardBackend
