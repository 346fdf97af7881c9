"""The dataset formats by name: the one table ``tasks.spec`` validates a task's ``format`` against and
``tasks.formats.get_format`` loads from. It lives apart from both so that neither imports the other (the
formats read task specs; a spec only needs the names).

Adding a format: write ``tasks/formats/<name>.py`` with a ``FORMAT`` instance, and add its line below.
"""

from __future__ import annotations

__all__ = ["FORMAT_MODULES", "FORMATS", "CLASSES_FROM_LAYOUT"]

# name -> module under tasks.formats that defines FORMAT (order: CLI choices and error messages)
FORMAT_MODULES = {
    "medmnist": "medmnist",
    "imagefolder": "imagefolder",
    "parquet": "parquet",
    "dicom": "dicom",
    "table": "table",
}
FORMATS: tuple[str, ...] = tuple(FORMAT_MODULES)
# Formats whose classes show in their layout, readable without decoding an image (folder names, as
# torchvision's ImageFolder): a spec of one may leave num_classes and class_names out.
CLASSES_FROM_LAYOUT: tuple[str, ...] = ("imagefolder", "dicom")
