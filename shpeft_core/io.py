"""Small storage helpers over fsspec: every artifact shpeft writes goes through here.

Writes are atomic: data lands in a temporary sibling and is moved into place, so a reader
never sees half a file and a crash leaves nothing under the final name. On object stores
(where a single put is already atomic) the temporary step is skipped.
"""

from __future__ import annotations

import hashlib
import os
import uuid

import fsspec
from fsspec.core import url_to_fs

__all__ = [
    "atomic_write_bytes",
    "read_bytes",
    "exists",
    "sha256_bytes",
    "sha256_file",
    "join_uri",
    "remove",
    "local_path",
]

# Filesystems whose single-object put is atomic: a temp + rename would only double the cost.
_ATOMIC_PUT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"}


def _protocol(fs) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a URI or local path with '/' (fsspec's separator everywhere)."""
    out = base.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def atomic_write_bytes(uri: str, data: bytes) -> str:
    """Write ``data`` to ``uri`` atomically; returns its sha256 hex digest."""
    fs, path = url_to_fs(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if _protocol(fs) in _ATOMIC_PUT_PROTOCOLS:
        fs.pipe_file(path, data)
    else:
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with fs.open(tmp, "wb") as f:
                f.write(data)
                if hasattr(f, "flush"):
                    f.flush()
                if _protocol(fs) == "file":
                    os.fsync(f.fileno())
            fs.mv(tmp, path)
        except BaseException:
            if fs.exists(tmp):
                fs.rm(tmp)
            raise
    return sha256_bytes(data)


def read_bytes(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as f:
        return f.read()


def exists(uri: str) -> bool:
    fs, path = url_to_fs(uri)
    return fs.exists(path)


def remove(uri: str, recursive: bool = False) -> None:
    fs, path = url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(uri: str, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with fsspec.open(uri, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def local_path(uri: str) -> str | None:
    """The local filesystem path behind ``uri``, or None when it is not on local disk."""
    fs, path = url_to_fs(uri)
    return path if _protocol(fs) == "file" else None
