"""TaskSpec: what a classification task is, of which kind, and where its images and labels live.

Invariants: a spec is frozen and forbids unknown fields; ``class_names`` (when given) has
``num_classes`` entries, which are the findings of a ``multi_label`` task; ``kappa`` is the metric of
ordinal tasks only; a ``table`` layout goes with the ``table`` format only. Fields added after the
first release (``kind``, ``table``) are left out of a spec's serialised form while they hold their
defaults, so a job written before them keeps its id and its finished artifacts.

``num_classes`` follows from ``class_names`` when only they are given; formats whose classes show in
their layout (``tasks.format_registry.CLASSES_FROM_LAYOUT``: folders) may leave both out, and
``tasks.classes.resolve_classes`` fills them in from the source before anything trains on the spec.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from shpeft_core.options import DEFAULT_METRIC, KINDS, METRICS, SPLITS

from .format_registry import CLASSES_FROM_LAYOUT, FORMATS

__all__ = ["TaskSpec", "TableLayout", "FORMATS", "KINDS", "METRICS", "SPLITS", "LABEL_POLICIES", "check_slug",
           "check_path_component"]

LABEL_POLICIES = ("ignore", "positive", "negative")
SplitName = Literal["train", "val", "test"]
LabelPolicy = Literal["ignore", "positive", "negative"]

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


class TableLayout(BaseModel):
    """Where a label table's columns are and how to read them (format ``table``; tasks/formats/table.py).

    Paths (``files``, ``images``, ``split_lists``) are relative to the task's ``source`` folder. Image
    paths from the table must stay inside the image root; URLs only with ``allow_urls``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    files: str | dict[SplitName, str] | None = Field(
        default=None, description="The table (CSV, TSV or Parquet), or one table per split; null = the source "
        "itself is the table file and the images are relative to its folder.")
    images: str | None = Field(default=None, description="Image root, relative to the source folder (default: it).")
    path_column: str = Field(default="path", description="Column holding each image's path (or id, see path_template).")
    path_template: str = Field(default="{}", description="Turns the path column's value into a path, e.g. "
                               "'train_images/{}.png' for an id column.")
    find_by_name: bool = Field(default=False, description="Find each image by its file name anywhere under the "
                               "image root (one listing), for tables that hold only file names.")
    label_column: str | None = Field(default=None, description="One column: a class index or class name; for "
                                     "multi_label, findings joined by `separator`. Default 'label'.")
    label_columns: list[str] | None = Field(default=None, description="One column per class (one-hot) or per "
                                            "finding (1 / 0 / -1 uncertain / blank), in class order.")
    separator: str | None = Field(default=None, description="Separator of the findings in label_column, e.g. '|'.")
    none_value: str | None = Field(default=None, description="A label_column value meaning no finding, e.g. "
                                   "'No Finding'.")
    uncertain: LabelPolicy = Field(default="ignore", description="A finding marked -1 (uncertain): left out of the "
                                   "loss and metrics (ignore), or counted as positive / negative.")
    uncertain_per_finding: dict[str, LabelPolicy] = Field(default_factory=dict,
                                                          description="The uncertain policy for some findings.")
    blank: Literal["negative", "ignore"] = Field(default="negative", description="An empty finding cell: not "
                                                 "mentioned, i.e. negative (CheXpert's convention), or unknown.")
    split_column: str | None = Field(default="split", description="Column naming each row's split (train/val/"
                                     "test); the default name may be absent (the splits are then drawn by group).")
    split_lists: dict[SplitName, str] | None = Field(default=None, description="Text files listing each split's "
                                                     "path-column values, one per line (ChestX-ray14).")
    group_column: str | None = Field(default=None, description="Patient or study id: splits drawn here keep a "
                                     "group together.")
    group_pattern: str | None = Field(default=None, description="Regex taking the group id out of group_column "
                                      "(default: the path column), e.g. '(patient\\d+)'.")
    allow_urls: bool = Field(default=False, description="Allow image paths that are URLs (fsspec).")

    @field_validator("group_pattern")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"group_pattern {v!r} is not a regular expression: {exc}") from None
        return v

    @field_validator("path_template")
    @classmethod
    def _template(cls, v: str) -> str:
        if v.count("{}") != 1 or "{" in v.replace("{}", "") or "}" in v.replace("{}", ""):
            raise ValueError(f"path_template {v!r} must hold '{{}}' exactly once and no other braces")
        return v

    @model_validator(mode="after")
    def _labels(self) -> "TableLayout":
        if self.label_column is not None and self.label_columns is not None:
            raise ValueError("give label_column or label_columns, not both")
        if self.label_columns is not None and len(set(self.label_columns)) != len(self.label_columns):
            raise ValueError(f"label_columns has duplicates: {self.label_columns}")
        if self.separator is not None and self.label_columns is not None:
            raise ValueError("separator applies to label_column, not to label_columns")
        if self.separator == "":
            raise ValueError("separator must not be empty")
        return self

    @property
    def label(self) -> str:
        """The single label column (default 'label') when label_columns is not given."""
        return self.label_column or "label"


