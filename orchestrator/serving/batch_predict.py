"""Batch prediction at scale: folders, object-store prefixes and Parquet datasets on Ray Data.

Each actor of the ``map_batches`` stage builds the backbone once and holds every task's delta; per
batch it decodes each image once and runs every task in one mixed-task forward (each image once per
task; the backbone is never written), as ``shpeft predict`` does for a few local files. The result is a
Parquet dataset with one row per (image, task); an image that cannot be decoded gets its message in
``error`` instead of stopping the job. Deltas and base weights are checked in the driver before any image
is read, and so is every Parquet file's schema (a damaged or different file is named before Ray starts).

A path in a Parquet path column names data, not hosts: it resolves inside the data root (the Parquet
file's folder, or ``data_root``), symlinks resolved; URLs are refused unless ``allow_urls``, and then read
with a timeout. Only regular files are read, images within the pixel limit.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from orchestrator.serving.predict import PredictError

__all__ = ["OUTPUT_COLUMNS", "DatasetInput", "needs_dataset", "resolve_input", "predict_dataset"]

OUTPUT_COLUMNS = ("source", "task", "class_index", "class_name", "probabilities", "findings", "delta", "delta_sha256",
                  "error")  # findings: multi_label tasks (probability >= 0.5), else null
_ID_CANDIDATES = ("id", "path", "name", "filename", "file")


def needs_dataset(inputs: Sequence[str]) -> bool:
    """Folders, URIs with a protocol and Parquet go through Ray Data; a few local image files do not."""
    return any("://" in x or x.rstrip("/").endswith(".parquet") or os.path.isdir(x) for x in inputs)


@dataclass(frozen=True)
class DatasetInput:
    kind: str  # "images" (one file per image) or "parquet" (a table with an image column)
    files: list[str]  # paths on ``fs`` (protocol stripped)
    fs: Any
    remote: bool  # whether Ray needs ``fs`` (not the local disk)
    protocol: bool  # whether the inputs were URIs: sources are reported with their protocol
    column: str = ""  # parquet: the image column
    column_kind: str = ""  # parquet: "bytes", "path" or "struct" (a {bytes, path} image struct)
    id_column: str | None = None
    root: str = ""  # parquet: folder that path values must resolve inside (relative ones against it)
    columns: list[str] = field(default_factory=list)
    allow_urls: bool = False  # parquet paths: whether URLs in the data are read
    rows: int = -1  # parquet: rows in every file's footer (-1: not counted)

    def source(self, path: str) -> str:
        return self.fs.unstrip_protocol(path) if self.protocol else path

    def pa_filesystem(self):
        if not self.remote:
            return None
        import pyarrow.fs as pafs

        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))


def _list(fs, root: str, where: str) -> list[str]:
    from tasks.formats.files import find_files
    from tasks.codecs.images import DatasetError

    try:
        return find_files(fs, root.rstrip("/") or root)
    except DatasetError as exc:
        if str(exc).endswith("does not exist"):
            raise PredictError(f"input {where} does not exist") from None
        raise PredictError(str(exc)) from None


def _column_kind(schema, column: str) -> str:
    import pyarrow as pa

    t = schema.field(column).type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "bytes"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "path"
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        return "struct"
    return ""


def resolve_input(inputs: Sequence[str], *, column: str = "image", id_column: str | None = None,
                  data_root: str | None = None, allow_urls: bool = False) -> DatasetInput:
    """What the inputs are: image files under folders/prefixes, or Parquet files with an image column.

    Every Parquet file's footer is read here: each must be readable and have the columns, so a damaged or
    different file is named now, not after minutes of work. Path columns resolve inside ``data_root``
    (default: the input folder, or the Parquet file's folder)."""
    from fsspec.core import url_to_fs

    from tasks.formats.files import ext
    from tasks.codecs.images import DICOM_EXTENSIONS, IMAGE_EXTENSIONS

    resolved = []
    for x in inputs:
        try:
            fs, root = url_to_fs(x)
        except (ImportError, ValueError) as exc:
            raise PredictError(f"input {x}: no filesystem for it ({exc})") from None
        resolved.append((x, fs, root))
    protocols = {type(fs).__name__ for _, fs, _ in resolved}
    if len(protocols) > 1:
        raise PredictError(f"inputs {list(inputs)} are on different filesystems; predict them in separate runs")
    fs = resolved[0][1]
    remote = "LocalFileSystem" not in protocols
    protocol = any("://" in x for x in inputs)
    files = [p for x, _, root in resolved for p in _list(fs, root, x)]
    parquet = [p for p in files if ext(p) == ".parquet"]
    images = [p for p in files if ext(p) in IMAGE_EXTENSIONS + DICOM_EXTENSIONS]
    if parquet and images:
        raise PredictError(f"inputs {list(inputs)} hold both Parquet files and image files; give one kind")
    if images:
        return DatasetInput("images", images, fs, remote, protocol)
    if not parquet:
        raise PredictError(f"no images ({', '.join(IMAGE_EXTENSIONS + DICOM_EXTENSIONS)}) or .parquet files "
                           f"under {', '.join(inputs)}")
    schemas, rows = _parquet_footers(fs, parquet)
    schema = schemas[0]
    names = list(schema.names)
    if column not in names:
        raise PredictError(f"{parquet[0]}: no column {column!r} (--column); columns are {names}")
    kind = _column_kind(schema, column)
    if not kind:
        raise PredictError(f"{parquet[0]}: column {column!r} is {schema.field(column).type}; expected image bytes "
                           "(binary), image paths (string) or a struct with a 'bytes' field")
    if id_column is not None and id_column not in names:
        raise PredictError(f"{parquet[0]}: no column {id_column!r} (--id-column); columns are {names}")
    if id_column is None and kind != "path":
        id_column = next((c for c in _ID_CANDIDATES if c in names and c != column), None)
    for path, other in zip(parquet[1:], schemas[1:]):
        have = list(other.names)
        for flag, col in (("--column", column), ("--id-column", id_column)):
            if col is not None and col not in have:
                raise PredictError(f"{path}: no column {col!r} ({flag}); columns are {have} "
                                   f"(the first file, {parquet[0]}, has it)")
        if _column_kind(other, column) != kind:
            raise PredictError(f"{path}: column {column!r} is {other.field(column).type}, but "
                               f"{schema.field(column).type} in {parquet[0]}")
    if rows == 0:
        raise PredictError(f"no rows to predict: the Parquet input ({len(parquet)} file(s) under "
                           f"{', '.join(inputs)}) is empty")
    if data_root is not None:
        try:
            root_fs, root = url_to_fs(data_root)
        except (ImportError, ValueError) as exc:
            raise PredictError(f"--data-root {data_root}: no filesystem for it ({exc})") from None
        if type(root_fs) is not type(fs) or not root_fs.isdir(root):
            raise PredictError(f"--data-root {data_root} is not a folder on the inputs' filesystem")
    else:
        root = resolved[0][2]
        if not fs.isdir(root):
            root = root.rsplit("/", 1)[0]
    return DatasetInput("parquet", parquet, fs, remote, protocol, column, kind, id_column, root, names,
                        allow_urls=allow_urls, rows=rows)


def _parquet_footers(fs, files: list[str]):
    """Every file's schema and the total row count, from the footers; PredictError naming a bad file."""
    import pyarrow.parquet as pq

    schemas, rows = [], 0
    for path in files:
        try:
            with fs.open(path, "rb") as f:
                meta = pq.read_metadata(f)
            schemas.append(meta.schema.to_arrow_schema())
            rows += meta.num_rows
        except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
            raise PredictError(f"{path}: unreadable Parquet ({type(exc).__name__}: {exc})") from None
    return schemas, rows


class _Predictor:
    """A Ray Data actor: the backbone built once, every delta held; one output row per (image, task)."""

    def __init__(self, delta_uris: list[str], shas: list[str], backbone_source: str | None, device: str,
                 source: DatasetInput, batch_size: int, max_image_pixels: int | None = None):
        from orchestrator.serving.predict import check_base_weights, class_names, load_deltas, model_for_delta
        from shpeft_core.mixed import MixedTaskModel
        from tasks.codecs.images import set_max_image_pixels
        from tasks.transforms import transform_for

        set_max_image_pixels(max_image_pixels)  # the driver's limit, wherever this actor runs
        self.deltas, self.names = load_deltas(delta_uris)
        self.uris, self.shas = list(delta_uris), list(shas)
        self.labels = [class_names(d) for d in self.deltas]
        self.model = model_for_delta(self.deltas[0], backbone_source, device, delta_uris[0]).eval()
        check_base_weights(self.model, self.deltas[0], delta_uris[0])  # once per actor, not per batch
        self.mixed = MixedTaskModel(self.model)
        # prepare validates each delta (validate_delta) as the driver did before any image was read
        self.prepared = [self.mixed.prepare(d, where=u, check_fingerprint=False)
                         for d, u in zip(self.deltas, delta_uris)]
        self.transform = transform_for(self.model, train=False)
        self.device, self.batch_size, self.src = device, batch_size, source

    def _image(self, value, path: str | None):
        """(source id, image bytes) of one row; bytes None with the message when it cannot be read."""
        from orchestrator.serving.predict import DELTA_READ_TIMEOUT_S
        from shpeft_core.io import StorageError, read_regular_bytes
        from tasks.codecs.images import DatasetError
        from tasks.formats.files import printable, resolve_data_path

        src = self.src
        if src.kind == "images":
            return src.source(path), value, None
        if src.column_kind == "struct":
            value = (value or {}).get("bytes")
        if src.column_kind == "path":
            if not value:
                return "", None, f"empty {src.column!r} value"
            try:
                uri = resolve_data_path(src.fs, src.root, value, where=f"column {src.column!r}",
                                        allow_urls=src.allow_urls)
            except DatasetError as exc:  # says only that the path is not allowed, never whether it exists
                return value, None, str(exc)
            try:
                return value, read_regular_bytes(uri, timeout_s=DELTA_READ_TIMEOUT_S), None
            except (OSError, StorageError) as exc:  # inside the allowed root (or an allowed URL)
                return value, None, f"image {printable(value)!r} cannot be read: {exc}"
        if value is None:
            return "", None, f"empty {src.column!r} value"
        return "", value, None

    def __call__(self, batch):
        import pyarrow as pa
        import torch

        from orchestrator.serving.predict import (PredictError, decode_image_bytes, mixed_logits, present_findings,
                                                  task_kind, task_probabilities)

        src = self.src
        n = batch.num_rows
        col = src.column if src.kind == "parquet" else "bytes"
        values = batch.column(col).to_pylist()
        paths = batch.column("path").to_pylist() if "path" in batch.column_names else [None] * n
        ids = batch.column(src.id_column).to_pylist() if src.id_column else [None] * n
        sources, tensors, errors = [], [], []
        for i in range(n):
            sid, data, err = self._image(values[i], paths[i])
            if ids[i] is not None:
                sid = str(ids[i])
            elif not sid:  # no id column: the file and the image's content hash identify the row
                digest = hashlib.sha256(data or b"").hexdigest()[:16]
                sid = f"{src.source(paths[i]) if paths[i] else 'row'}#sha256={digest}"
            x = None
            if err is None:
                try:
                    x = self.transform(decode_image_bytes(bytes(data), sid))
                except (PredictError, OSError, ValueError) as exc:
                    err = str(exc)
            sources.append(sid)
            tensors.append(x)
            errors.append(err)
        good = [i for i in range(n) if tensors[i] is not None]
        probs = []
        if good:
            logits = mixed_logits(self.mixed, self.prepared, torch.stack([tensors[i] for i in good]),
                                  batch_size=self.batch_size, device=self.device)
            probs = [task_probabilities(lg, d) for lg, d in zip(logits, self.deltas)]
        row_of = {i: r for r, i in enumerate(good)}
        out: dict[str, list] = {c: [] for c in OUTPUT_COLUMNS}
        for i in range(n):
            for t, name in enumerate(self.names):
                p = probs[t][row_of[i]] if i in row_of else None
                multi = task_kind(self.deltas[t]) == "multi_label"
                k = int(p.argmax()) if p is not None and not multi else None  # no single class for findings
                out["source"].append(sources[i])
                out["task"].append(name)
                out["class_index"].append(k)
                out["class_name"].append(self.labels[t][k] if k is not None else None)
                out["probabilities"].append(p.tolist() if p is not None else None)
                out["findings"].append(present_findings(p.tolist(), self.labels[t]) if multi and p is not None else None)
                out["delta"].append(self.uris[t])
                out["delta_sha256"].append(self.shas[t])
                out["error"].append(errors[i])
        return pa.table(out, schema=output_schema())


def output_schema():
    import pyarrow as pa

    return pa.schema([("source", pa.string()), ("task", pa.string()), ("class_index", pa.int64()),
                      ("class_name", pa.string()), ("probabilities", pa.list_(pa.float64())),
                      ("findings", pa.list_(pa.string())),
                      ("delta", pa.string()), ("delta_sha256", pa.string()), ("error", pa.string())])


def _check_output(output: str):
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(output)
    if fs.exists(path):
        raise PredictError(f"--output {output} exists; remove it or choose another path")
    return fs, path


def predict_dataset(
    delta_uris: Sequence[str],
    inputs: Sequence[str],
    output: str,
    *,
    backbone: str | None = None,
    backbone_source: str | None = None,
    column: str = "image",
    id_column: str | None = None,
    batch_size: int = 32,
    concurrency: int = 1,
    device: str = "cpu",
    address: str | None = None,
    num_cpus: int | None = None,
    data_root: str | None = None,
    allow_urls: bool = False,
) -> dict:
    """Predict every image of ``inputs`` with every delta; write ``output`` (a Parquet dataset folder).

    Returns {"output", "images", "rows", "errors"}. Everything that can be checked without reading
    images (deltas, base weights, device, inputs and every Parquet footer, output) is checked first and
    raises PredictError. ``data_root``/``allow_urls``: where paths in a Parquet path column may point.
    """
    import uuid

    import ray

    from orchestrator.runtime.session import ray_session
    from orchestrator.serving.predict import (check_base_weights, check_device, load_deltas, model_for_delta,
                                              validate_deltas)
    from shpeft_core.io import sha256_file
    from tasks.codecs.images import max_image_pixels

    check_device(device, local=address is None)
    deltas, _ = load_deltas(delta_uris, backbone)
    shas = [sha256_file(u) for u in delta_uris]
    # The base weights once in the driver: a wrong --backbone-source fails here, not in every actor.
    model = model_for_delta(deltas[0], backbone_source, uri=delta_uris[0])
    check_base_weights(model, deltas[0], delta_uris[0])
    validate_deltas(model, deltas, delta_uris)
    del model
    out_fs, out_path = _check_output(output)
    src = resolve_input(inputs, column=column, id_column=id_column, data_root=data_root, allow_urls=allow_urls)

    import ray.data  # noqa: F401  (its import configures its loggers: ray_session quietens them after it)

    with ray_session(address, num_cpus):
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = bool(os.environ.get("SHPEFT_VERBOSE"))
        pa_fs = src.pa_filesystem()
        if src.kind == "images":
            ds = ray.data.read_binary_files(src.files, include_paths=True, filesystem=pa_fs)
        else:
            cols = [src.column] + ([src.id_column] if src.id_column else [])
            ds = ray.data.read_parquet(src.files, filesystem=pa_fs, columns=cols,
                                       include_paths=src.id_column is None and src.column_kind != "path")
        gpu = str(device).startswith("cuda")
        ds = ds.map_batches(
            _Predictor, batch_size=batch_size, batch_format="pyarrow", concurrency=concurrency,
            num_cpus=0 if gpu else 1, num_gpus=1 if gpu else 0,
            fn_constructor_kwargs={"delta_uris": list(delta_uris), "shas": shas, "backbone_source": backbone_source,
                                   "device": device, "source": src, "batch_size": batch_size,
                                   "max_image_pixels": max_image_pixels()},
        )
        # Written next to the target, then moved: a reader never sees a half-written result.
        tmp = f"{out_path.rstrip('/')}.tmp-{uuid.uuid4().hex}"
        try:
            ds.write_parquet(tmp, filesystem=_pa_fs(out_fs, output))
            out_fs.mv(tmp, out_path, recursive=True)
        except BaseException:
            if out_fs.exists(tmp):
                out_fs.rm(tmp, recursive=True)
            raise
    import pyarrow.parquet as pq

    table = pq.read_table(out_path, columns=["error"], filesystem=_pa_fs(out_fs, output))
    failed = table.num_rows - table.column("error").null_count
    return {"output": output, "rows": table.num_rows, "images": table.num_rows // len(delta_uris),
            "errors": failed // len(delta_uris)}


def _pa_fs(fs, uri: str):
    if "://" not in uri:
        return None
    import pyarrow.fs as pafs

    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))
