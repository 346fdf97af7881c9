"""MedMNIST .npz: one archive with train/val/test_images and _labels arrays.

A split's labels are held in memory (small); its images never are: they are rows of an uncompressed
array read on demand (tasks/datacache.py), mapped from the archive itself when it stores them
uncompressed, else from a copy decompressed once into the data cache, which every process shares.
Multi-label files (ChestMNIST's 14 findings) are native multi_label tasks; ``multilabel='any'`` still
binarises them into no finding / any finding.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from fsspec.core import url_to_fs
from torch.utils.data import Dataset

from shpeft_core import io as sio

from tasks.codecs.images import DatasetError, array_to_rgb, check_pixels
from tasks.datacache import npz_member_header, npz_member_rows
from tasks.download import fetch_medmnist, medmnist_filename, medmnist_url
from ..spec import TaskSpec
from . import format_hint
from .base import DatasetFormat, SplitArrays
from .files import check_regular, find_files

__all__ = ["ArrayDataset", "MedMNISTFormat", "FORMAT", "ensure_npz"]


def _npz_uri(spec: TaskSpec) -> str:
    src = spec.source.rstrip("/")
    if src.lower().endswith(".npz"):
        return src
    name = spec.medmnist_name or spec.name
    return src + "/" + medmnist_filename(name, spec.image_size)


def ensure_npz(spec: TaskSpec) -> str:
    """The .npz to read; fetched when missing (fails at once offline, naming the file and place)."""
    src_fs, src_path = url_to_fs(spec.source)
    if src_fs.exists(src_path) and not src_fs.isdir(src_path) and not src_path.lower().endswith(".npz"):
        raise DatasetError(f"source {spec.source}: format 'medmnist' needs an .npz file{format_hint([src_path])}")
    uri = _npz_uri(spec)
    fs, path = url_to_fs(uri)
    if fs.exists(path):
        return uri
    if not spec.download:
        raise DatasetError(f"{uri}: MedMNIST file not found (download=False); put the official file there")
    name = spec.medmnist_name
    if name is None:
        stem = uri.rsplit("/", 1)[-1][: -len(".npz")]
        head, _, tail = stem.rpartition("_")
        name = head if head and tail.isdigit() else stem
    try:
        medmnist_url(name, spec.image_size)
    except DatasetError as exc:  # no official file of that size: the missing file is the news
        raise DatasetError(f"{uri}: no such file (and none to download: {exc})") from None
    fetch_medmnist(name, spec.image_size, uri)
    return uri


def _load_npz_split(spec: TaskSpec, split: str) -> tuple[tuple[int, ...], np.ndarray, str, str]:
    """(image array shape, labels, where, archive URI) of a split; its images are only looked at, not read."""
    uri = ensure_npz(spec)
    fs, path = url_to_fs(uri)
    if fs.isdir(path):
        raise DatasetError(f"{uri}: is a folder, not an .npz file{format_hint(find_files(fs, path))}")
    check_regular(fs, path)
    with fs.open(path, "rb") as f:
        head = f.read(4)
        if not head:
            raise DatasetError(f"{uri}: is empty (0 bytes); expected an .npz (zip) archive")
        if head[:2] != b"PK":
            raise DatasetError(f"{uri}: not an .npz (zip) archive{format_hint([path], exclude='medmnist')}")
        f.seek(0)
        try:
            npz = np.load(f, allow_pickle=False)
            keys = set(npz.files)
            ik, lk = f"{split}_images", f"{split}_labels"
            for k in (ik, lk):
                if k not in keys:
                    raise DatasetError(
                        f"{uri}: key '{k}' missing; the MedMNIST layout has train/val/test_images and _labels, found {sorted(keys)}"
                    )
            labels = npz[lk]
        except DatasetError:
            raise
        except Exception as e:
            raise DatasetError(f"{uri}: unreadable .npz ({type(e).__name__}: {e})") from None
    where = f"{uri}:{split}"
    try:
        shape, dtype = npz_member_header(uri, ik)
    except Exception as e:
        raise DatasetError(f"{uri}: '{ik}' unreadable ({type(e).__name__}: {e})") from None
    if shape[0] != len(labels):
        raise DatasetError(f"{uri}: '{ik}' has {shape[0]} rows but '{lk}' has {len(labels)}")
    if shape[0] == 0:
        raise DatasetError(f"{uri}: split '{split}' is empty ('{ik}' has 0 rows)")
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3)):
        raise DatasetError(f"{uri}: '{ik}' has shape {shape}; expected (N,H,W) grey or (N,H,W,3) RGB")
    if dtype != np.uint8:
        raise DatasetError(f"{uri}: '{ik}' has dtype {dtype}; MedMNIST images are uint8")
    # from the .npy header, before any image is read
    check_pixels(f"{uri}: '{ik}'", int(shape[1]) * int(shape[2]), f"each image is {shape[1]}x{shape[2]}")
    labels = _npz_labels(spec, labels, uri, lk)
    return shape, labels, where, uri


def _npz_labels(spec: TaskSpec, labels: np.ndarray, uri: str, key: str) -> np.ndarray:
    if spec.kind == "multi_label":
        if labels.ndim != 2 or labels.shape[1] != spec.num_classes:
            raise DatasetError(f"{uri}: '{key}' has shape {labels.shape}; a multi_label task with {spec.num_classes} "
                               f"findings needs (N, {spec.num_classes})")
        bad = np.flatnonzero(~np.isin(labels, (0, 1)).all(1))
        if bad.size:
            raise DatasetError(f"{uri}: '{key}' row {int(bad[0])} holds {labels[bad[0]].tolist()}; findings are 0 or 1")
        return labels.astype(np.float32)
    if labels.ndim == 2 and labels.shape[1] > 1:
        if spec.multilabel == "any":
            return (labels.astype(np.int64).sum(axis=1) > 0).astype(np.int64)
        raise DatasetError(
            f"{uri}: '{key}' is multi-label (shape {labels.shape}); set kind='multi_label' (one output per finding), "
            "or multilabel='any' to binarise into no finding / any finding"
        )
    if labels.ndim == 2:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DatasetError(f"{uri}: '{key}' has shape {labels.shape}; expected (N,1) or (N,)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{uri}: '{key}' has dtype {labels.dtype}; labels must be integers")
    labels = labels.astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= spec.num_classes))
    if bad.size:
        raise DatasetError(
            f"{uri}: '{key}' row {int(bad[0])} has label {int(labels[bad[0]])}, outside 0..{spec.num_classes - 1}"
            f" ({bad.size} such rows)"
        )
    return labels


class ArrayDataset(Dataset):
    """Map-style dataset over one split of a MedMNIST .npz; images read per item (see the module doc)."""

    def __init__(self, spec: TaskSpec, split: str, transform: Callable | None, cache: str | None = None):
        self.spec = spec
        self.split = split
        self.shape, self._labels, self._where, self._uri = _load_npz_split(spec, split)
        self._cache = cache
        self._images = None
        self.transform = transform

    @property
    def images(self):
        """The split's image rows, read on demand (prepared in the data cache on first use)."""
        if self._images is None:
            try:
                self._images = npz_member_rows(self._uri, f"{self.split}_images", self._cache)
            except DatasetError:
                raise
            except Exception as e:
                raise DatasetError(f"{self._uri}: '{self.split}_images' unreadable ({type(e).__name__}: {e})") from None
        return self._images

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def labels(self):
        """Class indices, or the [N, findings] target matrix of a multi_label task."""
        return self._labels if self.spec.kind == "multi_label" else self._labels.tolist()

    def where(self, i: int) -> str:
        return f"{self._where} row {i}"

    def load_image(self, i: int):
        return array_to_rgb(self.images[i], self.where(i))

    def iter_images(self):
        return (self.load_image(i) for i in range(len(self)))

    def __getitem__(self, i: int):
        img = self.load_image(i)
        target = self._labels[i] if self.spec.kind == "multi_label" else int(self._labels[i])
        return (self.transform(img) if self.transform else img), target