class TaskSpec(BaseModel):
    """One image classification task.

    ``channels`` describes the source images; loaders always return 3-channel tensors.
    ``split_ratio`` and ``split_seed`` apply only where the source has no splits of its own.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    source: str = Field(min_length=1)
    format: Literal[FORMATS]  # the registered formats (tasks.format_registry), in registry order
    kind: Literal[KINDS] = "single_label"
    # classes, grades, or findings (multi_label); None: from the layout (CLASSES_FROM_LAYOUT formats)
    num_classes: int | None = Field(default=None, ge=2)
    class_names: list[str] | None = None
    modality: str = "unknown"
    split_ratio: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_seed: int = 0
    channels: Literal[1, 3] = 3
    image_size: int | None = Field(default=None, ge=1)
    metric: Literal[METRICS] = DEFAULT_METRIC
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
    # table: the label table's layout (None = the defaults: source is a CSV with path and label columns)
    table: TableLayout | None = None
    description: str = ""

    @model_serializer(mode="wrap")
    def _serialise(self, handler):
        # Later fields at their defaults are left out: specs (and so job ids) written before them stay the same.
        out = handler(self)
        if isinstance(out, dict):
            for key, default in _LATER_FIELDS.items():
                if key in out and getattr(self, key) == default:
                    del out[key]
        return out

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
        if self.multilabel == "any" and self.kind == "multi_label":
            raise ValueError("multilabel='any' makes a single-label task out of a multi-label file; with "
                             "kind='multi_label' leave multilabel at 'error'")
        if self.metric == "kappa" and self.kind != "ordinal":
            raise ValueError(f"metric='kappa' (quadratic weighted kappa) needs kind='ordinal', not {self.kind!r}")
        if self.kind == "multi_label" and self.format not in ("table", "medmnist"):
            raise ValueError(f"kind='multi_label' needs a format that holds several findings per image "
                             f"(table or medmnist), not {self.format!r}")
        if self.table is not None and self.format != "table":
            raise ValueError(f"table (a label-table layout) applies to format 'table', not {self.format!r}")
        cols = self.table.label_columns if self.table is not None else None
        if cols is not None and len(cols) != self.num_classes:
            raise ValueError(f"table.label_columns has {len(cols)} columns but num_classes={self.num_classes}")
        if self.table is not None and self.table.separator is not None and self.kind != "multi_label":
            raise ValueError("table.separator joins several findings: it needs kind='multi_label'")
        if self.table is not None:
            unknown = sorted(set(self.table.uncertain_per_finding) - set(self.names()))
            if unknown:
                raise ValueError(f"table.uncertain_per_finding names {unknown}, not findings of this task "
                                 f"({self.names()})")
        return self

    @property
    def layout(self) -> TableLayout:
        """The label-table layout, defaults filled in."""
        return self.table or TableLayout()

    def names(self) -> list[str]:
        """Class names, defaulting to the class indices as strings."""
        if self.num_classes is None:
            raise ValueError(f"task {self.name}: its classes are not resolved yet (tasks.classes.resolve_classes)")
        return list(self.class_names) if self.class_names else [str(i) for i in range(self.num_classes)]


_LATER_FIELDS = {"kind": "single_label", "table": None}
