"""Medical classification tasks: specs, catalogue, loaders for every format, validation, synthetic data.

Names are imported on first use (PEP 562): the spec and catalogue need no torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "catalogue": ["CATALOGUE", "CatalogueEntry"],
    "fingerprint": ["dataset_fingerprint"],
    "formats": ["FORMATS", "get_format"],
    "images": ["DatasetError"],
    "loaders": ["build_dataset", "build_loader"],
    "spec": ["TaskSpec"],
    "transforms": ["default_transform", "transform_for"],
    "validate": ["DatasetReport", "check_dataset"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'tasks' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
