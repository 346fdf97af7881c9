"""Datasets, loaders, fingerprints and validation for every task format.

All formats yield ``(PIL RGB image, label)`` before the transform, so one transform (from the
backbone's timm data config) serves them all. Loaders shard by rank/world_size themselves and
reshuffle deterministically every epoch from ``seed``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import fsspec
import numpy as np
import torch
from fsspec.core import url_to_fs
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from .dicom import decode_dicom, is_dicom_bytes
from .images import DICOM_EXTENSIONS, IMAGE_EXTENSIONS, DatasetError, array_to_rgb, decode_image
from .medmnist import fetch_medmnist, medmnist_filename
from .spec import SPLITS, TaskSpec

__all__ = [
    "DatasetError",
    "DatasetReport",
    "TaskLoader",
    "build_dataset",
    "build_loader",
    "check_dataset",
    "dataset_fingerprint",
    "default_transform",
    "transform_for",
]

_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


# ---------------------------------------------------------------- transforms


class _ToTensorRGB:
    """PIL RGB -> float [3,H,W] in [0,1], optionally resized (a picklable default transform)."""

    def __init__(self, size: int | None = None):
        self.size = size

    def __call__(self, img):
        if self.size is not None and img.size != (self.size, self.size):
            from PIL import Image

            img = img.resize((self.size, self.size), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def default_transform(spec: TaskSpec) -> Callable:
    """No normalisation; resize to ``spec.image_size`` when it is set."""
    return _ToTensorRGB(spec.image_size)


def transform_for(model_or_data_config, *, train: bool, **overrides) -> Callable:
    """The backbone's own preprocessing via timm.data.resolve_data_config / create_transform.

    Accepts a timm model, a data-config dict (input_size, mean, std, interpolation, crop_pct)
    or an int image size. Training defaults are mild for medical images: random resized crop
    with scale (0.6, 1), no flip, no colour jitter; ``overrides`` go to create_transform.
    """
    from timm.data import create_transform, resolve_data_config

    if isinstance(model_or_data_config, torch.nn.Module):
        from shpeft_core.backbone import unwrap

        # DDP / Ray Train wrap the model; the data config lives on the inner timm model
        model = unwrap(model_or_data_config)
        cfg = dict(resolve_data_config(model=model))
        # timm keeps the pretrained config's input size (160 for test_vit) even when the model was
        # built with another img_size; the patch embedding knows the size it really takes.
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is not None:
            size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
            if tuple(cfg["input_size"][1:]) != size:
                cfg["input_size"] = (cfg["input_size"][0], *size)
                cfg["crop_pct"] = 1.0  # no centre-crop margin at a training-sized input
    elif isinstance(model_or_data_config, int):
        cfg = resolve_data_config(args={"input_size": (3, model_or_data_config, model_or_data_config)})
    elif isinstance(model_or_data_config, dict):
        cfg = resolve_data_config(args=dict(model_or_data_config))
    else:
        raise TypeError(f"transform_for: expected a timm model, a data-config dict or an int, got {type(model_or_data_config).__name__}")
    kwargs = dict(
        input_size=cfg["input_size"],
        interpolation=cfg.get("interpolation", "bilinear"),
        mean=cfg["mean"],
        std=cfg["std"],
        crop_pct=cfg.get("crop_pct"),
        crop_mode=cfg.get("crop_mode"),
    )
    if train:
        # No horizontal flip: left/right carries meaning in medical images (laterality, lesion side).
        kwargs.update(scale=(0.6, 1.0), hflip=0.0, color_jitter=None)
    kwargs.update(overrides)
    return create_transform(is_training=train, **kwargs)


# ---------------------------------------------------------------- listing helpers


def _fs(spec_or_uri) -> tuple[fsspec.AbstractFileSystem, str]:
    uri = spec_or_uri.source if isinstance(spec_or_uri, TaskSpec) else spec_or_uri
    return url_to_fs(uri)


def _ext(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return "." + base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _describe_files(paths: list[str]) -> str:
    exts = Counter(_ext(p) or "(no extension)" for p in paths)
    return ", ".join(f"{n} x {e}" for e, n in exts.most_common(5)) or "nothing"


def _format_hint(paths: list[str]) -> str:
    exts = Counter(_ext(p) for p in paths)
    for fmt, test in (
        ("parquet", lambda e: e == ".parquet"),
        ("medmnist", lambda e: e == ".npz"),
        ("dicom", lambda e: e in DICOM_EXTENSIONS),
        ("imagefolder", lambda e: e in IMAGE_EXTENSIONS),
    ):
        if any(test(e) for e in exts):
            return f"; it holds {_describe_files(paths)}: try --format {fmt}"
    return f"; it holds {_describe_files(paths)}"


def _find_files(fs, root: str) -> list[str]:
    if not fs.exists(root):
        raise DatasetError(f"source {root}: does not exist")
    if not fs.isdir(root):
        return [root]
    return sorted(p for p in fs.find(root) if not p.rsplit("/", 1)[-1].startswith("."))


def _check_inside(fs, root: str, path: str) -> None:
    """Refuse files that resolve outside the dataset root (symlinks, '..')."""
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if proto in ("file", "local"):
        real_root = os.path.realpath(root)
        real = os.path.realpath(path)
        if os.path.commonpath([real_root, real]) != real_root:
            raise DatasetError(f"{path}: resolves to {real}, outside the dataset folder {root}")
    elif ".." in path.split("/"):
        raise DatasetError(f"{path}: path contains '..' and escapes the dataset folder {root}")


def _stable_u(seed: int, key: str, n: int) -> np.ndarray:
    """n uniforms that depend only on (seed, key): the seeded split survives re-listing and re-ordering."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little")).random(n)


