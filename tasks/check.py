"""Dataset validation: read (and decode) every split, report counts and sizes, fail at the first problem.

Counts are images per class and split; for a multi_label task, images with each finding present (and with
it unknown) per split, plus the images per split. Formats with groups (patients) report groups per split
and groups that cross splits.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tasks.fingerprint import dataset_fingerprint
from tasks.formats import get_format
from tasks.formats.files import describe_files
from tasks.codecs.images import DatasetError
from tasks.spec import SPLITS, TaskSpec

__all__ = ["DatasetReport", "check_dataset"]


@dataclass
class DatasetReport:
    """What check_dataset saw: counts per split and class, label range, image sizes and modes."""

    name: str
    format: str
    source: str
    class_names: list[str]
    counts: dict[str, list[int]]  # split -> images per class; multi_label: images with each finding present
    label_range: tuple[int, int]
    kind: str = "single_label"
    images: dict[str, int] = field(default_factory=dict)  # split -> images
    unknown: dict[str, list[int]] = field(default_factory=dict)  # multi_label: split -> images with each finding unknown
    groups: dict[str, int] = field(default_factory=dict)  # split -> distinct groups (patients), where there are groups
    image_sizes: dict[str, int] = field(default_factory=dict)  # "WxH" -> count (decoded images)
    modes: dict[str, int] = field(default_factory=dict)  # source mode (Pillow mode; DICOM Modality/Photometric) -> count
    fingerprint: str = ""
    warnings: list[str] = field(default_factory=list)
    classes_inferred: bool = False  # num_classes and class_names came from the layout, not the spec

    @property
    def total(self) -> int:
        return sum(self.images.values()) if self.images else sum(sum(c) for c in self.counts.values())

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "format": self.format,
            "source": self.source,
            "class_names": self.class_names,
            "kind": self.kind,
            "counts": self.counts,
            "images": self.images,
            "unknown": self.unknown,
            "groups": self.groups,
            "label_range": list(self.label_range),
            "image_sizes": self.image_sizes,
            "modes": self.modes,
            "fingerprint": self.fingerprint,
            "warnings": self.warnings,
            "num_classes": len(self.class_names),
            "classes_inferred": self.classes_inferred,
        }


def check_dataset(spec: TaskSpec, *, decode: bool = True, fingerprint: bool = True) -> DatasetReport:
    """Read every split (and decode every image when ``decode``); raise DatasetError at the first problem.

    Checks: unreadable/truncated images, labels outside 0..num_classes-1, classes without images,
    empty splits, mismatched npz arrays, a format that does not match the files, paths that escape
    the dataset folder. A spec that leaves its classes to the layout (ImageFolder, DICOM folders) gets
    them from there (``tasks.classes``), and the report says so.
    """
    from tasks.classes import resolve_classes
    from tasks.formats import CLASSES_FROM_LAYOUT

    inferred = spec.class_names is None and spec.format in CLASSES_FROM_LAYOUT  # names from the folders
    spec = resolve_classes(spec)
    counts: dict[str, list[int]] = {}
    images: dict[str, int] = {}
    unknown: dict[str, list[int]] = {}
    sizes: Counter = Counter()
    modes: Counter = Counter()
    survey = get_format(spec.format).survey(spec)
    names = survey.class_names
    lo, hi = spec.num_classes, -1
    for split in SPLITS:
        ds = survey.dataset(split)
        if spec.kind == "multi_label":
            targets = np.asarray(ds.labels, dtype=np.float64).reshape(-1, spec.num_classes)
            per = [int(v) for v in (targets == 1).sum(0)]
            unknown[split] = [int(v) for v in np.isnan(targets).sum(0)]
            images[split] = int(targets.shape[0])
        else:
            per = [0] * spec.num_classes
            for lab in ds.labels:
                per[lab] += 1
            images[split] = sum(per)
        if decode:
            for img in ds.iter_images():
                sizes[f"{img.size[0]}x{img.size[1]}"] += 1
                modes[img.info.get("source_mode", img.mode)] += 1
        counts[split] = per
        present = [k for k, n in enumerate(per) if n]
        if present:
            lo, hi = min(lo, min(present)), max(hi, max(present))
    what = "finding" if spec.kind == "multi_label" else "class"
    cases = "positive images" if spec.kind == "multi_label" else "images"
    for k, n in enumerate(counts["train"]):
        if n == 0:
            raise DatasetError(f"source {spec.source}: {what} {k} ('{names[k]}') has no {cases} in split 'train'")
    warnings = [
        f"{what} {k} ('{names[k]}') has no {cases} in split '{s}'"
        for s in ("val", "test")
        for k, n in enumerate(counts[s])
        if n == 0
    ]
    warnings += survey.warnings
    if survey.ignored:
        warnings.append(f"ignored {len(survey.ignored)} file(s) of other types ({describe_files(survey.ignored)}), e.g. {survey.ignored[0]}")
    return DatasetReport(
        name=spec.name,
        format=spec.format,
        source=spec.source,
        class_names=list(names),
        counts=counts,
        label_range=(lo, hi),
        kind=spec.kind,
        images=images,
        unknown=unknown,
        groups=dict(survey.groups or {}),
        image_sizes=dict(sizes.most_common()),
        modes=dict(modes.most_common()),
        fingerprint=dataset_fingerprint(spec) if fingerprint else "",
        warnings=warnings,
        classes_inferred=inferred,
    )
