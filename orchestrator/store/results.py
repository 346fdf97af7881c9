"""The results catalogue: one Parquet file per job under ``<store>/catalogue/<job_id>.parquet``.

One row per (job, task). The driver is the only writer of a job's file and rewrites it atomically
after every task, so a reader (or a killed driver's rerun) always sees a complete table.
"""

from __future__ import annotations

import io
import math
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from shpeft_core.options import SUMMARY_METRICS
from shpeft_core.io import atomic_write_bytes, join_uri, read_bytes

from orchestrator.store.layout import catalogue_dir, catalogue_file

__all__ = ["SCHEMA", "METRIC_NAMES", "catalogue_uri", "read_catalogue", "write_rows", "latest_rows"]

METRIC_NAMES = SUMMARY_METRICS  # kappa: ordinal tasks only

SCHEMA = pa.schema(
    [
        pa.field("job_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("config_hash", pa.string()),
        pa.field("status", pa.string()),  # ok | failed
        pa.field("trained", pa.bool_()),  # False when a verified delta was reused
        pa.field("metric", pa.string()),  # the task's model-selection metric name
        pa.field("method", pa.string()),  # shpeft or a baseline (shpeft_core.methods.METHODS)
        pa.field("seed", pa.int64()),
        pa.field("mix", pa.string()),  # hybrid rule: union | rank_sum
        *[pa.field(f"val_{m}", pa.float64()) for m in METRIC_NAMES],
        *[pa.field(f"test_{m}", pa.float64()) for m in METRIC_NAMES],
        pa.field("density", pa.float64()),
        pa.field("alpha", pa.float64()),
        pa.field("granularity", pa.string()),
        pa.field("trainable", pa.int64()),  # sparse values + head
        pa.field("sparse_values", pa.int64()),
        pa.field("delta_uri", pa.string()),  # the artifact: a delta file, a checkpoint file or a lora folder
        pa.field("artifact_kind", pa.string()),  # delta | checkpoint | lora
        pa.field("sha256", pa.string()),
        pa.field("bytes", pa.int64()),
        pa.field("importance_key", pa.string()),  # the task's own map
        pa.field("agnostic_key", pa.string()),  # the shared pool map
        pa.field("agnostic_source", pa.string()),  # pool | pool+magnitude | magnitude; null when the run used none
        pa.field("agnostic_pool", pa.string()),  # the pooled datasets, comma-separated
        pa.field("importance_cache", pa.string()),  # hit | miss
        pa.field("sweep_trials", pa.int64()),
        pa.field("resumed_from_epoch", pa.int64()),  # set when training restarted from a checkpoint
        pa.field("node", pa.string()),  # Ray node id where a one-worker task trained (last attempt)
        pa.field("importance_s", pa.float64()),
        pa.field("sweep_s", pa.float64()),
        pa.field("train_s", pa.float64()),
        pa.field("eval_s", pa.float64()),
        pa.field("started_at", pa.string()),
        pa.field("finished_at", pa.string()),
        pa.field("error", pa.string()),
    ]
)


def catalogue_uri(store: str, job_id: str) -> str:
    return catalogue_file(store, job_id)


def _normalise(row: dict[str, Any]) -> dict[str, Any]:
    unknown = set(row) - set(SCHEMA.names)
    if unknown:
        raise KeyError(f"catalogue row has unknown columns {sorted(unknown)}; allowed: {SCHEMA.names}")
    out = {}
    for field in SCHEMA:
        v = row.get(field.name)
        if isinstance(v, float) and math.isnan(v):
            v = None
        out[field.name] = v
    if not out["job_id"] or not out["task"]:
        raise KeyError("catalogue rows need job_id and task")
    return out


def _read_job_table(uri: str) -> pa.Table:
    table = pq.read_table(io.BytesIO(read_bytes(uri)))
    if table.schema == SCHEMA:
        return table
    # A catalogue written before a column existed reads that column as null.
    for f in SCHEMA:
        if f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(len(table), f.type))
    return table.select(SCHEMA.names).cast(SCHEMA)


def write_rows(store: str, job_id: str, rows: Iterable[dict[str, Any]]) -> str:
    """Upsert rows (keyed by task) into the job's catalogue file atomically; returns its URI."""
    uri = catalogue_uri(store, job_id)
    fs, path = url_to_fs(uri)
    existing: dict[str, dict] = {}
    if fs.exists(path):
        for r in _read_job_table(uri).to_pylist():
            existing[r["task"]] = r
    for r in rows:
        r = _normalise({**r, "job_id": job_id})
        existing[r["task"]] = r
    table = pa.Table.from_pylist([existing[k] for k in sorted(existing)], schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(uri, buf.getvalue())
    return uri


def read_catalogue(store: str, job_id: str | None = None) -> pa.Table:
    """The catalogue of one job, or of every job in the store (empty table when none)."""
    if job_id is not None:
        uri = catalogue_uri(store, job_id)
        fs, path = url_to_fs(uri)
        return _read_job_table(uri) if fs.exists(path) else SCHEMA.empty_table()
    fs, root = url_to_fs(catalogue_dir(store))
    if not fs.exists(root):
        return SCHEMA.empty_table()
    files = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".parquet"))
    tables = [_read_job_table(join_uri(catalogue_dir(store), p.rsplit("/", 1)[-1])) for p in files]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def latest_rows(store: str, job_id: str) -> dict[str, dict[str, Any]]:
    """Rows of one job keyed by task name."""
    return {r["task"]: r for r in read_catalogue(store, job_id).to_pylist()}
