"""Choosing each method's learning rate on validation inside `shpeft compare`.

Invariants:
- Only validation scores choose: a tuning run is evaluated on the validation split alone
  (``evaluate_artifact(on=("val",))``), so nothing about it is measured on test.
- Where a run's learning rate comes from (``lr_source`` in results.parquet): ``job`` when the job's
  ``method.lr`` pins it for that method (never searched), ``tuned`` when the grid below chose it, and
  ``default`` when tuning is off and the method's own ``default_lr`` is used. The job-level
  ``training.lr`` is never used by a comparison: it would give every method one rate.
- The grid: the method's default rate times ``factor ** k`` for ``points`` values of k centred on 0
  (3 points x factor 3 by default: 10x from end to end); where the best value is at an end of what was
  tried, one more value a step beyond it is tried, at most ``TUNE_EXTENSIONS`` times (twice; each is a
  round that waits for the one before, ``compare_runs.tune_learning_rates``).
  Every method starts with the same number of tries, on the first seed (its importance batches and warm
  head included), for the same epochs as the final runs; the task's own model-selection metric on
  validation decides, and a tie goes to the value nearest the default on the log scale. A grid is
  reproducible, costs every method the same and sends its runs out at once; a seeded TPE search of three
  to five tries would have nothing to learn a model of the objective from.
- The tuning run at the chosen rate has the config hash of the first seed's final run, so that run
  reuses its artifact and is then evaluated on validation and test; the other seeds train anew.
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa

from orchestrator.store.results import read_table_rows, write_table_rows

__all__ = ["TUNE_EXTENSIONS", "TUNING_COLUMNS", "starting_lr", "lr_grid", "choose_lr", "read_tuning", "write_tuning"]

# Steps beyond an end of the grid that won, at most, per (task, method).
TUNE_EXTENSIONS = 2

TUNING_COLUMNS = [
    ("task", pa.string()), ("variant", pa.string()), ("method", pa.string()), ("mix", pa.string()),
    ("seed", pa.int64()), ("lr", pa.float64()), ("metric", pa.string()), ("val_score", pa.float64()),
    ("artifact_uri", pa.string()), ("artifact_kind", pa.string()), ("sha256", pa.string()),
    ("config_hash", pa.string()), ("trainable", pa.int64()), ("train_s", pa.float64()), ("status", pa.string()), ("error", pa.string()),
]
TUNING_SCHEMA = pa.schema([pa.field(n, t) for n, t in TUNING_COLUMNS])


def starting_lr(job, method: str) -> tuple[float, str]:
    """(learning rate, source) a comparison starts ``method`` from: the job's ``method.lr`` pins it
    ("job"), else the method's own default ("default"; "tuned" once the grid chose)."""
    from shpeft_core.methods import get_method

    if method in job.method.lr:
        return float(job.method.lr[method]), "job"
    return float(get_method(method).default_lr), "default"


def lr_grid(start: float, points: int = 3, factor: float = 3.0) -> list[float]:
    """``points`` learning rates on a log grid centred on ``start`` (3 significant digits)."""
    if points < 1 or factor <= 1:
        raise ValueError(f"lr grid: points must be >= 1 and factor > 1, got {points} and {factor}")
    half = (points - 1) // 2
    return [float(f"{start * factor ** k:.3g}") for k in range(-half, points - half)]


def choose_lr(scores: dict[float, float | None], start: float) -> float | None:
    """The rate with the best validation score (ties: nearest ``start`` on the log scale); None when no
    try finished."""
    ok = {lr: s for lr, s in scores.items() if s is not None and not math.isnan(s)}
    if not ok:
        return None
    best = max(ok.values())
    return min((lr for lr, s in ok.items() if s == best), key=lambda lr: (abs(math.log(lr / start)), lr))


def read_tuning(uri: str) -> list[dict[str, Any]]:
    return read_table_rows(uri)


def write_tuning(uri: str, rows: list[dict[str, Any]]) -> None:
    write_table_rows(uri, rows, TUNING_SCHEMA)
