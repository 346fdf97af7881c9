"""The task delta: one safetensors file per task (sparse values + dense head + metadata)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import _st
from .backbone import (
    BackboneSpec,
    backbone_fingerprint,
    backbone_name,
    create_backbone,
    head_module_paths,
    head_parameter_names,
    unwrap,
)
from .eligibility import eligible_parameters
from .sparse import remove_sparse_training, sparse_modules

__all__ = [
    "FORMAT_VERSION",
    "REQUIRED_METADATA",
    "DeltaError",
    "TaskDelta",
    "DeltaHandle",
    "extract_delta",
    "save_delta",
    "load_delta",
    "apply_delta",
    "merge_delta",
    "create_model_for_delta",
]

FORMAT_VERSION = "1"
REQUIRED_METADATA = (
    "shpeft_format", "backbone", "backbone_source", "backbone_kwargs", "backbone_fingerprint",
    "num_classes", "class_names", "density", "alpha", "estimator", "importance_key", "task",
)
_CALLER_KEYS = ("alpha", "estimator", "importance_key", "task")


class DeltaError(ValueError):
    """A delta that is malformed or does not fit the model it is applied to."""


@dataclass
class TaskDelta:
    indices: dict[str, Tensor]  # param name -> int32 flat row-major indices
    values: dict[str, Tensor]  # param name -> float32 values added at those indices
    head: dict[str, Tensor]  # head tensors under their timm names
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.metadata["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return json.loads(self.metadata["class_names"])

    def tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for n in self.indices:
            out[f"{n}.indices"] = self.indices[n]
            out[f"{n}.values"] = self.values[n]
        out.update(self.head)
        return out


def _as_str(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def extract_delta(model: nn.Module, *, metadata: dict[str, str]) -> TaskDelta:
    """The delta of a model after apply_sparse_training (+ fit).

    Derived metadata (format, backbone, source, kwargs, fingerprint, num_classes, class_names
    default, density, parameter_shapes) is filled in; ``metadata`` must give alpha, estimator,
    importance_key and task, and may override backbone_source / class_names / density or add keys.
    """
    m = unwrap(model)
    mods = sparse_modules(m)
    missing = [k for k in _CALLER_KEYS if k not in metadata]
    if missing:
        raise DeltaError(f"extract_delta: metadata lacks {missing}")
    indices, values, shapes = {}, {}, {}
    for path, mod in mods.items():
        name = f"{path}.weight"
        indices[name] = mod.indices.detach().cpu().to(torch.int32).clone()
        values[name] = mod.values.detach().cpu().to(torch.float32).clone()  # the format stores float32
        shapes[name] = list(mod.weight.shape)
    head_names = head_parameter_names(m)
    params = dict(m.named_parameters())
    head = {n: params[n].detach().cpu().clone() for n in head_names}
    if not head:
        raise DeltaError("extract_delta: model has no classifier head")
    num_classes = int(head[head_names[0]].shape[0])
    spec = getattr(m, "shpeft_spec", None) or {}
    eligible_total = sum(p.numel() for p in eligible_parameters(m).values())
    k = sum(v.numel() for v in values.values())
    meta = {
        "shpeft_format": FORMAT_VERSION,
        "backbone": backbone_name(m),
        "backbone_source": spec.get("source", ""),
        "backbone_kwargs": json.dumps(spec.get("kwargs", {}), sort_keys=True),
        "backbone_fingerprint": backbone_fingerprint(m),
        "num_classes": str(num_classes),
        "class_names": json.dumps([str(i) for i in range(num_classes)]),
        "density": repr(k / eligible_total) if eligible_total else "0",
        "parameter_shapes": json.dumps(shapes, sort_keys=True),
    }
    for key, v in metadata.items():
        if key in ("shpeft_format", "backbone_fingerprint", "num_classes", "parameter_shapes"):
            if _as_str(v) != meta[key]:
                raise DeltaError(f"extract_delta: metadata {key}={v!r} contradicts the model ({meta[key]})")
            continue
        meta[key] = _as_str(v)
    names = json.loads(meta["class_names"])
    if not isinstance(names, list) or len(names) != num_classes:
        raise DeltaError(f"extract_delta: class_names must be a JSON list of {num_classes} names")
    return TaskDelta(indices=indices, values=values, head=head, metadata=meta)


def _validate(delta: TaskDelta, where: str) -> None:
    missing = [k for k in REQUIRED_METADATA if k not in delta.metadata]
    if missing:
        raise DeltaError(f"{where}: metadata lacks {missing}")
    if delta.metadata["shpeft_format"] != FORMAT_VERSION:
        raise DeltaError(f"{where}: shpeft_format {delta.metadata['shpeft_format']!r}, this reader knows {FORMAT_VERSION!r}")
    for n, idx in delta.indices.items():
        if n not in delta.values:
            raise DeltaError(f"{where}: {n}.indices without {n}.values")
        if idx.dtype != torch.int32 or idx.dim() != 1:
            raise DeltaError(f"{where}: {n}.indices must be 1-D int32, got {idx.dtype} {tuple(idx.shape)}")
        if delta.values[n].shape != idx.shape:
            raise DeltaError(f"{where}: {n}.values has {tuple(delta.values[n].shape)} entries, indices {tuple(idx.shape)}")
    extra = set(delta.values) - set(delta.indices)
    if extra:
        raise DeltaError(f"{where}: values without indices: {sorted(extra)[:5]}")
    try:
        int(delta.metadata["num_classes"])
        json.loads(delta.metadata["class_names"])
        json.loads(delta.metadata["backbone_kwargs"])
    except (ValueError, json.JSONDecodeError) as exc:
        raise DeltaError(f"{where}: malformed metadata (num_classes, class_names or backbone_kwargs): {exc}") from exc


def save_delta(delta: TaskDelta, uri: str) -> dict:
    """Atomic write through fsspec; returns {"sha256", "bytes"}."""
    _validate(delta, uri)
    sha, size = _st.write(uri, delta.tensors(), delta.metadata)
    return {"sha256": sha, "bytes": size}


def load_delta(uri: str) -> TaskDelta:
    """Read a delta (safetensors only; nothing is unpickled)."""
    try:
        tensors, meta = _st.read(uri)
    except _st.SafetensorsError as exc:
        raise DeltaError(str(exc)) from exc
    if "shpeft_format" not in meta:
        raise DeltaError(f"{uri}: not an shpeft task delta (metadata shpeft_format missing)")
    indices, values, head = {}, {}, {}
    for key, t in tensors.items():
        if key.endswith(".indices"):
            indices[key[: -len(".indices")]] = t
        elif key.endswith(".values"):
            values[key[: -len(".values")]] = t
        else:
            head[key] = t
    delta = TaskDelta(indices=indices, values=values, head=head, metadata=meta)
    _validate(delta, uri)
    return delta


class DeltaHandle:
    """Undo record of apply_delta: ``remove()`` restores the model bit-exactly."""

    def __init__(self, model: nn.Module):
        self._model = model
        self._entries: list[tuple[Tensor, Tensor, Tensor]] = []
        self._head: list[tuple[Tensor, Tensor]] = []
        self._old_classifier: tuple[list[tuple[str, nn.Module]], int | None] | None = None
        self.active = True

    def remove(self) -> None:
        if not self.active:
            return
        with torch.no_grad():
            for flat, idx, orig in reversed(self._entries):
                flat[idx] = orig
            for param, orig in self._head:
                param.copy_(orig)
        if self._old_classifier is not None:
            modules, num_classes = self._old_classifier
            for path, mod in modules:
                parent, _, leaf = path.rpartition(".")
                setattr(self._model.get_submodule(parent) if parent else self._model, leaf, mod)
            if num_classes is not None:
                self._model.num_classes = num_classes
        self.active = False

    def __enter__(self) -> "DeltaHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _check_fit(m: nn.Module, delta: TaskDelta, check_fingerprint: bool) -> None:
    want = delta.metadata["backbone"]
    have = backbone_name(m)
    if want and have and want != have:
        raise DeltaError(f"delta is for backbone {want!r}, model is {have!r}")
    params = dict(m.named_parameters())
    shapes = json.loads(delta.metadata.get("parameter_shapes", "{}"))
    for n, idx in delta.indices.items():
        if n not in params:
            raise DeltaError(f"delta parameter {n!r} does not exist in the {have or 'given'} model")
        p = params[n]
        if n in shapes and list(p.shape) != list(shapes[n]):
            raise DeltaError(f"delta parameter {n!r}: shape {tuple(shapes[n])} vs model {tuple(p.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= p.numel()):
            raise DeltaError(f"delta parameter {n!r}: indices out of range for shape {tuple(p.shape)}")
        if not p.is_contiguous():
            raise DeltaError(f"model parameter {n!r} is not contiguous")
    if check_fingerprint:
        fp = backbone_fingerprint(m)
        if fp != delta.metadata["backbone_fingerprint"]:
            raise DeltaError(
                f"backbone weights differ from the delta's base (fingerprint {fp[:12]} vs "
                f"{delta.metadata['backbone_fingerprint'][:12]}); is another delta still applied?"
            )


def apply_delta(model: nn.Module, delta: TaskDelta, *, check_fingerprint: bool = True) -> DeltaHandle:
    """Add the delta's values into the weights and install its head, in place.

    The classifier is rebuilt when its size differs from the delta's. Returns a handle whose
    ``remove()`` (or ``with`` exit) restores the original weights and head bit-exactly.
    """
    m = unwrap(model)
    _validate(delta, "delta")
    if sparse_modules(m):
        raise DeltaError("model is under sparse training: apply deltas to a plain model (or use merge_delta)")
    _check_fit(m, delta, check_fingerprint)
    handle = DeltaHandle(m)
    head_paths = head_module_paths(m)
    if not head_paths:
        raise DeltaError("model has no classifier head")
    params = dict(m.named_parameters())
    if any(n in params and tuple(params[n].shape) != tuple(t.shape) for n, t in delta.head.items()):
        # Another head size: build the delta's, keep the old modules for remove().
        old = [(p, m.get_submodule(p)) for p in head_paths]
        ref = next(iter(old[0][1].parameters()))
        handle._old_classifier = (old, getattr(m, "num_classes", None))
        m.reset_classifier(delta.num_classes)
        for p in head_module_paths(m):
            m.get_submodule(p).to(device=ref.device, dtype=ref.dtype)
    params = dict(m.named_parameters())
    for n, t in delta.head.items():
        if n not in params:
            handle.remove()
            raise DeltaError(f"delta head tensor {n!r} does not exist in the model")
        if tuple(params[n].shape) != tuple(t.shape):
            handle.remove()
            raise DeltaError(f"delta head tensor {n!r}: shape {tuple(t.shape)} vs model {tuple(params[n].shape)}")
    with torch.no_grad():
        for n, idx in delta.indices.items():
            p = params[n]
            flat = p.data.view(-1)
            i = idx.to(device=p.device, dtype=torch.int64)
            orig = flat[i].clone()
            handle._entries.append((flat, i, orig))
            # Same arithmetic as the sparse forward (base + float32 value cast to the weight dtype):
            # bit-identical logits.
            flat[i] = orig + delta.values[n].to(device=p.device, dtype=p.dtype)
        for n, t in delta.head.items():
            p = params[n]
            if handle._old_classifier is None:
                handle._head.append((p, p.detach().clone()))
            p.copy_(t.to(device=p.device, dtype=p.dtype))
    return handle


def create_model_for_delta(delta: TaskDelta, backbone_source: str | None = None) -> nn.Module:
    """The delta's backbone (from its metadata, or ``backbone_source``) with a head of its size."""
    _validate(delta, "delta")
    source = backbone_source if backbone_source is not None else delta.metadata["backbone_source"]
    if source in ("", "random"):
        source = None
    spec = BackboneSpec(delta.metadata["backbone"], source, json.loads(delta.metadata["backbone_kwargs"]))
    return create_backbone(spec, delta.num_classes)


def merge_delta(delta: TaskDelta, model: nn.Module | None = None) -> nn.Module:
    """A plain timm model with the delta folded in (``model`` itself is left untouched)."""
    if model is None:
        m = create_model_for_delta(delta)
    else:
        m = copy.deepcopy(unwrap(model))
        if sparse_modules(m):
            remove_sparse_training(m, merge=False)
    apply_delta(m, delta)
    for p in m.parameters():
        p.requires_grad_(True)
    return m
