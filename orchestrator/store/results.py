"""The results catalogue: one Parquet file per job under ``<store>/catalogue/<job_id>.parquet``.

One row per (job, task). The driver is the only writer of a job's file and rewrites it atomically
after every task, so a reader (or a killed driver's rerun) always sees a complete table.

The catalogue is an index, not the record: every finished task's artifact and its sealed evaluation
file (``deltas/<task>/<job_id>-<hash>.eval.json``, which holds the row's fields and the artifact's sha256)
are. A catalogue file that cannot be read is a `CatalogueError` naming it (``list`` skips it with a
warning); ``heal_catalogue`` (run at the start of every ``shpeft run``) sets a damaged file aside as
``<job_id>.parquet.damaged-<utc time>`` and rebuilds the rows, and adds the rows a failed write (a full
disk) left out, from the artifacts whose evaluation verifies.
"""

from __future__ import annotations

import io
import math
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from shpeft_core.io import StorageError, atomic_write_bytes, exists, join_uri, read_bytes
from shpeft_core.options import SUMMARY_METRICS

from orchestrator.store.layout import catalogue_dir, catalogue_file, damaged_copy, job_evaluation_files

__all__ = ["SCHEMA", "METRIC_NAMES", "CatalogueError", "catalogue_uri", "read_catalogue", "write_rows", "latest_rows",
           "heal_catalogue", "recover_rows"]


class CatalogueError(StorageError):
    """A catalogue file that cannot be read; the message names it and how it heals."""

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
        pa.field("trainable", pa.int64()),  # sparse values + dense values + head
        pa.field("sparse_values", pa.int64()),
        pa.field("dense_values", pa.int64()),  # tensors a delta stores whole beside the sparse values (gps)
        pa.field("effective_alpha", pa.float64()),  # the share of the mask the task-specific ranking chose
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
    try:
        table = pq.read_table(io.BytesIO(read_bytes(uri)))
    except (pa.ArrowException, ValueError, KeyError, OSError) as exc:  # cut short, overwritten, other columns
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise CatalogueError(f"catalogue file {uri} is damaged ({reason}); the next `shpeft run` of its job sets "
                             "it aside and rebuilds it from the verified deltas") from None
    if table.schema == SCHEMA:
        return table
    # A catalogue written before a column existed reads that column as null.
    for f in SCHEMA:
        if f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(len(table), f.type))
    try:
        return table.select(SCHEMA.names).cast(SCHEMA)
    except (pa.ArrowException, ValueError) as exc:  # a column of another type: not a catalogue we wrote
        raise CatalogueError(f"catalogue file {uri} is damaged (its columns: {exc}); the next `shpeft run` of its "
                             "job sets it aside and rebuilds it from the verified deltas") from None


def write_rows(store: str, job_id: str, rows: Iterable[dict[str, Any]]) -> str:
    """Upsert rows (keyed by task) into the job's catalogue file atomically; returns its URI.

    A damaged file is set aside and rebuilt first (``heal_catalogue``), so a write never fails on it."""
    uri = catalogue_uri(store, job_id)
    fs, path = url_to_fs(uri)
    existing: dict[str, dict] = {}
    if fs.exists(path):
        try:
            table = _read_job_table(uri)
        except CatalogueError:
            heal_catalogue(store, job_id)
            table = _read_job_table(uri) if fs.exists(path) else SCHEMA.empty_table()
        for r in table.to_pylist():
            existing[r["task"]] = r
    for r in rows:
        r = _normalise({**r, "job_id": job_id})
        existing[r["task"]] = r
    table = pa.Table.from_pylist([existing[k] for k in sorted(existing)], schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(uri, buf.getvalue())
    return uri


def read_catalogue(store: str, job_id: str | None = None, *,
                   on_damaged: Callable[[str], None] | None = None) -> pa.Table:
    """The catalogue of one job, or of every job in the store (empty table when none).

    A damaged file is a CatalogueError naming it; when reading every job with ``on_damaged``, it is
    skipped and ``on_damaged`` gets that message instead."""
    if job_id is not None:
        uri = catalogue_uri(store, job_id)
        fs, path = url_to_fs(uri)
        return _read_job_table(uri) if fs.exists(path) else SCHEMA.empty_table()
    fs, root = url_to_fs(catalogue_dir(store))
    if not fs.exists(root):
        return SCHEMA.empty_table()
    files = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".parquet"))
    tables = []
    for p in files:
        try:
            tables.append(_read_job_table(join_uri(catalogue_dir(store), p.rsplit("/", 1)[-1])))
        except CatalogueError as exc:
            if on_damaged is None:
                raise
            on_damaged(str(exc))
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def latest_rows(store: str, job_id: str) -> dict[str, dict[str, Any]]:
    """Rows of one job keyed by task name."""
    return {r["task"]: r for r in read_catalogue(store, job_id).to_pylist()}


