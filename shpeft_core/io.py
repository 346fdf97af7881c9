"""Small storage helpers over fsspec: every artifact shpeft writes goes through here.

Writes are atomic: data lands in a temporary sibling and is moved into place, so a reader
never sees half a file and a crash leaves nothing under the final name. On object stores
(where a single put is already atomic) the temporary step is skipped.

Object stores need their fsspec backend (s3fs, gcsfs, ...), installed with the package extras
(``pip install 'shpeft[s3]'`` / ``'shpeft[gcs]'``); without it every helper here raises one
`StorageError` naming the URI and what to install.

Small JSON state files (evaluations, sweep ledgers, checkpoint state) carry the sha256 of their own
content (``write_sealed_json``) and are checked when read (``read_sealed_json``).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid

from fsspec.core import url_to_fs

__all__ = [
    "StorageError",
    "atomic_write_bytes",
    "atomic_write_stream",
    "read_bytes",
    "exists",
    "sha256_bytes",
    "sha256_file",
    "join_uri",
    "remove",
    "local_path",
    "check_writable",
    "write_checksum",
    "verify_file",
    "DamagedFileError",
    "write_sealed_json",
    "read_sealed_json",
]

# Filesystems whose single-object put is atomic: a temp + rename would only double the cost.
_ATOMIC_PUT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"}


# Protocol -> the pip requirement that provides its fsspec backend (extras of this package first).
_BACKEND_INSTALL = {
    "s3": "'shpeft[s3]'",
    "s3a": "'shpeft[s3]'",
    "gs": "'shpeft[gcs]'",
    "gcs": "'shpeft[gcs]'",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
    "adl": "adlfs",
}


class StorageError(ValueError):
    """A store or file URI that cannot be used; the message names the URI and what to do."""


def _missing_backend(uri: str, exc: BaseException) -> StorageError:
    """The error for a URI whose fsspec backend cannot be loaded (not installed, or unknown)."""
    from fsspec.core import split_protocol
    from fsspec.registry import get_filesystem_class

    # A chained URI (simplecache::s3://...) names several protocols: report the one that fails.
    protocol = None
    for part in uri.split("::"):
        proto = split_protocol(part)[0] or "file"
        try:
            get_filesystem_class(proto)
        except (ImportError, ValueError):
            protocol = proto
            break
    if protocol is None:  # the failure came from inside a backend that does import
        return StorageError(f"{uri}: its filesystem backend cannot be loaded ({type(exc).__name__}: {exc})")
    if protocol in _BACKEND_INSTALL:
        return StorageError(
            f"{uri}: the {protocol} filesystem backend is not installed; pip install {_BACKEND_INSTALL[protocol]}"
        )
    if isinstance(exc, ImportError):
        return StorageError(f"{uri}: the {protocol} filesystem backend cannot be loaded ({exc})")
    return StorageError(f"{uri}: no fsspec filesystem is known for protocol {protocol!r}")


def _fs(uri: str):
    """``(filesystem, path)`` for ``uri``; `StorageError` when its backend is missing or unknown."""
    try:
        return url_to_fs(uri)
    except ImportError as exc:
        raise _missing_backend(uri, exc) from exc
    except ValueError as exc:
        if "Protocol not known" not in str(exc):
            raise
        raise _missing_backend(uri, exc) from exc


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
    fs, path = _fs(uri)
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


def atomic_write_stream(uri: str, chunks) -> tuple[str, int]:
    """Write the byte chunks of an iterable to ``uri`` atomically without holding them all in memory;
    returns (sha256 hex, size). Same rules as atomic_write_bytes."""
    fs, path = _fs(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    direct = _protocol(fs) in _ATOMIC_PUT_PROTOCOLS  # a multipart upload appears only once complete
    target = path if direct else f"{path}.tmp-{uuid.uuid4().hex}"
    h, size = hashlib.sha256(), 0
    try:
        with fs.open(target, "wb") as f:
            for chunk in chunks:
                h.update(chunk)
                size += len(chunk)
                f.write(chunk)
            if hasattr(f, "flush"):
                f.flush()
            if _protocol(fs) == "file":
                os.fsync(f.fileno())
        if not direct:
            fs.mv(target, path)
    except BaseException:
        if not direct and fs.exists(target):
            fs.rm(target)
        raise
    return h.hexdigest(), size


def read_bytes(uri: str) -> bytes:
    fs, path = _fs(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.exists(path)


def remove(uri: str, recursive: bool = False) -> None:
    fs, path = _fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(uri: str, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    fs, path = _fs(uri)
    with fs.open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def local_path(uri: str) -> str | None:
    """The local filesystem path behind ``uri``, or None when it is not on local disk."""
    fs, path = _fs(uri)
    return path if _protocol(fs) == "file" else None


def check_writable(uri: str) -> None:
    """Check that the store at ``uri`` can be written, by writing and removing a small probe file.

    Creates the store folder when missing (as the first write would). Raises `StorageError`, with
    one line naming the path, when the backend is missing, the store or a parent of it is a file,
    or the store is read-only / the credentials do not allow writing.
    """
    fs, path = _fs(uri)
    name = f".shpeft-write-probe-{uuid.uuid4().hex[:12]}"
    probe, probe_path = join_uri(uri, name), join_uri(path, name)
    step = "create the store folder"
    try:
        if fs.isfile(path):
            raise NotADirectoryError(f"{path} is a file, not a folder")
        fs.makedirs(path, exist_ok=True)
        step = f"write {probe}"
        fs.pipe_file(probe_path, b"shpeft write probe\n")
        step = f"remove {probe}"
        fs.rm(probe_path)
    except (OSError, ValueError) as exc:  # PermissionError, NotADirectoryError, backend errors
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise StorageError(f"store {uri} is not writable: cannot {step} ({reason})") from exc


def _checksum_uri(uri: str) -> str:
    return uri + ".sha256"


def write_checksum(uri: str, sha256: str) -> None:
    """Record ``uri``'s sha256 in a sidecar (``<uri>.sha256``), written after the file itself."""
    atomic_write_bytes(_checksum_uri(uri), (sha256 + "\n").encode())


