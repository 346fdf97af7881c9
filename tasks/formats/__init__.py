"""Dataset formats by name: the one place that dispatches on ``TaskSpec.format``.

Each format is one module here with a :class:`~tasks.formats.base.DatasetFormat` subclass that builds a
split's dataset, names the files its fingerprint covers, lists what validation reads, and writes the
format for the synthetic generator. ``tasks.format_registry`` maps each name to its module; modules (and
their optional dependencies: pyarrow, pydicom) are imported on first use, so this package needs no torch.

Adding a format: write ``tasks/formats/<name>.py`` with a ``FORMAT`` instance, and add its line to
``tasks/format_registry.py``. A format whose classes show in its layout (folder names, a label table's
names), readable without decoding an image, implements ``DatasetFormat.layout_classes`` and is listed in
``tasks.format_registry.CLASSES_FROM_LAYOUT``: its task specs may leave ``num_classes`` and ``class_names`` out
(``tasks.classes.resolve_classes`` fills them in).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..format_registry import FORMAT_MODULES as _REGISTRY
from ..format_registry import CLASSES_FROM_LAYOUT, FORMATS

if TYPE_CHECKING:
    from .base import DatasetFormat

__all__ = ["FORMATS", "CLASSES_FROM_LAYOUT", "get_format", "format_hint"]

_LOADED: dict[str, DatasetFormat] = {}


def get_format(name: str) -> DatasetFormat:
    """The format registered as ``name`` or under one of its aliases (e.g. 'npz' for 'medmnist')."""
    if name not in _REGISTRY:
        for fmt in map(get_format, FORMATS):
            if name in fmt.aliases:
                return fmt
        raise KeyError(f"format={name!r} is not one of {', '.join(FORMATS)}")
    if name not in _LOADED:
        fmt = importlib.import_module(f".{_REGISTRY[name]}", __name__).FORMAT
        if fmt.name != name:  # pragma: no cover - a registry typo
            raise RuntimeError(f"tasks.formats.{_REGISTRY[name]} defines format {fmt.name!r}, registered as {name!r}")
        _LOADED[name] = fmt
    return _LOADED[name]


def format_hint(paths: list[str], exclude: str | None = None) -> str:
    """'; it holds 3 x .png: try --format imagefolder' for error messages about a source of the wrong kind.
    ``exclude``: the format already given, never suggested."""
    from .files import describe_files, ext

    exts = {ext(p) for p in paths}
    for fmt in sorted(map(get_format, FORMATS), key=lambda f: f.hint_rank):
        if fmt.name != exclude and any(fmt.claims_extension(e) for e in exts):
            return f"; it holds {describe_files(paths)}: try --format {fmt.name}"
    return f"; it holds {describe_files(paths)}"
