"""Folders of image files: <root>/<class>/file (seeded stratified split) or <root>/<split>/<class>/file.

:class:`ImageFolderFormat` also carries the folder listing the DICOM format reuses; a subclass changes
which files count (:meth:`~ImageFolderFormat.accepts`) and how they decode (:meth:`~ImageFolderFormat.decode`).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from torch.utils.data import Dataset

from shpeft_core import io as sio

from tasks.codecs.images import IMAGE_EXTENSIONS, DatasetError, decode_image, encode_png
from ..spec import SPLITS, TaskSpec, check_path_component
from . import format_hint
from .base import DatasetFormat, SplitArrays, Survey
from .files import SPLIT_ALIASES, check_inside, ext, find_files, source_fs

__all__ = ["FileImageDataset", "ImageFolderFormat", "FORMAT"]


@dataclass
class _Tree:
    root: str
    class_names: list[str]
    items: dict[str, list[tuple[str, int]]]  # split -> [(path, label)]
    has_splits: bool
    ignored: list[str] = field(default_factory=list)  # files of other types under the root


class FileImageDataset(Dataset):
    """Map-style dataset over the files of one split; labels from folder names."""

    def __init__(self, fmt: ImageFolderFormat, spec: TaskSpec, split: str, transform: Callable | None,
                 tree: _Tree | None = None):
        tree = tree or fmt.list_tree(spec)
        self.format = fmt
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
            self._fs = source_fs(self.spec)[0]
        path = self.items[i][0]
        with self._fs.open(path, "rb") as f:
            data = f.read()
        return self.format.decode(data, path, self.spec)

    def where(self, i: int) -> str:
        return self.items[i][0]

    def iter_images(self):
        return (self.load_image(i) for i in range(len(self)))

    def __getitem__(self, i: int):
        img = self.load_image(i)
        return (self.transform(img) if self.transform else img), self.items[i][1]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fs"] = None
        return state


class ImageFolderFormat(DatasetFormat):
    name = "imagefolder"
    hint_rank = 3
    kind = f"image ({'/'.join(IMAGE_EXTENSIONS)})"  # what the "no ... files found" error says it looked for

    def claims_extension(self, ext: str) -> bool:
        return ext in IMAGE_EXTENSIONS

    def accepts(self, fs, path: str) -> bool:
        """Whether a file under the root is one of this format's images (others are ignored, and reported)."""
        return ext(path) in IMAGE_EXTENSIONS

    def decode(self, data: bytes, path: str, spec: TaskSpec):
        return decode_image(data, path)

    def build(self, spec: TaskSpec, split: str, transform: Callable | None) -> FileImageDataset:
        return FileImageDataset(self, spec, split, transform)

    def fingerprint_fields(self, spec: TaskSpec) -> dict:
        return {"split_ratio": list(spec.split_ratio), "split_seed": spec.split_seed}

    def data_files(self, spec: TaskSpec):
        tree = self.list_tree(spec)
        return source_fs(spec)[0], tree.root, sorted(p for s in SPLITS for p, _ in tree.items[s])

    def layout_classes(self, spec: TaskSpec) -> list[str]:
        return self.list_tree(spec).class_names

    def survey(self, spec: TaskSpec) -> Survey:
        tree = self.list_tree(spec)
        return Survey(class_names=tree.class_names, ignored=tree.ignored,
                      dataset=lambda split: FileImageDataset(self, spec, split, None, tree))

    def write(self, dest: str, data: SplitArrays, *, class_names: list[str], modality: str, name: str) -> str:
        for split, (imgs, labels) in data.items():
            for i, (img, lab) in enumerate(zip(imgs, labels)):
                sio.atomic_write_bytes(sio.join_uri(dest, split, class_names[lab], f"{i:05d}.png"), encode_png(img))
        return dest

    def list_tree(self, spec: TaskSpec) -> _Tree:
        """Every accepted file under the source with its split and label (folder names); checks the layout."""
        fs, root = source_fs(spec)
        root = root.rstrip("/")
        files = find_files(fs, root)
        if files == [root]:
            raise DatasetError(f"source {spec.source}: is a file, but format '{spec.format}' needs a folder{format_hint(files)}")
        accepted = [p for p in files if self.accepts(fs, p)]
        if not accepted:
            raise DatasetError(f"source {spec.source}: no {self.kind} files found{format_hint(files)}")

        rels = []
        for p in accepted:
            check_inside(fs, root, p)
            rel = p[len(root) + 1 :]
            parts = rel.split("/")
            if len(parts) < 2:
                raise DatasetError(f"{p}: file directly under the root; expected <root>/<class>/file or <root>/<split>/<class>/file")
            rels.append((p, parts))
        tops = {parts[0] for _, parts in rels}
        has_splits = tops <= set(SPLIT_ALIASES) and "train" in {SPLIT_ALIASES[t] for t in tops}
        if not has_splits and tops & set(SPLIT_ALIASES) and len(tops & set(SPLIT_ALIASES)) == len(tops):
            raise DatasetError(f"source {spec.source}: split folders {sorted(tops)} but no 'train' folder")

        entries = []  # (path, split or None, class folder)
        for p, parts in rels:
            if has_splits:
                if len(parts) < 3:
                    raise DatasetError(f"{p}: expected <root>/<split>/<class>/file")
                entries.append((p, SPLIT_ALIASES[parts[0]], parts[1]))
            else:
                entries.append((p, None, parts[0]))

        folders = sorted({c for _, _, c in entries})
        if spec.class_names is not None:
            unknown = [c for c in folders if c not in spec.class_names]
            if unknown:
                raise DatasetError(f"source {spec.source}: class folder(s) {unknown} are not in class_names {spec.class_names}")
            names = list(spec.class_names)
        else:
            # No class_names: the class folders, sorted, are the classes (as torchvision's ImageFolder).
            if spec.num_classes is not None and len(folders) != spec.num_classes:
                raise DatasetError(
                    f"source {spec.source}: found {len(folders)} class folders {folders} but num_classes="
                    f"{spec.num_classes}; leave num_classes out to use the folders as they are")
            if len(folders) < 2:
                raise DatasetError(f"source {spec.source}: found {len(folders)} class folder {folders}; a "
                                   "classification task needs at least 2")
            for i, c in enumerate(folders):
                try:
                    check_path_component(c, f"class folder {i}")
                except ValueError as exc:
                    raise DatasetError(f"source {spec.source}: {exc}") from None
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


FORMAT = ImageFolderFormat()