def verify_file(uri: str) -> str | None:
    """None when ``uri`` exists and hashes to its recorded sidecar sha256, else what is wrong with it."""
    if not exists(uri):
        return "missing"
    if not exists(_checksum_uri(uri)):
        return "no recorded checksum"
    want = read_bytes(_checksum_uri(uri)).decode(errors="replace").strip()
    got = sha256_file(uri)
    return None if got == want else f"sha256 {got[:12]} differs from the recorded {want[:12]} (corrupt or truncated)"


class DamagedFileError(ValueError):
    """A file that fails its integrity check: unreadable, without its checksum, or not matching it."""


def _json_checksum(doc: dict) -> str:
    return sha256_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


def write_sealed_json(uri: str, doc: dict) -> None:
    """Write the JSON object ``doc`` atomically with a ``checksum`` field, the sha256 of its canonical
    content, for ``read_sealed_json`` to check."""
    body = {k: v for k, v in doc.items() if k != "checksum"}
    atomic_write_bytes(uri, json.dumps({**body, "checksum": _json_checksum(body)}, indent=1).encode())


def read_sealed_json(uri: str) -> dict:
    """The JSON object at ``uri`` without its ``checksum`` field, once the checksum matches; else
    DamagedFileError naming ``uri`` and what is wrong (FileNotFoundError when there is no such file)."""
    try:
        doc = json.loads(read_bytes(uri))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DamagedFileError(f"{uri}: not readable JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict) or "checksum" not in doc:
        raise DamagedFileError(f"{uri}: no checksum in it (damaged, or written by an older version)")
    want = doc.pop("checksum")
    if want != _json_checksum(doc):
        raise DamagedFileError(f"{uri}: damaged (its content does not match its checksum)")
    return doc
