"""Classes inferred from a dataset's layout, as torchvision's ImageFolder does.

A spec of a format in ``tasks.formats.CLASSES_FROM_LAYOUT`` may leave ``num_classes`` and ``class_names``
out; :func:`resolve_classes` lists the source (no image is decoded) and returns the spec with both written
in: the class folders in sorted order. A resolved spec is the same spec as one written out by hand, so its
fingerprint, cache keys and job id are too. A spec that gives ``num_classes`` alone is left as it is (its
loader still takes the folders in sorted order and checks their count; its class names stay '0', '1', ...,
as they always were, so the ids of such jobs do not change).
"""

from __future__ import annotations

from tasks.codecs.images import DatasetError
from tasks.formats import CLASSES_FROM_LAYOUT, get_format
from tasks.spec import TaskSpec

__all__ = ["resolve_classes", "needs_classes"]


def needs_classes(spec: TaskSpec) -> bool:
    """Whether ``spec`` leaves its classes to its layout (TaskSpec allows that only for such formats)."""
    return spec.num_classes is None


def resolve_classes(spec: TaskSpec) -> TaskSpec:
    """``spec`` with ``num_classes`` and ``class_names`` from the source's layout where it leaves them out;
    raises DatasetError naming the source when the layout does not give a usable class list."""
    if not needs_classes(spec):
        return spec
    if spec.format not in CLASSES_FROM_LAYOUT:  # TaskSpec refuses this; a spec built without validation
        raise DatasetError(f"task {spec.name}: format '{spec.format}' needs num_classes")
    names = get_format(spec.format).layout_classes(spec)
    return TaskSpec.model_validate({**spec.model_dump(), "num_classes": len(names), "class_names": names})