def _assign_by_ratio(u: np.ndarray, ratio: tuple[float, float, float]) -> np.ndarray:
    """Uniforms -> split index 0/1/2 by cumulative ratio."""
    return np.searchsorted(np.cumsum(ratio)[:2], u, side="right").astype(np.int8)


# ---------------------------------------------------------------- image / DICOM folders


@dataclass
class _Tree:
    root: str
    class_names: list[str]
    items: dict[str, list[tuple[str, int]]]  # split -> [(path, label)]
    has_splits: bool
    ignored: list[str] = field(default_factory=list)  # files of other types under the root


def _list_tree(spec: TaskSpec) -> _Tree:
    fs, root = _fs(spec)
    root = root.rstrip("/")
    files = _find_files(fs, root)
    if files == [root]:
        raise DatasetError(f"source {spec.source}: is a file, but format '{spec.format}' needs a folder{_format_hint(files)}")
    if spec.format == "dicom":
        accepted = [p for p in files if _ext(p) in DICOM_EXTENSIONS or (_ext(p) == "" and _looks_dicom(fs, p))]
        kind = "DICOM (.dcm/.dicom or extensionless with a DICM preamble)"
    else:
        accepted = [p for p in files if _ext(p) in IMAGE_EXTENSIONS]
        kind = f"image ({'/'.join(IMAGE_EXTENSIONS)})"
    if not accepted:
        raise DatasetError(f"source {spec.source}: no {kind} files found{_format_hint(files)}")

    rels = []
    for p in accepted:
        _check_inside(fs, root, p)
        rel = p[len(root) + 1 :]
        parts = rel.split("/")
        if len(parts) < 2:
            raise DatasetError(f"{p}: file directly under the root; expected <root>/<class>/file or <root>/<split>/<class>/file")
        rels.append((p, parts))
    tops = {parts[0] for _, parts in rels}
    has_splits = tops <= set(_SPLIT_ALIASES) and "train" in {_SPLIT_ALIASES[t] for t in tops}
    if not has_splits and tops & set(_SPLIT_ALIASES) and len(tops & set(_SPLIT_ALIASES)) == len(tops):
        raise DatasetError(f"source {spec.source}: split folders {sorted(tops)} but no 'train' folder")

    entries = []  # (path, split or None, class folder)
    for p, parts in rels:
        if has_splits:
            if len(parts) < 3:
                raise DatasetError(f"{p}: expected <root>/<split>/<class>/file")
            entries.append((p, _SPLIT_ALIASES[parts[0]], parts[1]))
        else:
            entries.append((p, None, parts[0]))

    folders = sorted({c for _, _, c in entries})
    if spec.class_names is not None:
        unknown = [c for c in folders if c not in spec.class_names]
        if unknown:
            raise DatasetError(f"source {spec.source}: class folder(s) {unknown} are not in class_names {spec.class_names}")
        names = list(spec.class_names)
    else:
        if len(folders) != spec.num_classes:
            raise DatasetError(
                f"source {spec.source}: found {len(folders)} class folders {folders} but num_classes={spec.num_classes}"
            )
        names = folders
    index = {c: i for i, c in enumerate(names)}
    per_class = Counter(c for _, _, c in entries)
    for c in names:
        if per_class[c] == 0:
            raise DatasetError(f"source {spec.source}: class '{c}' (class_names) has no images")

    items: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    if has_splits:
        for p, s, c in entries:
            items[s].append((p, index[c]))
    else:
        # Stratified seeded split: within a class, files are ordered by a hash of (seed, relative path)
        # and cut by ratio, so adding a file moves at most the files at the cut points.
        by_class: dict[int, list[str]] = {}
        for p, _, c in entries:
            by_class.setdefault(index[c], []).append(p)
        for label, paths in sorted(by_class.items()):
            paths.sort()
            keys = [hashlib.sha256(f"{spec.split_seed}\0{p[len(root) + 1 :]}".encode()).digest() for p in paths]
            order = sorted(range(len(paths)), key=keys.__getitem__)
            n = len(paths)
            n_val = int(round(n * spec.split_ratio[1]))
            n_test = int(round(n * spec.split_ratio[2]))
            if n >= 3:
                n_val, n_test = max(1, n_val), max(1, n_test)
            n_train = max(n - n_val - n_test, 1 if n else 0)
            n_val = min(n_val, n - n_train)
            n_test = n - n_train - n_val
            bounds = [("train", 0, n_train), ("val", n_train, n_train + n_val), ("test", n_train + n_val, n)]
            for s, a, b in bounds:
                items[s].extend((paths[i], label) for i in order[a:b])
        for s in SPLITS:
            items[s].sort()
    accepted_set = set(accepted)
    ignored = [p for p in files if p not in accepted_set]
    return _Tree(root=root, class_names=names, items=items, has_splits=has_splits, ignored=ignored)


