"""Listing a dataset source on any fsspec filesystem: files under a root, path safety, seeded splits."""

from __future__ import annotations

import hashlib
import os
from collections import Counter

import fsspec
import numpy as np
from fsspec.core import url_to_fs

from tasks.codecs.images import DatasetError
from ..spec import TaskSpec

__all__ = ["SPLIT_ALIASES", "source_fs", "ext", "describe_files", "find_files", "check_inside", "relative",
           "stable_uniforms", "assign_by_ratio"]

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


def find_files(fs, root: str) -> list[str]:
    """Every file under ``root`` (hidden names skipped), sorted; ``[root]`` when it is a file."""
    if not fs.exists(root):
        raise DatasetError(f"source {root}: does not exist")
    if not fs.isdir(root):
        return [root]
    return sorted(p for p in fs.find(root) if not p.rsplit("/", 1)[-1].startswith("."))


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
