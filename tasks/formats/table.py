"""A label table plus an image root: how CheXpert, ChestX-ray14, ISIC, APTOS and most medical sets ship.

The table (CSV, TSV or Parquet, on any fsspec storage) names each image and its label: a label column
(class index or name), one-hot columns, one column per finding (1 / 0 / -1 uncertain / blank), or a
separator-joined findings column; optionally a split column, split lists or one table per split, and a
group column (patient / study) so that drawn splits keep a group together. The layout is
``TaskSpec.table`` (tasks/spec.py); reading it is tasks/formats/label_table.py.

Invariants: images are decoded only when an item is read (any Pillow format, or DICOM by extension or
preamble), so a rank holds the index (paths and targets), never pixels; a path resolves inside the image
root (symlinks checked when the file is opened) and is a regular file unless URLs are allowed; items are ``(image, target)``
with an int class for single_label / ordinal and a float32 vector (1 / 0 / NaN unknown) for multi_label.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from torch.utils.data import Dataset

from shpeft_core import io as sio

from tasks.codecs.dicom import decode_dicom, is_dicom_bytes
from tasks.codecs.images import DICOM_EXTENSIONS, DatasetError, decode_image, encode_png
from ..spec import SPLITS, TaskSpec
from .base import DatasetFormat, SplitArrays, Survey
from .files import check_inside, check_regular, ext, find_files, source_fs
from .label_table import TABLE_EXTENSIONS, TableIndex, index_table, table_location

__all__ = ["TableImageDataset", "TableFormat", "FORMAT", "cached_index"]

_CACHE: dict[tuple, TableIndex] = {}  # the last table read in this process (val and test reuse train's read)


def cached_index(spec: TaskSpec) -> TableIndex:
    """The task's table index, re-read when the spec or a table file (size, modification time) changed."""
    fs, _, tables = table_location(spec)
    stamp = []
    for path in tables.values():
        info = fs.info(path)
        stamp.append((path, info.get("size"), str(info.get("mtime") or info.get("LastModified") or info.get("ETag"))))
    key = (spec.model_dump_json(), tuple(stamp))
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = index_table(spec)
    return _CACHE[key]


class TableImageDataset(Dataset):
    """Map-style dataset over one split of a label table; each image is read and decoded on access."""

    def __init__(self, spec: TaskSpec, split: str, transform: Callable | None, index: TableIndex | None = None):
        index = index or cached_index(spec)
        rows = np.flatnonzero(index.split == SPLITS.index(split))
        if rows.size == 0:
            raise DatasetError(f"source {spec.source}: split '{split}' is empty")
        self.spec, self.split, self.transform = spec, split, transform
        self.image_root = index.image_root
        self.paths = index.paths[rows]
        self.targets = index.targets[rows]
        self._index_files = index.table_files
        self._origin = np.asarray([index.origin[int(r)] for r in rows], dtype=np.int64)
        self._fs = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labels(self) -> list:
        """Class indices (single_label, ordinal) or the [N, findings] target matrix (multi_label)."""
        return self.targets if self.spec.kind == "multi_label" else self.targets.tolist()

    def where(self, i: int) -> str:
        t, r = (int(v) for v in self._origin[i])
        f = self._index_files[t]
        return f"{f} line {r + 2}" if ext(f) != ".parquet" else f"{f} row {r}"

    def read_bytes(self, i: int) -> bytes:
        path = self.paths[i]
        try:
            if "://" in path:  # allowed URLs only (label_table refuses them otherwise)
                import fsspec

                with fsspec.open(path, "rb") as f:
                    return f.read()
            if self._fs is None:  # opened lazily so the dataset pickles into worker processes
                self._fs = source_fs(self.spec)[0]
            check_inside(self._fs, self.image_root, path)
            check_regular(self._fs, path)  # a FIFO or device would block the reader
            with self._fs.open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise DatasetError(f"{self.where(i)}: image {path} not found") from None
        except IsADirectoryError:
            raise DatasetError(f"{self.where(i)}: {path} is a folder, not an image") from None

    def load_image(self, i: int):
        data = self.read_bytes(i)
        where = f"{self.paths[i]} ({self.where(i)})"
        if ext(self.paths[i]) in DICOM_EXTENSIONS or is_dicom_bytes(data[:132]):
            return decode_dicom(data, where, self.spec.window)
        return decode_image(data, where)

    def iter_images(self):
        return (self.load_image(i) for i in range(len(self)))

    def __getitem__(self, i: int):
        img = self.load_image(i)
        target = self.targets[i] if self.spec.kind == "multi_label" else int(self.targets[i])
        return (self.transform(img) if self.transform else img), target

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fs"] = None
        return state


