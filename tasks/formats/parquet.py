"""Parquet shards (image bytes + label, optional split column), streamed by row group.

pyarrow is imported on first use; a dataset larger than memory works.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from shpeft_core import io as sio

from tasks.codecs.images import DatasetError, decode_image, encode_png
from ..spec import SPLITS, TaskSpec
from . import format_hint
from .base import DatasetFormat, SplitArrays
from .files import SPLIT_ALIASES, assign_by_ratio, ext, find_files, relative, source_fs, stable_uniforms

__all__ = ["ParquetStream", "ParquetFormat", "FORMAT"]


@dataclass
class _Unit:
    path: str
    row_group: int
    rows: np.ndarray  # row numbers inside the row group that belong to the split


def _parquet_files(spec: TaskSpec) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
    fs, root = source_fs(spec)
    files = find_files(fs, root.rstrip("/"))
    shards = [p for p in files if ext(p) == ".parquet"]
    if not shards:
        raise DatasetError(f"source {spec.source}: no .parquet files found{format_hint(files)}")
    return fs, root.rstrip("/"), shards


def _pa_filesystem(fs):
    import pyarrow.fs as pafs

    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _row_group_fragment(pa_fs, path: str, row_group: int):
    import pyarrow.dataset as pds

    return pds.ParquetFileFormat().make_fragment(path, filesystem=pa_fs, row_groups=[row_group])


def _index_parquet(spec: TaskSpec, split: str) -> tuple[list[_Unit], Counter]:
    """One pass over the label/split columns only: which rows of each row group are in ``split``."""
    import pyarrow.dataset as pds

    fs, root, shards = _parquet_files(spec)
    pa_fs = _pa_filesystem(fs)
    try:
        dataset = pds.dataset(shards, format="parquet", filesystem=pa_fs)
        schema = dataset.schema
    except Exception as e:
        raise DatasetError(f"source {spec.source}: unreadable Parquet ({type(e).__name__}: {e})") from None
    names = set(schema.names)
    for field_name, col in (("image_column", spec.image_column), ("label_column", spec.label_column)):
        if col not in names:
            raise DatasetError(f"source {spec.source}: column '{col}' ({field_name}) missing; columns are {sorted(names)}")
    use_split_col = spec.split_column is not None and spec.split_column in names
    # The default name 'split' is optional (seeded split when absent); any other name must exist.
    # (model_fields_set is not used: a spec round-tripped through JSON marks every field as set.)
    if spec.split_column is not None and not use_split_col and spec.split_column != "split":
        raise DatasetError(f"source {spec.source}: column '{spec.split_column}' (split_column) missing; columns are {sorted(names)}")
    cols = [spec.label_column] + ([spec.split_column] if use_split_col else [])
    want = SPLITS.index(split)
    units: list[_Unit] = []
    counts: Counter = Counter()
    for frag in dataset.get_fragments():
        path = frag.path
        rel = relative(path, root)
        try:
            n_groups = frag.metadata.num_row_groups
            have = set(frag.physical_schema.names)
        except Exception as e:
            raise DatasetError(f"{path}: unreadable Parquet footer ({type(e).__name__}: {e})") from None
        for field_name, col in (("image_column", spec.image_column), ("label_column", spec.label_column)):
            if col not in have:  # the dataset's schema is the first file's: check every file's own
                raise DatasetError(f"{path}: column '{col}' ({field_name}) missing; columns are {sorted(have)}")
        for g in range(n_groups):
            try:
                table = _row_group_fragment(pa_fs, path, g).to_table(columns=cols)
            except Exception as e:
                raise DatasetError(f"{path}: row group {g} unreadable ({type(e).__name__}: {e})") from None
            labels = _parquet_labels(spec, table.column(spec.label_column).to_pylist(), path, g)
            if use_split_col:
                raw = table.column(spec.split_column).to_pylist()
                split_idx = np.empty(len(raw), dtype=np.int8)
                for i, v in enumerate(raw):
                    s = SPLIT_ALIASES.get(str(v).lower()) if v is not None else None
                    if s is None:
                        raise DatasetError(f"{path}: row group {g} row {i}: {spec.split_column}={v!r} is not train/val/test")
                    split_idx[i] = SPLITS.index(s)
            else:
                split_idx = assign_by_ratio(stable_uniforms(spec.split_seed, f"{rel}#{g}", len(labels)), spec.split_ratio)
            rows = np.flatnonzero(split_idx == want)
            if rows.size == 0:
                continue
            lab = labels[rows]
            bad = np.flatnonzero((lab < 0) | (lab >= spec.num_classes))
            if bad.size:
                r = int(rows[bad[0]])
                raise DatasetError(
                    f"{path}: row group {g} row {r}: {spec.label_column}={int(labels[r])} is outside 0..{spec.num_classes - 1}"
                )
            counts.update(lab.tolist())
            units.append(_Unit(path, g, rows.astype(np.int64)))
    if not units:
        raise DatasetError(f"source {spec.source}: split '{split}' is empty")
    return units, counts


def _parquet_labels(spec: TaskSpec, values: list, path: str, group: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Integer labels, or class names mapped through ``spec.class_names``; a bad value names its row."""
    out = np.empty(len(values), dtype=np.int64)
    index = {n: i for i, n in enumerate(spec.class_names or [])}
    for i, v in enumerate(values):
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            out[i] = v
        elif isinstance(v, str) and v in index:
            out[i] = index[v]
        else:
            r = int(rows[i]) if rows is not None else i
            want = "an integer label" + (f" or one of class_names {spec.class_names}" if spec.class_names else "")
            raise DatasetError(f"{path}: row group {group} row {r}: {spec.label_column}={v!r} is not {want}")
    return out


