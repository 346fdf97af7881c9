"""Arrays read on demand: an .npz split's images as an uncompressed .npy that every rank maps, not copies.

A MedMNIST .npz holds each split's images as one (usually compressed) member. Loading it puts the whole
split in each process's private memory; instead each image array is read row by row from an
uncompressed C-order .npy:

- a member the archive stores uncompressed (``np.savez``) on local disk is mapped where it lies;
- otherwise it is decompressed once, streaming, into the data cache:
  ``<cache>/arrays/<sha256 of the .npz>/<member>.npy`` beside ``<member>.npy.json`` (its shape, dtype,
  data offset and sha256; sealed JSON written after the array). The cache is content-addressed, so
  every run, task and seed that reads the same archive shares one copy, and a rank maps it read-only:
  the page cache holds the bytes once for all processes on a node, and the kernel can drop them.

A prepared array is used when its sidecar verifies and the array's digest, known by its content key
(tasks/digests.py: size, modification time, inode) or else recomputed, matches the sidecar;
otherwise it is prepared again. On storage without local paths, rows are fetched with ranged reads.
The cache location is passed in (a job's is ``<store>/data-cache``, orchestrator/store/layout.py);
without one, :func:`default_cache` is a folder on this machine.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np
from fsspec.core import url_to_fs

from shpeft_core import io as sio

from .codecs.images import DatasetError
from .digests import file_digests, remember_digest

__all__ = ["NpyRows", "default_cache", "npz_member_rows", "npz_member_header"]


def default_cache() -> str:
    """This machine's data cache: $SHPEFT_DATA_CACHE, else data-cache/ under $SHPEFT_CACHE_DIR or ~/.cache/shpeft."""
    base = os.environ.get("SHPEFT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "shpeft")
    return os.environ.get("SHPEFT_DATA_CACHE") or os.path.join(base, "data-cache")


class NpyRows:
    """Rows of a C-order array stored at ``offset`` of a file, read on demand (memory-mapped when local)."""

    def __init__(self, uri: str, shape: tuple[int, ...], dtype: str, offset: int):
        self.uri, self.shape, self.dtype, self.offset = uri, tuple(shape), np.dtype(dtype), int(offset)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.local = sio.local_path(uri)  # None: not on local disk, read by ranges
        self._map = None
        self._file = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.shape[0]:
            raise IndexError(f"row {i} of {self.shape[0]}")
        if self.local is not None:
            if self._map is None:  # opened per process: the mapping is not pickled into workers
                self._map = np.memmap(self.local, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
            return np.asarray(self._map[i])
        if self._file is None:
            fs, path = url_to_fs(self.uri)
            self._file = fs.open(path, "rb")
        self._file.seek(self.offset + i * self.row_bytes)
        data = self._file.read(self.row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape(self.shape[1:])

    def __getstate__(self):
        return {**self.__dict__, "_map": None, "_file": None}


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _stored_member(path: str, info: zipfile.ZipInfo) -> NpyRows | None:
    """A member stored uncompressed in a local archive, viewed where it lies (None when it cannot be)."""
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
        if head[:4] != b"PK\x03\x04":
            return None
        start = info.header_offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little")
        f.seek(start)
        shape, fortran, dtype = _npy_header(f)
        if fortran or dtype.hasobject:
            return None
        return NpyRows(path, shape, dtype.str, f.tell())


def _prepared(cache: str, digest: str, member: str) -> NpyRows | None:
    """The prepared array when its sidecar and content verify, else None."""
    uri = sio.join_uri(cache, "arrays", digest, f"{member}.npy")
    side = uri + ".json"
    try:
        meta = sio.read_sealed_json(side)
    except (FileNotFoundError, sio.DamagedFileError):
        return None
    fs, path = url_to_fs(uri)
    if not fs.exists(path):
        return None
    root = path.rsplit("/", 1)[0]
    (_, got), = file_digests(fs, root, [path], cache=cache).values()
    if got != meta.get("sha256"):
        return None
    return NpyRows(uri, tuple(meta["shape"]), meta["dtype"], int(meta["offset"]))


def _prepare(npz_uri: str, member: str, cache: str, digest: str) -> NpyRows:
    """Decompress one member into the cache, streaming (memory: one chunk); sidecar written last."""
    uri = sio.join_uri(cache, "arrays", digest, f"{member}.npy")
    fs, npz_path = url_to_fs(npz_uri)
    with fs.open(npz_path, "rb") as raw, zipfile.ZipFile(raw) as zf:
        with zf.open(f"{member}.npy") as f:
            shape, fortran, dtype = _npy_header(f)
            if fortran or dtype.hasobject:
                raise DatasetError(f"{npz_uri}: '{member}' is not a plain C-order array ({dtype}, fortran={fortran})")
            offset = f.tell()
        with zf.open(f"{member}.npy") as f:
            sha, size = sio.atomic_write_stream(uri, iter(lambda: f.read(1 << 22), b""))
    out_fs, path = url_to_fs(uri)
    remember_digest(out_fs, path.rsplit("/", 1)[0], path, sha, cache)
    sio.write_sealed_json(uri + ".json", {"source_sha256": digest, "member": member, "shape": list(shape),
                                          "dtype": dtype.str, "offset": offset, "bytes": size, "sha256": sha})
    return NpyRows(uri, shape, dtype.str, offset)


def npz_member_header(npz_uri: str, member: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of an archive member, from its first bytes (nothing else is decompressed)."""
    fs, path = url_to_fs(npz_uri)
    with fs.open(path, "rb") as raw, zipfile.ZipFile(raw) as zf, zf.open(f"{member}.npy") as f:
        shape, _, dtype = _npy_header(f)
    return tuple(shape), dtype


def npz_member_rows(npz_uri: str, member: str, cache: str | None = None) -> NpyRows:
    """Member ``member`` (e.g. 'train_images') of the archive at ``npz_uri`` as rows read on demand."""
    fs, path = url_to_fs(npz_uri)
    with fs.open(path, "rb") as raw, zipfile.ZipFile(raw) as zf:
        info = zf.getinfo(f"{member}.npy")
    local = sio.local_path(npz_uri)
    if local is not None:
        rows = _stored_member(local, info)
        if rows is not None:
            return rows
    cache = cache or default_cache()
    root = path.rsplit("/", 1)[0]
    (_, digest), = file_digests(fs, root, [path], cache=cache).values()
    return _prepared(cache, digest, member) or _prepare(npz_uri, member, cache, digest)
