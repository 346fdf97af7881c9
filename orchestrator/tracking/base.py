"""What the Tracker asks of a tracking backend (MLflow, TensorBoard, W&B, or one added later).

A run is named by its key: ``("job",)``, ``("task", name)`` or ``("trial", name, trial_id)``; a task's
parent run is the job's, a trial's is its task's. Per run the Tracker calls ``start_run`` once and
``logged_steps`` right after it, then ``log_params``, ``log_metrics``, ``log_artifact`` and ``log_text``
in any order, and ``end_run`` once; when the job ends, ``close_stale`` once. Calls come from one thread
at a time (the Tracker holds its lock).

Invariants: any hook may raise; the Tracker then reports the failure once and turns that backend off for
the rest of the job, so a backend never needs to protect the job from itself. A backend imports its
optional package (``package``) in ``__init__`` only: nothing imports mlflow, tensorboardX or wandb before
a job with that section runs, and ``shpeft validate`` only checks that the package is installed.
"""

from __future__ import annotations

import abc
from typing import Any

__all__ = ["Key", "TrackingBackend", "run_name"]

Key = tuple  # ("job",), ("task", name) or ("trial", name, trial_id)


def run_name(key: Key) -> str:
    """A run's display name: ``job``, the task's name, or ``<task>-trial-<id>``."""
    return "job" if key[0] == "job" else key[1] if key[0] == "task" else f"{key[1]}-trial-{key[2]}"


class TrackingBackend(abc.ABC):
    """One backend's runs of one job. Subclasses are built as ``cls(section, store=..., job_id=...)``."""

    name: str = ""  # its section under ``tracking:`` in the job file
    package: str = ""  # the optional package it imports (checked by `shpeft validate`)
    install_hint: str = ""  # appended to "<package> is not installed"
    folder_field: str | None = None  # the job file field naming the local folder it writes, if any

    @abc.abstractmethod
    def __init__(self, section, *, store: str, job_id: str) -> None:
        """Connect or open what the job's runs need; may raise (the backend is then off for this job)."""

    @classmethod
    def local_folder(cls, section, *, store: str, job_id: str) -> str | None:
        """The local folder the section makes this backend write (checked for writes by `shpeft validate`);
        None when it writes none here (a server). Raises ValueError when the location cannot be used."""
        return None

    @property
    def destination(self) -> str:
        """Where the runs go, for the console's ``tracking to ...`` line ("" when there is nothing to show)."""
        return ""

    @abc.abstractmethod
    def start_run(self, key: Key, parent: Key | None, tags: dict[str, str]) -> None:
        """Open the run of ``key`` under ``parent``'s (or continue an earlier one the backend can find)."""

    def logged_steps(self, key: Key) -> set[int]:
        """The epochs the run already holds (an earlier driver's); they are not logged again."""
        return set()

    @abc.abstractmethod
    def log_params(self, key: Key, params: dict[str, Any]) -> None:
        """Parameters of the run; called more than once with new keys (a sweep's searched values)."""

    @abc.abstractmethod
    def log_metrics(self, key: Key, metrics: dict[str, float], step: int) -> None:
        """Metric values at ``step`` (the epoch)."""

    @abc.abstractmethod
    def log_artifact(self, key: Key, path: str, folder: str) -> None:
        """A local file or folder (a lora folder) under ``folder`` of the run; a backend may skip kinds it
        does not keep."""

    @abc.abstractmethod
    def log_text(self, key: Key, name: str, text: str) -> None:
        """A text attached to the run as ``name`` (the job file, a failed task's error)."""

    @abc.abstractmethod
    def end_run(self, key: Key, ok: bool) -> None:
        """Close the run, finished or failed."""

    def close_stale(self, job_id: str) -> None:
        """Close what an earlier, killed driver of the job left open and this one did not continue."""