def _looks_dicom(fs, path: str) -> bool:
    with fs.open(path, "rb") as f:
        return is_dicom_bytes(f.read(132))


class FileImageDataset(Dataset):
    """Map-style dataset over image or DICOM files; labels from folder names."""

    def __init__(self, spec: TaskSpec, split: str, transform: Callable | None, tree: _Tree | None = None):
        tree = tree or _list_tree(spec)
        self.spec = spec
        self.split = split
        self.items = tree.items[split]
        self.class_names = tree.class_names
        self.transform = transform
        self._fs = None
        if not self.items:
            raise DatasetError(f"source {spec.source}: split '{split}' is empty")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[int]:
        return [lab for _, lab in self.items]

    def load_image(self, i: int):
        if self._fs is None:  # opened lazily so the dataset pickles into worker processes
            self._fs = _fs(self.spec)[0]
        path = self.items[i][0]
        with self._fs.open(path, "rb") as f:
            data = f.read()
        if self.spec.format == "dicom":
            return decode_dicom(data, path, self.spec.window)
        return decode_image(data, path)

    def where(self, i: int) -> str:
        return self.items[i][0]

    def __getitem__(self, i: int):
        img = self.load_image(i)
        return (self.transform(img) if self.transform else img), self.items[i][1]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fs"] = None
        return state


# ---------------------------------------------------------------- MedMNIST .npz


def _npz_uri(spec: TaskSpec) -> str:
    src = spec.source.rstrip("/")
    if src.lower().endswith(".npz"):
        return src
    name = spec.medmnist_name or spec.name
    return src + "/" + medmnist_filename(name, spec.image_size)


def _ensure_npz(spec: TaskSpec) -> str:
    """The .npz to read; fetched when missing (fails at once offline, naming the file and place)."""
    src_fs, src_path = url_to_fs(spec.source)
    if src_fs.exists(src_path) and not src_fs.isdir(src_path) and not src_path.lower().endswith(".npz"):
        raise DatasetError(f"source {spec.source}: format 'medmnist' needs an .npz file{_format_hint([src_path])}")
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
    fetch_medmnist(name, spec.image_size, uri)
    return uri


