"""File digests computed once: the sha256 of a data file, kept by what identifies its content unread.

Digests are kept in memory and, given a ``cache`` folder (``<store>/data-cache`` in a job, see
orchestrator/store/layout.py), in a digest record per dataset root (``<cache>/digests/<key>.json``),
keyed by a file's content key: size, modification time and inode on local disks, size with the object
store's ETag / checksum / generation and modification time elsewhere. Reading digests of unchanged files
therefore reads no data bytes, only a listing; new or changed files are hashed in parallel (threads
here, or the caller's ``hash_files``, e.g. Ray tasks on the cluster). Records are sealed JSON
(checksummed when written, checked when read); a damaged record is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from shpeft_core import io as sio

__all__ = ["file_digests", "remember_digest", "content_key", "hash_file", "relative", "HashFiles"]

# (urls and sizes of files to hash) -> their sha256 hex digests, in order
HashFiles = Callable[[list[tuple[str, int]]], list[str]]

_MEMORY: dict[tuple, str] = {}  # (protocol, path, content key) -> sha256, for this process


def relative(path: str, root: str) -> str:
    """``path`` relative to ``root``; the file name alone when it is not under it."""
    return path[len(root) + 1 :] if path.startswith(root + "/") else path.rsplit("/", 1)[-1]


def hash_file(url: str, chunk_size: int = 1 << 20) -> str:
    """sha256 hex of one file (any fsspec URL), streamed in 1 MiB chunks."""
    import fsspec

    h = hashlib.sha256()
    with fsspec.open(url, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def _hash_in_threads(items: list[tuple[str, int]]) -> list[str]:
    if len(items) <= 1:
        return [hash_file(u) for u, _ in items]
    # hashlib and file reads release the GIL: threads hash several files at once
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, len(items))) as pool:
        return list(pool.map(hash_file, [u for u, _ in items]))


def _protocol(fs) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def content_key(info: dict) -> tuple[str, ...] | None:
    """What identifies a file's content without reading it, as strings (None when the listing gives
    nothing usable): size, modification time, the store's tag (ETag, MD5, CRC32C, generation) and inode."""
    size = info.get("size")
    tag = (info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("crc32c")
           or info.get("generation") or info.get("checksum"))
    mtime = (info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated")
             or info.get("created"))
    if size is None or (tag is None and mtime is None):
        return None
    return (str(int(size)), str(mtime), str(tag or ""), str(info.get("ino") or ""))


def _infos(fs, root: str, paths: list[str]) -> dict[str, dict]:
    """Listing details of ``paths``: one recursive listing of ``root`` when they are many, else one call each."""
    out: dict[str, dict] = {}
    if len(paths) > 16 and all(p.startswith(root + "/") for p in paths):
        wanted = set(paths)
        found = fs.find(root, detail=True)
        out = {p: i for p, i in found.items() if p in wanted}
    for p in paths:
        if p not in out:
            out[p] = fs.info(p)
    return out


def _record_uri(cache: str, fs, root: str) -> str:
    key = hashlib.sha256(f"{_protocol(fs)}\0{root}".encode()).hexdigest()[:32]
    return sio.join_uri(cache, "digests", f"{key}.json")


def _read_record(uri: str) -> dict[str, list]:
    try:
        doc = sio.read_sealed_json(uri)
    except FileNotFoundError:
        return {}
    except sio.DamagedFileError:
        return {}  # a derived cache: rebuilt from the data
    return doc.get("files") or {}


def file_digests(fs, root: str, paths: list[str], *, cache: str | None = None,
                 hash_files: HashFiles | None = None) -> dict[str, tuple[int, str]]:
    """path -> (size, sha256) for ``paths`` under ``root``, reading only files whose digest is not known.

    Known: in this process's memory, or in the digest record under ``cache`` with the same content key.
    ``hash_files`` hashes the rest (default: threads in this process)."""
    infos = _infos(fs, root, paths)
    proto = _protocol(fs)
    record_uri = _record_uri(cache, fs, root) if cache else None
    record = _read_record(record_uri) if record_uri else {}
    out: dict[str, tuple[int, str]] = {}
    todo: list[tuple[str, int]] = []
    keys: dict[str, tuple[str, ...] | None] = {}
    for p in paths:
        key = keys[p] = content_key(infos[p])
        size = int(infos[p].get("size") or 0)
        known = _MEMORY.get((proto, p, key)) if key else None
        if known is None and key is not None:
            entry = record.get(relative(p, root))
            if entry is not None and tuple(entry[:-1]) == key:
                known = entry[-1]
        if known is None:
            todo.append((p, size))
        else:
            out[p] = (size, known)
    if todo:
        items = [(fs.unstrip_protocol(p) if proto not in ("file", "local") else p, size) for p, size in todo]
        digests = (hash_files or _hash_in_threads)(items)
        for (p, size), digest in zip(todo, digests):
            out[p] = (size, digest)
    changed = False
    for p in (p for p, _ in todo):  # only new digests change the record
        key = keys[p]
        if key is None:
            continue
        _MEMORY[(proto, p, key)] = out[p][1]
        record[relative(p, root)] = [*key, out[p][1]]
        changed = True
    for p, key in keys.items():  # digests read from the record are remembered in this process too
        if key is not None:
            _MEMORY.setdefault((proto, p, key), out[p][1])
    if record_uri and changed:
        # Read-merge-write: entries another process added meanwhile are kept unless this one changed them.
        merged = {**_read_record(record_uri), **record}
        sio.write_sealed_json(record_uri, {"root": f"{proto}://{root}", "files": merged})
    return out


def remember_digest(fs, root: str, path: str, digest: str, cache: str | None = None) -> None:
    """Record the sha256 of a file this process has just written (and hashed while writing), so that
    reading it back later needs no second pass over its bytes."""
    key = content_key(fs.info(path))
    if key is None:
        return
    _MEMORY[(_protocol(fs), path, key)] = digest
    if cache:
        uri = _record_uri(cache, fs, root)
        record = _read_record(uri)
        record[relative(path, root)] = [*key, digest]
        sio.write_sealed_json(uri, {"root": f"{_protocol(fs)}://{root}", "files": record})
