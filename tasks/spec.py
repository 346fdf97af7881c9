"""TaskSpec: what a classification task is and where its images live.

``num_classes`` follows from ``class_names`` when only they are given; formats whose classes show in
their layout (``tasks.formats.CLASSES_FROM_LAYOUT``: folders) may leave both out, and
``tasks.classes.resolve_classes`` fills them in from the source before anything trains on the spec."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .formats import CLASSES_FROM_LAYOUT, FORMATS

__all__ = ["TaskSpec", "FORMATS", "METRICS", "SPLITS", "check_slug", "check_path_component"]

METRICS = ("macro_f1", "accuracy", "auc")
SPLITS = ("train", "val", "test")

_SLUG = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_slug(value: str, field: str = "name") -> str:
    """A slug cannot contain separators or dots, so it can never escape the folder it names."""
    if not isinstance(value, str) or not _SLUG.fullmatch(value):
        raise ValueError(
            f"{field}={value!r} must be 1-64 characters from letters, digits, '-' and '_'"
        )
    return value


def check_path_component(value: str, field: str) -> str:
    """A name used as one folder or column value: no separators, no '.'/'..', no control chars."""
    if (
        not value
        or value in (".", "..")
        or "/" in value
        or "\\" in value
        or any(ord(c) < 32 for c in value)
    ):
        raise ValueError(f"{field}={value!r} is not a usable folder name (empty, '.', '..', a separator or a control character)")
    return value


class TaskSpec(BaseModel):
    """One image classification task.

    ``channels`` describes the source images; loaders always return 3-channel tensors.
    ``split_ratio`` and ``split_seed`` apply only where the source has no splits of its own.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    source: str = Field(min_length=1)
    format: Literal[FORMATS]  # the registered formats (tasks.formats), in registry order
    num_classes: int | None = Field(default=None, ge=2)  # None: from the layout (CLASSES_FROM_LAYOUT formats)
    class_names: list[str] | None = None
    modality: str = "unknown"
    split_ratio: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_seed: int = 0
    channels: Literal[1, 3] = 3
    image_size: int | None = Field(default=None, ge=1)
    metric: Literal["macro_f1", "accuracy", "auc"] = "macro_f1"
    # parquet
    image_column: str = "image"
    label_column: str = "label"
    split_column: str | None = "split"
    shuffle_buffer: int = Field(default=1024, ge=1)
    # medmnist
    medmnist_name: str | None = None
    download: bool = True
    multilabel: Literal["error", "any"] = "error"
    # dicom: (center, width) applied to modality values; None -> the file's VOI LUT/window, else min-max
    window: tuple[float, float] | None = None
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name_is_slug(cls, v: str) -> str:
        return check_slug(v, "name")

    @field_validator("medmnist_name")
    @classmethod
    def _medmnist_name_is_slug(cls, v: str | None) -> str | None:
        return None if v is None else check_slug(v, "medmnist_name")

    @field_validator("source")
    @classmethod
    def _source_has_no_nul(cls, v: str) -> str:
        if "\x00" in v:
            raise ValueError("source contains a NUL character")
        return v

    @field_validator("split_ratio")
    @classmethod
    def _ratio(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(r <= 0 for r in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"split_ratio={v} must be three positive numbers (train, val, test) summing to 1")
        return v

    @field_validator("class_names")
    @classmethod
    def _class_names(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        for i, n in enumerate(v):
            check_path_component(n, f"class_names[{i}]")
        if len(set(v)) != len(v):
            raise ValueError(f"class_names has duplicates: {v}")
        return v

    @field_validator("window")
    @classmethod
    def _window(cls, v):
        if v is not None and v[1] <= 0:
            raise ValueError(f"window={v}: width must be > 0")
        return v

    @field_validator("image_column", "label_column", "split_column")
    @classmethod
    def _column(cls, v: str | None, info) -> str | None:
        if v is not None and not v:
            raise ValueError(f"{info.field_name} must not be empty")
        return v

    @model_validator(mode="before")
    @classmethod
    def _classes_from_names(cls, data):
        if isinstance(data, dict) and data.get("num_classes") is None and isinstance(data.get("class_names"), list):
            data = {**data, "num_classes": len(data["class_names"])}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "TaskSpec":
        if self.num_classes is None and self.format not in CLASSES_FROM_LAYOUT:
            raise ValueError(
                f"num_classes is required for format '{self.format}' (its classes are in the labels); "
                f"{' and '.join(CLASSES_FROM_LAYOUT)} take them from the class folders when it is left out")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} entries but num_classes={self.num_classes}"
            )
        if self.multilabel == "any" and self.num_classes != 2:
            raise ValueError("multilabel='any' binarises labels (no finding / any finding): num_classes must be 2")
        return self

    def names(self) -> list[str]:
        """Class names, defaulting to the class indices as strings."""
        if self.num_classes is None:
            raise ValueError(f"task {self.name}: its classes are not resolved yet (tasks.classes.resolve_classes)")
        return list(self.class_names) if self.class_names else [str(i) for i in range(self.num_classes)]
