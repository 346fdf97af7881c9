"""Small storage helpers over fsspec: every artifact shpeft writes goes through here.

Writes are atomic: data lands in a temporary sibling and is moved into place, so a reader
never sees half a file and a crash leaves nothing under the final name. On object stores
(where a single put is already atomic) the temporary step is skipped.

Object stores need their fsspec backend (s3fs, gcsfs, ...), installed with the package extras
(``pip install 'shpeft[s3]'`` / ``'shpeft[gcs]'``); without it every helper here raises one
`StorageError` naming the URI and what to install.

Small JSON state files (evaluations, sweep ledgers, checkpoint state) carry the sha256 of their own
content (``write_sealed_json``) and are checked when read (``read_sealed_json``).

Files that arrive from outside (deltas named by a request or a command line) are read with
``read_regular_bytes``: only a regular file (never a FIFO, device or socket, which could block the reader
or never end), at most ``max_bytes``, within ``timeout_s`` seconds. A write that fails (a full disk,
a permission) raises `StorageError` naming the URI, and leaves nothing under the final name or beside it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import threading
import uuid

from fsspec.core import url_to_fs

__all__ = [
    "StorageError",
    "atomic_write_bytes",
    "atomic_write_stream",
    "read_bytes",
    "read_regular_bytes",
    "check_regular_file",
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
    "check_store_usable",
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


def _write_failed(uri: str, exc: OSError) -> StorageError:
    """One line for a write the filesystem refused (ENOSPC, EACCES, EROFS, ...)."""
    reason = os.strerror(exc.errno) if exc.errno else (str(exc) or type(exc).__name__)
    hint = "; free some space and run the command again" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return StorageError(f"cannot write {uri}: {reason}{hint}")


def atomic_write_bytes(uri: str, data: bytes) -> str:
    """Write ``data`` to ``uri`` atomically; returns its sha256 hex digest.

    A failed write (full disk, no permission) raises `StorageError` naming ``uri``; the temporary file
    is removed and the previous content under ``uri`` (if any) is left as it was."""
    fs, path = _fs(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    try:
        if parent:
            fs.makedirs(parent, exist_ok=True)
        if _protocol(fs) in _ATOMIC_PUT_PROTOCOLS:
            fs.pipe_file(path, data)
            return sha256_bytes(data)
    except OSError as exc:
        raise _write_failed(uri, exc) from exc
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
            if hasattr(f, "flush"):
                f.flush()
            if _protocol(fs) == "file":
                os.fsync(f.fileno())
        fs.mv(tmp, path)
    except BaseException as exc:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except OSError:  # pragma: no cover - the store went away under us; the write error is what matters
            pass
        if isinstance(exc, OSError):
            raise _write_failed(uri, exc) from exc
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


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular_file(path: str, where: str | None = None) -> int:
    """The size of the local file ``path`` once it is a regular file (symlinks followed); `StorageError`
    naming ``where`` (default ``path``) for a FIFO, device, socket or folder, FileNotFoundError when missing."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise StorageError(f"{where or path}: is {_kind(st.st_mode)}, not a regular file; only regular files are read")
    return st.st_size


def _too_large(where: str, size: int, max_bytes: int) -> StorageError:
    return StorageError(f"{where}: {size:,} bytes, over the limit of {max_bytes:,} bytes")


def _read_local(path: str, where: str, max_bytes: int | None) -> bytes:
    # Opened non-blocking and checked on the open descriptor: a FIFO swapped in after a stat cannot block us.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StorageError(f"{where}: is {_kind(st.st_mode)}, not a regular file; only regular files are read")
        if max_bytes is not None and st.st_size > max_bytes:
            raise _too_large(where, st.st_size, max_bytes)
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if max_bytes is not None and total > max_bytes:  # grew while being read
                raise _too_large(where, total, max_bytes)
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_remote(fs, path: str, where: str, max_bytes: int | None) -> bytes:
    if max_bytes is not None:
        size = fs.info(path).get("size")
        if size is not None and int(size) > max_bytes:
            raise _too_large(where, int(size), max_bytes)
    with fs.open(path, "rb") as f:
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise _too_large(where, len(data), max_bytes)
    return data


def _within(timeout_s: float | None, where: str, work):
    """``work()``, or TimeoutError naming ``where`` when it has not returned after ``timeout_s`` seconds.

    The work runs in a daemon thread of its own: a read that never returns (a stalled server) is left
    behind without holding any pool, lock or caller (the thread ends when the read does)."""
    if timeout_s is None:
        return work()
    box: dict = {}
    done = threading.Event()

    def run():
        try:
            box["value"] = work()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="shpeft-bounded-read", daemon=True).start()
    if not done.wait(timeout_s):
        raise TimeoutError(f"{where}: not read within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def read_regular_bytes(uri: str, *, max_bytes: int | None = None, timeout_s: float | None = None) -> bytes:
    """The bytes of the regular file at ``uri``: `StorageError` for a FIFO, device, socket or folder (never
    opened for reading) or a file over ``max_bytes``; TimeoutError when the read takes over ``timeout_s``;
    FileNotFoundError when there is no such file."""
    fs, path = _fs(uri)
    local = _protocol(fs) == "file"

    def work() -> bytes:
        try:
            return _read_local(path, uri, max_bytes) if local else _read_remote(fs, path, uri, max_bytes)
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri}: no such file") from None
        except IsADirectoryError:
            raise StorageError(f"{uri}: is a folder, not a regular file; only regular files are read") from None

    return _within(timeout_s, uri, work)


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


def check_store_usable(uri: str) -> None:
    """What can be known about the store at ``uri`` without writing anything (``shpeft validate``).

    Local: the store, or the nearest existing folder above it, is a folder this user may write into.
    Remote: the filesystem backend loads (writing is checked by ``check_writable`` when a job starts).
    Raises `StorageError` with one line naming the path."""
    fs, path = _fs(uri)
    if _protocol(fs) != "file":
        return
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise StorageError(f"store {uri} is not writable: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StorageError(f"store {uri} is not writable: {probe} does not allow this user to write")


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
