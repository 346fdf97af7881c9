"""Lazy package exports (PEP 562): a package's public names are imported on first use."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, list[str]]):
    """``(__getattr__, __dir__, __all__)`` for ``package`` exporting ``{module: [names]}`` lazily."""
    where = {name: module for module, names in exports.items() for name in names}
    names = sorted(where)

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{where[name]}", package), name)
        setattr(importlib.import_module(package), name, value)  # the next lookup skips this function
        return value

    def __dir__() -> list[str]:
        return names

    return __getattr__, __dir__, names