class ParquetStream(IterableDataset):
    """Streams Parquet row groups (image bytes + label), so a dataset larger than memory works.

    Each epoch the row groups are permuted (seeded), the split's rows are laid end to end and cut
    into equal contiguous ranges per rank (wrapping so every rank gets the same count), then per
    DataLoader worker; a seeded shuffle buffer mixes rows inside each range.
    """

    def __init__(self, spec: TaskSpec, split: str, transform: Callable | None):
        self.spec = spec
        self.split = split
        self.transform = transform
        self.units, self.class_counts = _index_parquet(spec, split)
        self.total = sum(len(u.rows) for u in self.units)
        self.shuffle = False
        self.seed = 0
        self.epoch = 0
        self.rank = 0
        self.world_size = 1

    def configure(self, *, shuffle: bool, seed: int, rank: int, world_size: int) -> None:
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def labels(self) -> list[int]:
        """The split's labels as a sorted multiset (stream order depends on rank, worker and epoch)."""
        return [lab for lab, n in sorted(self.class_counts.items()) for _ in range(n)]

    def per_rank(self) -> int:
        return math.ceil(self.total / self.world_size)

    def __len__(self) -> int:
        return self.per_rank()

    def _ranges(self, worker: int, num_workers: int) -> list[tuple[int, int]]:
        per = self.per_rank()
        start = self.rank * per
        w_per = math.ceil(per / num_workers)
        a = start + min(worker * w_per, per)
        b = start + min((worker + 1) * w_per, per)
        out = []
        while a < b:  # wrap around the end of the stream
            lo = a % self.total
            hi = min(lo + (b - a), self.total)
            out.append((lo, hi))
            a += hi - lo
        return out

    def iter_raw(self, worker: int = 0, num_workers: int = 1) -> Iterator[tuple[object, int, str]]:
        """(PIL image, label, 'file row-group row') for this rank and worker, in epoch order."""
        import pyarrow as pa

        order = list(range(len(self.units)))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.units)).tolist()
        sizes = np.array([len(self.units[i].rows) for i in order])
        starts = np.concatenate([[0], np.cumsum(sizes)])
        pa_fs = _pa_filesystem(source_fs(self.spec)[0])
        cols = [self.spec.image_column, self.spec.label_column]
        for lo, hi in self._ranges(worker, num_workers):
            k = int(np.searchsorted(starts, lo, side="right") - 1)
            while k < len(order) and starts[k] < hi:
                unit = self.units[order[k]]
                a, b = max(lo, starts[k]) - starts[k], min(hi, starts[k + 1]) - starts[k]
                rows = unit.rows[a:b]
                try:
                    table = _row_group_fragment(pa_fs, unit.path, unit.row_group).to_table(columns=cols)
                    table = table.take(pa.array(rows))
                except Exception as e:
                    raise DatasetError(f"{unit.path}: row group {unit.row_group} unreadable ({type(e).__name__}: {e})") from None
                images = table.column(self.spec.image_column).to_pylist()
                labels = _parquet_labels(self.spec, table.column(self.spec.label_column).to_pylist(), unit.path, unit.row_group, rows)
                for r, data, lab in zip(rows.tolist(), images, labels):
                    where = f"{unit.path}: row group {unit.row_group} row {r}"
                    if isinstance(data, dict) and "bytes" in data:  # HF datasets' Image feature
                        data = data["bytes"]
                    if not isinstance(data, (bytes, bytearray)):
                        # A path in the data is never followed: the dataset must hold the image bytes.
                        what = "no image bytes" if data is None else f"{type(data).__name__}, not image bytes"
                        raise DatasetError(f"{where}: column '{self.spec.image_column}' holds {what}")
                    yield decode_image(data, where), int(lab), where
                k += 1

    def iter_images(self):
        return (img for img, _, _ in self.iter_raw())

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        raw = self.iter_raw(worker, num_workers)
        if self.shuffle:
            raw = _shuffle_buffer(raw, self.spec.shuffle_buffer, [self.seed, self.epoch, self.rank, worker])
        for img, lab, _ in raw:
            yield (self.transform(img) if self.transform else img), lab


