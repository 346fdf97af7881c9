"""Names -> TaskSpecs: tasks registered from a job file, falling back to the built-in catalogue."""

from __future__ import annotations

from collections.abc import Iterable

from .catalogue import CATALOGUE, CatalogueEntry
from .spec import TaskSpec

__all__ = ["TaskRegistry", "DEFAULT_REGISTRY"]


class TaskRegistry:
    """Registered specs win over catalogue entries of the same name.

    Catalogue entries resolve without a source only for MedMNIST (default data root, fetched when
    a network exists); the others need ``register_catalogue(key, source)``.
    """

    def __init__(self, specs: Iterable[TaskSpec] = (), catalogue: dict[str, CatalogueEntry] | None = None):
        self._specs: dict[str, TaskSpec] = {}
        self.catalogue = dict(CATALOGUE if catalogue is None else catalogue)
        for s in specs:
            self.register(s)

    def register(self, spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
        if not isinstance(spec, TaskSpec):
            spec = TaskSpec.model_validate(spec)
        old = self._specs.get(spec.name)
        if old is not None and old != spec and not replace:
            raise ValueError(f"task '{spec.name}' is already registered with a different spec (pass replace=True)")
        self._specs[spec.name] = spec
        return spec

    def register_catalogue(self, key: str, source: str | None = None, **overrides) -> TaskSpec:
        if key not in self.catalogue:
            raise KeyError(f"'{key}' is not in the catalogue; known: {sorted(self.catalogue)}")
        return self.register(self.catalogue[key].to_spec(source, **overrides), replace=True)

    def get(self, name: str) -> TaskSpec:
        if name in self._specs:
            return self._specs[name]
        if name in self.catalogue:
            return self.catalogue[name].to_spec()
        raise KeyError(f"no task named '{name}'; registered: {sorted(self._specs)}; catalogue: {sorted(self.catalogue)}")

    def __contains__(self, name: str) -> bool:
        return name in self._specs or name in self.catalogue

    def names(self) -> list[str]:
        """Registered names first (in order), then catalogue keys."""
        return list(self._specs) + [k for k in self.catalogue if k not in self._specs]

    def registered(self) -> list[TaskSpec]:
        return list(self._specs.values())


DEFAULT_REGISTRY = TaskRegistry()