def _load_npz_split(spec: TaskSpec, split: str) -> tuple[np.ndarray, np.ndarray, str]:
    uri = _ensure_npz(spec)
    fs, path = url_to_fs(uri)
    if fs.isdir(path):
        raise DatasetError(f"{uri}: is a folder, not an .npz file{_format_hint(_find_files(fs, path))}")
    with fs.open(path, "rb") as f:
        head = f.read(4)
        if head[:2] != b"PK":
            raise DatasetError(f"{uri}: not an .npz (zip) archive{_format_hint([path])}")
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
            images, labels = npz[ik], npz[lk]
        except DatasetError:
            raise
        except Exception as e:
            raise DatasetError(f"{uri}: unreadable .npz ({type(e).__name__}: {e})") from None
    where = f"{uri}:{split}"
    if len(images) != len(labels):
        raise DatasetError(f"{uri}: '{ik}' has {len(images)} rows but '{lk}' has {len(labels)}")
    if len(images) == 0:
        raise DatasetError(f"{uri}: split '{split}' is empty ('{ik}' has 0 rows)")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DatasetError(f"{uri}: '{ik}' has shape {images.shape}; expected (N,H,W) grey or (N,H,W,3) RGB")
    if images.dtype != np.uint8:
        raise DatasetError(f"{uri}: '{ik}' has dtype {images.dtype}; MedMNIST images are uint8")
    labels = _npz_labels(spec, labels, uri, lk)
    return images, labels, where


def _npz_labels(spec: TaskSpec, labels: np.ndarray, uri: str, key: str) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] > 1:
        if spec.multilabel == "any":
            return (labels.astype(np.int64).sum(axis=1) > 0).astype(np.int64)
        raise DatasetError(
            f"{uri}: '{key}' is multi-label (shape {labels.shape}); single-label tasks only. "
            "Set multilabel='any' to binarise into no finding / any finding"
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
    """Map-style dataset over one split of a MedMNIST .npz (held in memory)."""

    def __init__(self, spec: TaskSpec, split: str, transform: Callable | None):
        self.spec = spec
        self.split = split
        self.images, labels, self._where = _load_npz_split(spec, split)
        self._labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def labels(self) -> list[int]:
        return self._labels.tolist()

    def where(self, i: int) -> str:
        return f"{self._where} row {i}"

    def load_image(self, i: int):
        return array_to_rgb(self.images[i], self.where(i))

    def __getitem__(self, i: int):
        img = self.load_image(i)
        return (self.transform(img) if self.transform else img), int(self._labels[i])


# ---------------------------------------------------------------- Parquet shards


@dataclass
class _Unit:
    path: str
    row_group: int
    rows: np.ndarray  # row numbers inside the row group that belong to the split


def _parquet_files(spec: TaskSpec) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
    fs, root = _fs(spec)
    files = _find_files(fs, root.rstrip("/"))
    shards = [p for p in files if _ext(p) == ".parquet"]
    if not shards:
        raise DatasetError(f"source {spec.source}: no .parquet files found{_format_hint(files)}")
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
        rel = path[len(root) + 1 :] if path.startswith(root + "/") else path.rsplit("/", 1)[-1]
        try:
            n_groups = frag.metadata.num_row_groups
        except Exception as e:
            raise DatasetError(f"{path}: unreadable Parquet footer ({type(e).__name__}: {e})") from None
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
                    s = _SPLIT_ALIASES.get(str(v).lower()) if v is not None else None
                    if s is None:
                        raise DatasetError(f"{path}: row group {g} row {i}: {spec.split_column}={v!r} is not train/val/test")
                    split_idx[i] = SPLITS.index(s)
            else:
                split_idx = _assign_by_ratio(_stable_u(spec.split_seed, f"{rel}#{g}", len(labels)), spec.split_ratio)
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
        pa_fs = _pa_filesystem(_fs(self.spec)[0])
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
                    if not isinstance(data, (bytes, bytearray)):
                        if isinstance(data, dict) and "bytes" in data:  # HF datasets' Image feature
                            data = data["bytes"]
                        else:
                            raise DatasetError(f"{where}: column '{self.spec.image_column}' holds {type(data).__name__}, not image bytes")
                    yield decode_image(data, where), int(lab), where
                k += 1

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


# ---------------------------------------------------------------- public: datasets and loaders


def build_dataset(spec: TaskSpec, split: str, transform: Callable | None = None):
    """The split of ``spec`` as a Dataset (npz, folders) or IterableDataset (Parquet).

    Items are ``(transform(PIL RGB image), int label)``; with ``transform=None`` the PIL image itself.
    """
    if split not in SPLITS:
        raise DatasetError(f"split={split!r} must be one of {SPLITS}")
    if spec.format == "medmnist":
        return ArrayDataset(spec, split, transform)
    if spec.format in ("imagefolder", "dicom"):
        return FileImageDataset(spec, split, transform)
    if spec.format == "parquet":
        return ParquetStream(spec, split, transform)
    raise DatasetError(f"format={spec.format!r} is not supported")  # unreachable: TaskSpec validates


class ShardSampler(Sampler[int]):
    """Seeded per-epoch permutation, split across ranks like DistributedSampler (padding by wrap)."""

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int, world_size: int, drop_last: bool):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.world_size
        return math.ceil(self.n / self.world_size)

    def __iter__(self):
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        else:
            order = np.arange(self.n)
        per = len(self)
        total = per * self.world_size
        if total > self.n:
            order = np.resize(order, total)  # wraps around
        return iter(order[self.rank : total : self.world_size].tolist())