def _shuffle_buffer(it: Iterator, size: int, seed) -> Iterator:
    rng = np.random.default_rng(seed)
    buf = []
    for x in it:
        if len(buf) < size:
            buf.append(x)
            continue
        j = int(rng.integers(size))
        buf[j], x = x, buf[j]
        yield x
    rng.shuffle(buf)
    yield from buf


class ParquetFormat(DatasetFormat):
    name = "parquet"
    hint_rank = 0

    def claims_extension(self, ext: str) -> bool:
        return ext == ".parquet"

    def build(self, spec: TaskSpec, split: str, transform: Callable | None) -> ParquetStream:
        return ParquetStream(spec, split, transform)

    def fingerprint_fields(self, spec: TaskSpec) -> dict:
        return {"split_ratio": list(spec.split_ratio), "split_seed": spec.split_seed, "image_column": spec.image_column,
                "label_column": spec.label_column, "split_column": spec.split_column}

    def data_files(self, spec: TaskSpec):
        return _parquet_files(spec)

    def write(self, dest: str, data: SplitArrays, *, class_names: list[str], modality: str, name: str,
              rows_per_group: int = 64, shards: int = 2) -> str:
        import pyarrow as pa
        import pyarrow.parquet as pq

        images, labels, splits = [], [], []
        for split, (imgs, labs) in data.items():
            images += [encode_png(im) for im in imgs]
            labels += labs.tolist()
            splits += [split] * len(labs)
        order = np.random.default_rng(len(images)).permutation(len(images))  # mix splits across shards
        per = int(np.ceil(len(order) / shards))
        for s in range(shards):
            idx = order[s * per : (s + 1) * per]
            table = pa.table(
                {
                    "image": pa.array([images[i] for i in idx], type=pa.binary()),
                    "label": pa.array([labels[i] for i in idx], type=pa.int64()),
                    "split": pa.array([splits[i] for i in idx], type=pa.string()),
                }
            )
            buf = io.BytesIO()
            pq.write_table(table, buf, row_group_size=rows_per_group)
            sio.atomic_write_bytes(sio.join_uri(dest, f"part-{s:05d}.parquet"), buf.getvalue())
        return dest


FORMAT = ParquetFormat()