class MedMNISTFormat(DatasetFormat):
    name = "medmnist"
    aliases = ("npz",)
    hint_rank = 1
    uses_cache = True

    def claims_extension(self, ext: str) -> bool:
        return ext == ".npz"

    def build(self, spec: TaskSpec, split: str, transform: Callable | None, cache: str | None = None) -> ArrayDataset:
        return ArrayDataset(spec, split, transform, cache)

    def fingerprint_fields(self, spec: TaskSpec) -> dict:
        return {"multilabel": spec.multilabel}

    def data_files(self, spec: TaskSpec):
        fs, path = url_to_fs(ensure_npz(spec))
        return fs, path.rsplit("/", 1)[0], [path]

    def source_uri(self, task_dir: str, task_name: str) -> str:
        return sio.join_uri(task_dir, f"{task_name}.npz")

    def write(self, dest: str, data: SplitArrays, *, class_names: list[str], modality: str, name: str) -> str:
        buf = io.BytesIO()
        arrays = {}
        for split, (imgs, labels) in data.items():
            arrays[f"{split}_images"] = imgs
            arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)  # MedMNIST layout: (N,1) uint8
        np.savez_compressed(buf, **arrays)
        sio.atomic_write_bytes(dest, buf.getvalue())
        return dest


FORMAT = MedMNISTFormat()
