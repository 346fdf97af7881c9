"""The interface every dataset format implements (see ``tasks/formats/__init__.py`` for the registry).

A format's datasets yield ``(transform(PIL RGB image), target)`` (the PIL image itself when the
transform is None); the target is an int class for single_label and ordinal tasks and a float32 vector
(1 / 0 / NaN unknown) per image for multi_label ones (shpeft_core.objectives). They have ``labels`` (the
split's class indices, a sorted multiset for streams; the [N, findings] target matrix for multi_label) and
``iter_images()`` (every image decoded, for validation). Map-style datasets also have ``load_image(i)`` and
``where(i)`` and are sharded by the loader's sampler; an ``IterableDataset`` shards itself and has
``configure(shuffle=, seed=, rank=, world_size=)``, ``set_epoch(epoch)`` and a per-rank ``__len__``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import fsspec
import numpy as np

from shpeft_core import io as sio

from ..spec import TaskSpec

__all__ = ["DatasetFormat", "Survey", "SplitArrays"]

# split -> (images uint8 [N,H,W] grey or [N,H,W,3] RGB, labels int [N]): what the synthetic generator writes
SplitArrays = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass
class Survey:
    """What validation reads: the class names as found, each split's dataset, files it skipped."""

    class_names: list[str]
    dataset: Callable[[str], object]  # split -> the split's dataset, without transform
    ignored: list[str] = field(default_factory=list)  # files of other types under the source
    warnings: list[str] = field(default_factory=list)  # what the format noticed (e.g. groups crossing splits)
    groups: dict[str, int] | None = None  # split -> distinct groups (patients), where the format has groups


class DatasetFormat:
    """One on-disk dataset format; subclasses set ``name`` and implement the methods below."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()  # other names write_task accepts (e.g. 'npz')
    hint_rank: ClassVar[int] = 100  # order among "try --format X" hints: the most specific file type first
    keeps_splits: ClassVar[bool] = True  # write() keeps the given splits (else the loader's seeded split applies)
    uses_cache: ClassVar[bool] = False  # build() takes cache= (the data cache folder, tasks/datacache.py)

    def claims_extension(self, ext: str) -> bool:
        """Whether files with this extension (e.g. '.png') look like this format, for error hints."""
        raise NotImplementedError

    def build(self, spec: TaskSpec, split: str, transform: Callable | None):
        """The split's Dataset or self-sharding IterableDataset; DatasetError names any bad file, row or field."""
        raise NotImplementedError

    def fingerprint_fields(self, spec: TaskSpec) -> dict:
        """The spec fields, beyond format and classes, that change what this format's loader yields."""
        return {}

    def data_files(self, spec: TaskSpec) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
        """(filesystem, root, files) whose bytes and paths relative to root the fingerprint covers."""
        raise NotImplementedError

    def layout_classes(self, spec: TaskSpec) -> list[str]:
        """The class names the source's layout shows (in label order), checked against the spec's
        ``num_classes`` / ``class_names`` where given; only formats in ``CLASSES_FROM_LAYOUT`` have them."""
        raise NotImplementedError(f"format {self.name!r} does not show its classes without reading the labels")

    def survey(self, spec: TaskSpec) -> Survey:
        """What check_dataset reads; formats that list their source once for all splits override it."""
        return Survey(class_names=spec.names(), dataset=lambda split: self.build(spec, split, None))

    def source_uri(self, task_dir: str, task_name: str) -> str:
        """Where the synthetic generator puts a task's data inside its folder."""
        return sio.join_uri(task_dir, self.name)

    def write(self, dest: str, data: SplitArrays, *, class_names: list[str], modality: str, name: str) -> str:
        """Write ``data`` at ``dest`` in this format (atomic per file); returns ``dest``."""
        raise NotImplementedError
