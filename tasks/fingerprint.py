"""Dataset fingerprints: what a result was trained and evaluated on, independent of where the files live.

A fingerprint is a sha256 over each data file's relative path, size and content digest, plus the spec
fields that change what the loader yields. Content digests are computed once per file content
(tasks/digests.py): with a ``cache`` folder a launch on unchanged data reads no data bytes.
"""

from __future__ import annotations

import hashlib
import json

from .digests import HashFiles, file_digests
from .formats import get_format
from .formats.base import DatasetFormat
from .formats.files import relative
from .spec import TaskSpec

__all__ = ["dataset_fingerprint"]


def _fingerprint_fields(spec: TaskSpec, fmt: DatasetFormat) -> dict:
    fields = {"format": spec.format, "num_classes": spec.num_classes, "class_names": spec.class_names,
              **fmt.fingerprint_fields(spec)}
    if spec.kind != "single_label":  # left out at its default: fingerprints from before task kinds stay valid
        fields["kind"] = spec.kind
    return fields


def dataset_fingerprint(spec: TaskSpec, *, cache: str | None = None, hash_files: HashFiles | None = None) -> str:
    """sha256 hex over the data files' bytes and relative paths plus the spec fields that change
    what the loader yields (format, kind, classes, split rule, columns, window). Not the name, modality,
    metric or image_size of the task, and not the source prefix: a copied dataset keeps its fingerprint.

    ``cache``: a folder keeping per-file digests between launches (see the module docstring);
    ``hash_files``: how files not known there are hashed (default: threads in this process)."""
    h = hashlib.sha256()
    h.update(b"shpeft-dataset-v1\0")
    fmt = get_format(spec.format)
    h.update(json.dumps(_fingerprint_fields(spec, fmt), sort_keys=True).encode())
    fs, root, paths = fmt.data_files(spec)
    digests = file_digests(fs, root, paths, cache=cache, hash_files=hash_files)
    for p in paths:
        size, digest = digests[p]
        rel = relative(p, root)
        h.update(f"\0{rel}\0{size}\0{digest}".encode())
    return h.hexdigest()