def missing_files(spec: TaskSpec, index: TableIndex) -> list[int]:
    """Rows whose image file is not under the image root (one listing of the root, no file opened)."""
    fs, _ = source_fs(spec)
    present = set(find_files(fs, index.image_root)) if fs.isdir(index.image_root) else set()
    return [i for i, p in enumerate(index.paths.tolist()) if "://" not in p and p not in present]


class TableFormat(DatasetFormat):
    name = "table"
    aliases = ("csv",)
    hint_rank = 4

    def claims_extension(self, ext: str) -> bool:
        return ext in TABLE_EXTENSIONS

    def build(self, spec: TaskSpec, split: str, transform: Callable | None) -> TableImageDataset:
        return TableImageDataset(spec, split, transform)

    def fingerprint_fields(self, spec: TaskSpec) -> dict:
        return {"split_ratio": list(spec.split_ratio), "split_seed": spec.split_seed,
                "table": spec.layout.model_dump(mode="json"), "window": list(spec.window) if spec.window else None}

    def data_files(self, spec: TaskSpec):
        index = cached_index(spec)
        images = sorted({p for p in index.paths.tolist() if "://" not in p})
        return source_fs(spec)[0], index.root, list(index.table_files) + images

    def survey(self, spec: TaskSpec) -> Survey:
        index = index_table(spec)
        missing = missing_files(spec, index)
        if missing:
            shown = "; ".join(f"{index.where(i)}: {index.paths[i]}" for i in missing[:3])
            raise DatasetError(f"{len(missing)} of {len(index.paths)} rows name image files that are missing: {shown}")
        warnings = []
        crossing = index.crossing_groups()
        if crossing:
            warnings.append(f"{len(crossing)} group(s) have images in more than one split (the table's own splits), "
                            f"e.g. {crossing[:3]}: their images can inflate validation and test metrics")
        groups = {s: int(len(set(index.groups[index.split == k].tolist()))) for k, s in enumerate(SPLITS)}
        return Survey(class_names=spec.names(), warnings=warnings, groups=groups,
                      dataset=lambda split: TableImageDataset(spec, split, None, index))

    def source_uri(self, task_dir: str, task_name: str) -> str:
        return sio.join_uri(task_dir, "table", "labels.csv")

    def write(self, dest: str, data: SplitArrays, *, class_names: list[str], modality: str, name: str) -> str:
        """``dest`` is the table's URI: images go to ``images/<split>/<i>.png`` beside it, and the table holds
        path, label (class name) and split columns."""
        import csv

        folder = dest.rsplit("/", 1)[0]
        buf = io.StringIO()
        out = csv.writer(buf, lineterminator="\n")
        out.writerow(["path", "label", "split"])
        for split, (imgs, labels) in data.items():
            for i, (img, lab) in enumerate(zip(imgs, labels)):
                rel = f"images/{split}/{i:05d}.png"
                sio.atomic_write_bytes(sio.join_uri(folder, rel), encode_png(img))
                out.writerow([rel, class_names[int(lab)], split])
        sio.atomic_write_bytes(dest, buf.getvalue().encode())
        return dest


FORMAT = TableFormat()
