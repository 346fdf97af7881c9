"""Backbone construction (timm) and identity (fingerprint, head names)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field

import torch
import timm
from torch import nn

from . import io
from ._st import tensor_bytes

__all__ = [
    "BackboneError",
    "BackboneSpec",
    "RANDOM_INIT_SEED",
    "create_backbone",
    "build_backbone",
    "backbone_fingerprint",
    "head_parameter_names",
    "head_module_paths",
    "unwrap",
    "backbone_name",
    "source_label",
]

# Random-init backbones are seeded so that the same spec always gives the same weights:
# a delta trained on one can be re-applied later (tests, demos, synthetic studies).
RANDOM_INIT_SEED = 0
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class BackboneError(ValueError):
    """Backbone weights that exist but cannot be loaded (not weights, a pickle timm refuses, another model)."""


@dataclass(frozen=True)
class BackboneSpec:
    """A timm backbone: name, where its weights come from, extra create_model kwargs.

    source: None (seeded random init), "hub" (timm pretrained weights from the HF hub),
    or a local path / fsspec URI of a weights file.
    """

    name: str
    source: str | None = None
    kwargs: dict = field(default_factory=dict)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / DataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def source_label(source: str | None) -> str:
    """The string stored in metadata for a BackboneSpec.source."""
    return "random" if source in (None, "", "random") else source


def _local_weights(uri: str) -> str:
    local = io.local_path(uri)
    if local is not None:
        if not os.path.isfile(local):
            raise FileNotFoundError(f"backbone weights {uri!r}: no such file")
        return local
    if not io.exists(uri):
        raise FileNotFoundError(f"backbone weights {uri!r}: no such file")
    # Remote weights are cached under a name derived from the URI; the suffix tells timm the format.
    cache = os.environ.get("SHPEFT_CACHE", os.path.join(tempfile.gettempdir(), "shpeft-weights"))
    base = uri.rstrip("/").rsplit("/", 1)[-1]
    target = os.path.join(cache, hashlib.sha256(uri.encode()).hexdigest()[:16] + "-" + base)
    if not os.path.isfile(target):
        io.atomic_write_bytes(target, io.read_bytes(uri))
    return target


def create_backbone(spec: BackboneSpec, num_classes: int) -> nn.Module:
    """A timm model for ``spec`` with a fresh ``num_classes`` head."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    kwargs = dict(spec.kwargs)
    if spec.source in (None, "", "random"):
        # Built headless first so the backbone's weights do not depend on num_classes.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = timm.create_model(spec.name, pretrained=False, num_classes=0, **kwargs)
            model.reset_classifier(num_classes)
    elif spec.source == "hub":
        model = timm.create_model(spec.name, pretrained=True, num_classes=num_classes, **kwargs)
    else:
        if not spec.source.endswith(WEIGHT_SUFFIXES):
            raise ValueError(
                f"backbone weights {spec.source!r}: expected a file ending in {', '.join(WEIGHT_SUFFIXES)}"
            )
        local = _local_weights(spec.source)
        # The new head is seeded too, so the whole model is reproducible from the spec.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            try:
                model = timm.create_model(
                    spec.name,
                    pretrained=True,
                    pretrained_cfg_overlay=dict(file=local),
                    num_classes=num_classes,
                    **kwargs,
                )
            except FileNotFoundError:
                raise
            except Exception as exc:  # timm/torch/safetensors raise many types; one line naming the file
                first = (str(exc).strip().splitlines() or [""])[0]
                raise BackboneError(f"backbone weights {spec.source!r} cannot be loaded into {spec.name!r}: "
                                    f"{type(exc).__name__}: {first}") from exc
    model.shpeft_spec = {"name": spec.name, "source": source_label(spec.source), "kwargs": kwargs}
    return model


def build_backbone(backbone: dict, num_classes: int) -> nn.Module:
    """``create_backbone`` from a job file's backbone section as JSON ({name, source, kwargs}), seeded so a
    random-init backbone (and every fresh head) is the same in every process."""
    spec = BackboneSpec(name=backbone["name"], source=backbone.get("source"), kwargs=dict(backbone.get("kwargs") or {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_backbone(spec, num_classes)


def backbone_name(model: nn.Module) -> str:
    m = unwrap(model)
    spec = getattr(m, "shpeft_spec", None)
    if spec:
        return spec["name"]
    cfg = getattr(m, "pretrained_cfg", None) or {}
    return cfg.get("architecture", "") or ""


def head_module_paths(model: nn.Module) -> list[str]:
    """Module paths of the classifier(s): ``["head"]``, ``["head.fc"]``, DeiT-distilled both heads."""
    m = unwrap(model)
    clf = m.get_classifier()
    clfs = list(clf) if isinstance(clf, (tuple, list)) else [clf]
    ids = {id(c) for c in clfs if isinstance(c, nn.Module)}
    return [name for name, mod in m.named_modules() if name and id(mod) in ids]


def head_parameter_names(model: nn.Module) -> list[str]:
    m = unwrap(model)
    return [
        f"{path}.{n}" for path in head_module_paths(m) for n, _ in m.get_submodule(path).named_parameters()
    ]


def _sparse_extra_keys(model: nn.Module) -> set[str]:
    # Entries a sparse-training module adds to the state dict (it declares them): not backbone weights.
    out = set()
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        out.update(prefix + k for k in getattr(mod, "SPARSE_STATE_KEYS", ()))
    return out


def backbone_fingerprint(model: nn.Module) -> str:
    """sha256 over backbone tensors (head and sparse deltas excluded): names, dtypes, shapes, bytes."""
    m = unwrap(model)
    heads = tuple(p + "." for p in head_module_paths(m))
    skip = _sparse_extra_keys(m)
    h = hashlib.sha256()
    state = m.state_dict(keep_vars=True)
    for name in sorted(state):
        if name in skip or (heads and name.startswith(heads)):
            continue
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()