class TaskLoader(DataLoader):
    """A DataLoader that moves to the next epoch's order every time it is iterated.

    ``set_epoch(e)`` jumps to a given epoch (e.g. after resuming from a checkpoint).
    """

    def __init__(self, *args, shard: ShardSampler | ParquetStream, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self._shard = shard
        self._seed = seed
        self._next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = epoch

    def __iter__(self):
        from shpeft_core.train import epoch_seed

        self._shard.set_epoch(self._next_epoch)
        # Worker processes seed their own `random`/torch RNGs (and so the augmentation) from this
        # generator: reseed it per epoch so epoch e draws the same whether or not epochs ran before it.
        self.generator.manual_seed(epoch_seed(self._seed, self._next_epoch))
        self._next_epoch += 1
        return super().__iter__()


def build_loader(
    spec: TaskSpec,
    split: str,
    *,
    transform: Callable | None,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> TaskLoader:
    """A loader of ``(images float [B,3,H,W], labels long [B])`` for this rank's shard.

    Every rank gets the same number of samples (the shortest ranks repeat a few from the start),
    so DDP ranks stay in step. ``transform=None`` uses :func:`default_transform`.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in 0..world_size-1 (world_size={world_size})")
    transform = transform or default_transform(spec)
    ds = build_dataset(spec, split, transform)
    generator = torch.Generator().manual_seed(seed)
    common = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        pin_memory=False,
    )
    if isinstance(ds, ParquetStream):
        # the epoch travels inside the dataset copy, so Parquet workers restart every epoch
        ds.configure(shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
        return TaskLoader(ds, shard=ds, seed=seed, persistent_workers=False, **common)
    sampler = ShardSampler(len(ds), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, drop_last=False)
    # Workers are started per epoch, not kept: a worker seeds its augmentation RNGs once, when it starts,
    # so only fresh workers make epoch e's crops a function of (seed, e), as an exact resume needs.
    return TaskLoader(ds, sampler=sampler, shard=sampler, seed=seed, persistent_workers=False, **common)


# ---------------------------------------------------------------- fingerprint


_DIGEST_CACHE: dict[tuple, str] = {}


def _file_digest(fs, path: str) -> tuple[int, str]:
    """sha256 of one file, streamed in 1 MiB chunks; cached in-process by (path, size, mtime)."""
    info = fs.info(path)
    size = int(info.get("size") or 0)
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created")
    key = (fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0], path, size, str(mtime))
    if mtime is not None and key in _DIGEST_CACHE:
        return size, _DIGEST_CACHE[key]
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    if mtime is not None:
        _DIGEST_CACHE[key] = digest
    return size, digest


def _fingerprint_fields(spec: TaskSpec) -> dict:
    fields = {"format": spec.format, "num_classes": spec.num_classes, "class_names": spec.class_names}
    if spec.format in ("imagefolder", "dicom", "parquet"):
        fields.update(split_ratio=list(spec.split_ratio), split_seed=spec.split_seed)
    if spec.format == "parquet":
        fields.update(image_column=spec.image_column, label_column=spec.label_column, split_column=spec.split_column)
    if spec.format == "medmnist":
        fields.update(multilabel=spec.multilabel)
    if spec.format == "dicom":
        fields.update(window=list(spec.window) if spec.window else None)
    return fields


def dataset_fingerprint(spec: TaskSpec) -> str:
    """sha256 hex over the data files' bytes and relative paths plus the spec fields that change
    what the loader yields (format, classes, split rule, columns, window). Not the name, modality,
    metric or image_size of the task, and not the source prefix: a copied dataset keeps its fingerprint."""
    h = hashlib.sha256()
    h.update(b"shpeft-dataset-v1\0")
    h.update(json.dumps(_fingerprint_fields(spec), sort_keys=True).encode())
    if spec.format == "medmnist":
        uri = _ensure_npz(spec)
        fs, path = url_to_fs(uri)
        paths, root = [path], path.rsplit("/", 1)[0]
    elif spec.format == "parquet":
        fs, root, paths = _parquet_files(spec)
    else:
        tree = _list_tree(spec)
        fs, root = _fs(spec)[0], tree.root
        paths = sorted(p for s in SPLITS for p, _ in tree.items[s])
    for p in paths:
        size, digest = _file_digest(fs, p)
        rel = p[len(root) + 1 :] if p.startswith(root + "/") else p.rsplit("/", 1)[-1]
        h.update(f"\0{rel}\0{size}\0{digest}".encode())
    return h.hexdigest()


# ---------------------------------------------------------------- validation


@dataclass
class DatasetReport:
    """What check_dataset saw: counts per split and class, label range, image sizes and modes."""

    name: str
    format: str
    source: str
    class_names: list[str]
    counts: dict[str, list[int]]  # split -> images per class
    label_range: tuple[int, int]
    image_sizes: dict[str, int] = field(default_factory=dict)  # "WxH" -> count (decoded images)
    modes: dict[str, int] = field(default_factory=dict)  # source mode (Pillow mode; DICOM Modality/Photometric) -> count
    fingerprint: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(sum(c) for c in self.counts.values())

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "format": self.format,
            "source": self.source,
            "class_names": self.class_names,
            "counts": self.counts,
            "label_range": list(self.label_range),
            "image_sizes": self.image_sizes,
            "modes": self.modes,
            "fingerprint": self.fingerprint,
            "warnings": self.warnings,
        }


def check_dataset(spec: TaskSpec, *, decode: bool = True, fingerprint: bool = True) -> DatasetReport:
    """Read every split (and decode every image when ``decode``); raise DatasetError at the first problem.

    Checks: unreadable/truncated images, labels outside 0..num_classes-1, classes without images,
    empty splits, mismatched npz arrays, a format that does not match the files, paths that escape
    the dataset folder.
    """
    counts: dict[str, list[int]] = {}
    sizes: Counter = Counter()
    modes: Counter = Counter()
    names = spec.names()
    tree = _list_tree(spec) if spec.format in ("imagefolder", "dicom") else None
    if tree is not None:
        names = tree.class_names
    lo, hi = spec.num_classes, -1
    for split in SPLITS:
        ds = FileImageDataset(spec, split, None, tree) if tree is not None else build_dataset(spec, split, None)
        per = [0] * spec.num_classes
        if isinstance(ds, ParquetStream):
            for img, lab, _ in ds.iter_raw() if decode else ():
                sizes[f"{img.size[0]}x{img.size[1]}"] += 1
                modes[img.info.get("source_mode", img.mode)] += 1
            for lab, n in ds.class_counts.items():
                per[lab] += n
        else:
            labels = ds.labels
            for lab in labels:
                per[lab] += 1
            if decode:
                for i in range(len(ds)):
                    img = ds.load_image(i)
                    sizes[f"{img.size[0]}x{img.size[1]}"] += 1
                    modes[img.info.get("source_mode", img.mode)] += 1
        counts[split] = per
        present = [k for k, n in enumerate(per) if n]
        lo, hi = min(lo, min(present)), max(hi, max(present))
    for k, n in enumerate(counts["train"]):
        if n == 0:
            raise DatasetError(f"source {spec.source}: class {k} ('{names[k]}') has no images in split 'train'")
    for k in range(spec.num_classes):
        if sum(counts[s][k] for s in SPLITS) == 0:
            raise DatasetError(f"source {spec.source}: class {k} ('{names[k]}') has no images")
    warnings = [
        f"class {k} ('{names[k]}') has no images in split '{s}'"
        for s in ("val", "test")
        for k, n in enumerate(counts[s])
        if n == 0
    ]
    if tree is not None and tree.ignored:
        warnings.append(f"ignored {len(tree.ignored)} file(s) of other types ({_describe_files(tree.ignored)}), e.g. {tree.ignored[0]}")
    return DatasetReport(
        name=spec.name,
        format=spec.format,
        source=spec.source,
        class_names=list(names),
        counts=counts,
        label_range=(lo, hi),
        image_sizes=dict(sizes.most_common()),
        modes=dict(modes.most_common()),
        fingerprint=dataset_fingerprint(spec) if fingerprint else "",
        warnings=warnings,
    )
