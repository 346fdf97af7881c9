"""Medical classification tasks: specs, catalogue, loaders for every format, validation, synthetic data."""

from .catalogue import CATALOGUE, CatalogueEntry
from .data import (
    DatasetError,
    DatasetReport,
    build_dataset,
    build_loader,
    check_dataset,
    dataset_fingerprint,
    default_transform,
    transform_for,
)
from .registry import DEFAULT_REGISTRY, TaskRegistry
from .spec import TaskSpec

__all__ = [
    "CATALOGUE",
    "CatalogueEntry",
    "DEFAULT_REGISTRY",
    "DatasetError",
    "DatasetReport",
    "TaskRegistry",
    "TaskSpec",
    "build_dataset",
    "build_loader",
    "check_dataset",
    "dataset_fingerprint",
    "default_transform",
    "transform_for",
]