def recover_rows(store: str, job_id: str, skip: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Rows of ``job_id`` rebuilt from its artifacts under ``deltas/``: one per task, from the newest
    evaluation file that verifies and whose artifact still has the sha256 it records. Tasks in ``skip``
    are not looked at (their artifacts are not hashed)."""
    from shpeft_core.artifacts import artifact_sha256

    from orchestrator.store.evaluation_files import EvalFileError, read_eval

    found: dict[str, tuple[str, dict]] = {}
    skip = set(skip)
    for task, config_hash, uri in job_evaluation_files(store, job_id):
        if task in skip:
            continue
        try:
            doc = read_eval(uri)
            artifact, kind = doc["artifact_uri"], doc.get("artifact_kind") or "delta"
            if artifact_sha256(artifact, kind) != doc["artifact_sha256"]:
                continue
        except (EvalFileError, FileNotFoundError, OSError, KeyError, TypeError, ValueError):
            continue  # not evidence of a finished task: it reruns
        if doc["task"] in found and found[doc["task"]][0] >= (doc.get("written_at") or ""):
            continue
        row = {k: v for k, v in (doc.get("row") or {}).items() if k in SCHEMA.names}
        row.update(job_id=job_id, task=doc["task"], config_hash=config_hash, status="ok", trained=False,
                   metric=doc.get("metric"), method=doc.get("method"), density=doc.get("density"),
                   alpha=doc.get("alpha"), delta_uri=artifact, artifact_kind=kind, sha256=doc["artifact_sha256"],
                   finished_at=doc.get("written_at"), error=None)
        found[doc["task"]] = (doc.get("written_at") or "", row)
    return {task: row for task, (_, row) in found.items()}


def heal_catalogue(store: str, job_id: str) -> list[str]:
    """Make the job's catalogue readable and complete; returns what was done, one line each (none: nothing).

    A damaged file is moved aside (``.damaged-<utc time>`` beside it) and the rows rebuilt; a task without
    an ``ok`` row whose artifact and evaluation verify (its row's write failed, e.g. on a full disk) gets
    its row back."""
    uri = catalogue_uri(store, job_id)
    fs, path = url_to_fs(uri)
    said: list[str] = []
    rows: dict[str, dict] = {}
    if fs.exists(path):
        try:
            rows = {r["task"]: r for r in _read_job_table(uri).to_pylist()}
        except CatalogueError:
            aside = damaged_copy(path)
            fs.mv(path, aside)
            said.append(f"catalogue file {uri} was damaged: set aside as {aside}, its rows rebuilt from the store")
    recovered = recover_rows(store, job_id, skip={t for t, r in rows.items() if r.get("status") == "ok"})
    if recovered:
        table = pa.Table.from_pylist([_normalise(r) for r in
                                      sorted({**rows, **recovered}.values(), key=lambda r: r["task"])], schema=SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        atomic_write_bytes(uri, buf.getvalue())
        said.append(f"catalogue {uri}: {len(recovered)} row(s) rebuilt from verified deltas "
                    f"({', '.join(sorted(recovered))})")
    return said


def read_table_rows(uri: str) -> list[dict[str, Any]]:
    """The rows of one Parquet file of a report (results, tuning), or [] when there is none yet."""
    if not exists(uri):
        return []
    return pq.read_table(io.BytesIO(read_bytes(uri))).to_pylist()


def write_table_rows(uri: str, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    """Write ``rows`` as one Parquet file with ``schema`` (missing fields null), atomically."""
    table = pa.Table.from_pylist([{n: r.get(n) for n in schema.names} for r in rows], schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(uri, buf.getvalue())
