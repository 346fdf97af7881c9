"""Listing a dataset source on any fsspec filesystem: files under a root, path safety, seeded splits.

Invariants: every listed file is a regular file (a FIFO, device or socket, which a reader would block on
or never finish, is refused when listing, so ``validate`` sees it too) with a UTF-8 name; a path taken
from data (a Parquet cell) is read only when it resolves inside its allowed root (``resolve_data_path``),
and URLs in data only when the user opts in. Errors about a refused path never say whether it exists.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
from collections import Counter

import fsspec
import numpy as np
from fsspec.core import url_to_fs

from tasks.codecs.images import DatasetError
from ..spec import TaskSpec

__all__ = ["SPLIT_ALIASES", "source_fs", "ext", "describe_files", "find_files", "check_inside", "check_regular",
           "resolve_data_path", "printable", "relative", "stable_uniforms", "assign_by_ratio"]

# folder names / split-column values accepted for each split
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def source_fs(spec_or_uri: TaskSpec | str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) of a spec's source or of a URI."""
    uri = spec_or_uri.source if isinstance(spec_or_uri, TaskSpec) else spec_or_uri
    return url_to_fs(uri)


def ext(path: str) -> str:
    """Lower-case extension with its dot, '' when the file name has none."""
    base = path.rsplit("/", 1)[-1]
    return "." + base.rsplit(".", 1)[-1].lower() if "." in base else ""


def describe_files(paths: list[str]) -> str:
    exts = Counter(ext(p) or "(no extension)" for p in paths)
    return ", ".join(f"{n} x {e}" for e, n in exts.most_common(5)) or "nothing"


def printable(path: str) -> str:
    """``path`` as it can be printed: bytes that are not UTF-8 (kept by Python as surrogates) shown as U+FFFD."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _is_local(fs) -> bool:
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return proto in ("file", "local")


def _kind(path: str) -> str:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "not a regular file (a broken link?)"
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(fs, path: str) -> None:
    """DatasetError naming ``path`` unless it is a regular file (local files: symlinks followed)."""
    if not _is_local(fs):
        return
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DatasetError(f"{printable(path)}: does not exist") from None
    if not stat.S_ISREG(mode):
        raise DatasetError(f"{printable(path)}: is {_kind(path)}, not a regular file; only regular files are read")


def _check_listed(path: str, info: dict) -> None:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise DatasetError(f"{printable(path)}: file name is not valid UTF-8; rename it") from None
    if info.get("type") not in ("file", "directory"):  # LocalFileSystem: "other" for FIFOs, devices, sockets, links
        try:
            regular = stat.S_ISREG(os.stat(path).st_mode)  # a link counts as what it points to
        except OSError:
            regular = False
        if not regular:
            raise DatasetError(f"{printable(path)}: is {_kind(path)}, not a regular file; only regular files are read")


def find_files(fs, root: str) -> list[str]:
    """Every file under ``root`` (hidden names skipped), sorted; ``[root]`` when it is a file. DatasetError
    for a file that is not a regular file or whose name is not UTF-8."""
    if not fs.exists(root):
        raise DatasetError(f"source {printable(root)}: does not exist")
    if not fs.isdir(root):
        check_regular(fs, root)
        return [root]
    found = fs.find(root, detail=True)
    out = []
    for p, info in found.items():
        if p.rsplit("/", 1)[-1].startswith("."):
            continue
        _check_listed(p, info)
        out.append(p)
    return sorted(out)


def resolve_data_path(fs, root: str, value: str, *, where: str, allow_urls: bool = False) -> str:
    """The URI to read for a path found in data (e.g. a Parquet cell), or DatasetError naming ``where``.

    A relative path resolves against ``root`` (a path on ``fs``); the result must stay inside ``root``
    (on local disk after resolving symlinks), so '..', absolute paths and links cannot reach other files.
    A URL (``scheme://``) is refused unless ``allow_urls``. The messages say only that the path is not
    allowed, never whether the file it names exists.
    """
    text = printable(str(value))
    if "://" in value or value.startswith("//"):
        if not allow_urls:
            raise DatasetError(f"{where}: {text!r} is a URL; URLs in data are read only with --allow-urls")
        return value
    base = root.rstrip("/") or "/"
    if _is_local(fs):
        target = value if os.path.isabs(value) else os.path.join(base, value)
        real_root, real = os.path.realpath(base), os.path.realpath(target)
        if os.path.commonpath([real_root, real]) != real_root:
            raise DatasetError(f"{where}: {text!r} is outside the data root {printable(base)}; only files under it are read")
        return real
    target = value if value.startswith("/") else posixpath.join(base, value)
    norm = posixpath.normpath(target)
    if norm != base and not norm.startswith(base.rstrip("/") + "/"):
        raise DatasetError(f"{where}: {text!r} is outside the data root {printable(base)}; only files under it are read")
    return fs.unstrip_protocol(norm)


def check_inside(fs, root: str, path: str) -> None:
    """Refuse files that resolve outside the dataset root (symlinks, '..')."""
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if proto in ("file", "local"):
        real_root = os.path.realpath(root)
        real = os.path.realpath(path)
        if os.path.commonpath([real_root, real]) != real_root:
            raise DatasetError(f"{path}: resolves to {real}, outside the dataset folder {root}")
    elif ".." in path.split("/"):
        raise DatasetError(f"{path}: path contains '..' and escapes the dataset folder {root}")


def relative(path: str, root: str) -> str:
    """``path`` relative to ``root``; the file name alone when it is not under it."""
    return path[len(root) + 1 :] if path.startswith(root + "/") else path.rsplit("/", 1)[-1]


def stable_uniforms(seed: int, key: str, n: int) -> np.ndarray:
    """n uniforms that depend only on (seed, key): the seeded split survives re-listing and re-ordering."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little")).random(n)


def assign_by_ratio(u: np.ndarray, ratio: tuple[float, float, float]) -> np.ndarray:
    """Uniforms -> split index 0/1/2 by cumulative ratio."""
    return np.searchsorted(np.cumsum(ratio)[:2], u, side="right").astype(np.int8)
