"""The fine-tuning methods shpeft compares, as a registry: one module per method (or family), one
registration each, and nothing else in shpeft that knows a method by name.

Every method starts from the same backbone (and the same warm head) and trains with the same ``fit``; a
method declares (``base.Method``) which parameters train, what it ranks them by, what it may search, its
default learning rate and the kind of artifact it writes:

| method     | module    | trains                                                   | artifact                     |
|------------|-----------|----------------------------------------------------------|------------------------------|
| shpeft     | sparse    | hybrid top-`density` entries (alpha, rule) + head        | task delta (safetensors)     |
| specific   | sparse    | the same with alpha = 1 (task-specific importance only)  | task delta                   |
| agnostic   | sparse    | the same with alpha = 0 (task-agnostic importance only)  | task delta                   |
| random     | sparse    | a seeded uniform random mask of the same size + head     | task delta                   |
| gps        | gps       | per-row top entries of its own \\|sum of grads\\|, biases + head | task delta (+ dense biases) |
| linear     | dense     | the head only                                            | task delta without values    |
| bitfit     | dense     | every bias + head                                        | plain timm checkpoint        |
| lora       | lora      | peft LoRA adapters on qkv/proj/fc1/fc2 + head            | peft adapter folder + head   |
| full       | full      | every weight                                             | plain timm checkpoint        |

Adding a method: a module with a ``Method`` subclass decorated with ``@register_method``, and its module
name in ``_BUILTIN_MODULES`` below (or, outside this package, an entry point in the group
``shpeft.methods`` or a module named in ``$SHPEFT_METHODS``; every Ray worker loads them the same way).
"""

from __future__ import annotations

import importlib
import json
import os
from typing import TYPE_CHECKING

from .base import Method, MethodError, SearchDimension

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Method", "MethodError", "SearchDimension", "register_method", "get_method", "method_names",
           "all_methods", "prepare_model", "method_mask", "save_artifact", "load_artifact", "methods_help", "default_lrs"]

# One line per method module, in the order methods are listed (CLI help, comparison tables).
_BUILTIN_MODULES = ("sparse", "gps", "dense", "lora", "full")
_REGISTRY: dict[str, Method] = {}
_loaded = False


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register ``cls`` (an instance of it) under ``cls.name``."""
    from .. import artifacts

    name = getattr(cls, "name", "")
    if not name or not name.replace("_", "").isalnum() or not name.islower():
        raise MethodError(f"{cls.__qualname__}: a method's name must be lower-case letters, digits and _, got {name!r}")
    if name in _REGISTRY and type(_REGISTRY[name]) is not cls:
        raise MethodError(f"method {name!r} is registered twice ({type(_REGISTRY[name]).__qualname__} and "
                          f"{cls.__qualname__})")
    artifacts.get_kind(cls.artifact)  # an unknown artifact kind fails at registration, not mid-run
    _REGISTRY[name] = cls()
    return cls


def _load() -> None:
    """Import the built-in method modules, then any plug-ins (entry points, $SHPEFT_METHODS), once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN_MODULES:
        importlib.import_module(f".{mod}", __name__)
    from importlib.metadata import entry_points

    for ep in entry_points(group="shpeft.methods"):
        ep.load()
    for mod in filter(None, (m.strip() for m in os.environ.get("SHPEFT_METHODS", "").split(","))):
        importlib.import_module(mod)


def method_names() -> tuple[str, ...]:
    """Every registered method's name, built-ins first in their listing order."""
    _load()
    return tuple(_REGISTRY)


def all_methods() -> list[Method]:
    _load()
    return list(_REGISTRY.values())


def methods_help() -> str:
    """One line naming every method and what it trains (the CLI's and the job schema's help)."""
    return ", ".join(f"{m.name} ({m.help})" for m in all_methods())


def default_lrs() -> dict[str, float]:
    return {m.name: m.default_lr for m in all_methods()}


def get_method(name: str) -> Method:
    """The registered method ``name``; MethodError naming the known ones otherwise."""
    _load()
    if name not in _REGISTRY:
        raise MethodError(f"method must be one of {list(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


# ---------------------------------------------------------------- conveniences for Python users


def method_mask(method: str, *, model: "nn.Module", specific=None, agnostic=None, density: float, alpha: float,
                granularity: str = "global", mix: str = "rank_sum", seed: int = 0, rules=None,
                equal_budget: bool = False):
    """The mask ``method`` trains (None for a method without one). ``specific`` is the map it ranks by."""
    m = get_method(method)
    return m.mask(model, specific=specific, agnostic=agnostic, density=density, alpha=m.alpha(alpha),
                  granularity=m.granularity(granularity), mix=mix, seed=seed, rules=rules, equal_budget=equal_budget)


def prepare_model(model: "nn.Module", method: str, *, mask=None, settings: dict | None = None):
    """Make exactly ``method``'s parameters trainable (in place where possible).

    Returns ``(model_to_train, handle)``: the timm model to pass to ``fit``, and what ``save_artifact``
    needs besides it (the peft wrapper for lora, else None).
    """
    return get_method(method).prepare(model, mask=mask, settings=settings)


def save_artifact(model: "nn.Module", handle, method: str, uri: str, metadata: dict[str, str]) -> dict:
    """Write ``method``'s artifact of the trained model at ``uri``; returns {"sha256", "bytes", "kind"}."""
    from .. import artifacts

    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()}
    return artifacts.save_artifact(model, handle, get_method(method).artifact, uri, {**meta, "method": method})


def load_artifact(model: "nn.Module", method: str, uri: str) -> "nn.Module":
    """The backbone ``model`` (fresh, same base weights) with ``method``'s artifact applied."""
    from .. import artifacts

    return artifacts.load_artifact(model, get_method(method).artifact, uri)
