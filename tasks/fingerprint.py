"""Dataset fingerprints: what a result was trained and evaluated on, independent of where the files live."""

from __future__ import annotations

import hashlib
import json

from .formats import get_format
from .formats.base import DatasetFormat
from .formats.files import relative
from .spec import TaskSpec

__all__ = ["dataset_fingerprint"]


_DIGEST_CACHE: dict[tuple, str] = {}


def _file_digest(fs, path: str) -> tuple[int, str]:
    """sha256 of one file, streamed in 1 MiB chunks; cached in-process by (path, size, mtime)."""
    info = fs.info(path)
    size = int(info.get("size") or 0)
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created")
    key = (fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0], path, size, str(mtime))
    if mtime is not None and key in _DIGEST_CACHE:
        return size, _DIGEST_CACHE[key]
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    if mtime is not None:
        _DIGEST_CACHE[key] = digest
    return size, digest


def _fingerprint_fields(spec: TaskSpec, fmt: DatasetFormat) -> dict:
    return {"format": spec.format, "num_classes": spec.num_classes, "class_names": spec.class_names,
            **fmt.fingerprint_fields(spec)}


def dataset_fingerprint(spec: TaskSpec) -> str:
    """sha256 hex over the data files' bytes and relative paths plus the spec fields that change
    what the loader yields (format, classes, split rule, columns, window). Not the name, modality,
    metric or image_size of the task, and not the source prefix: a copied dataset keeps its fingerprint."""
    h = hashlib.sha256()
    h.update(b"shpeft-dataset-v1\0")
    fmt = get_format(spec.format)
    h.update(json.dumps(_fingerprint_fields(spec, fmt), sort_keys=True).encode())
    fs, root, paths = fmt.data_files(spec)
    for p in paths:
        size, digest = _file_digest(fs, p)
        rel = relative(p, root)
        h.update(f"\0{rel}\0{size}\0{digest}".encode())
    return h.hexdigest()
