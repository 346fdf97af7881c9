"""The task delta: one safetensors file per task (sparse values + dense head + metadata, and for a method
that trains whole biases beside its mask, such as GPS, those tensors as ``<param>.dense``).

Invariants, for any file (a delta is data from outside: its self-checksum only proves it was not damaged,
anyone can recompute it):

- ``load_delta`` refuses a file whose structure is wrong (``check_delta``): sorted, unique int32 indices,
  finite values, 1 <= num_classes <= MAX_NUM_CLASSES with as many class names, a head whose first dimension
  is num_classes, finite dense tensors only in a format-2 file. It reads only a regular file. A delta without
  dense tensors is written as format 1, byte for byte as before they existed; one with them as format 2,
  which a reader that knows only format 1 refuses by its version instead of misreading.
- ``validate_delta(model, delta)`` runs before anything is applied (``apply_delta`` calls it, and so must
  any other forward that uses a delta): sparse values only at weights a sparse delta may change (Linear /
  groups=1 Conv2d weights outside the head), indices inside them, head tensors exactly the model's head
  parameters with their shapes for num_classes, dense tensors only at biases and layer-scale gammas
  (``eligibility.dense_eligible_parameters``) with their shapes. Nothing else of the backbone can be named.
- ``apply_delta`` keeps an undo record of every tensor it writes and a fingerprint of what it touches (the
  entries at the delta's indices, the dense tensors and the head); ``DeltaHandle.remove()`` restores them bit-exactly and
  recomputes the fingerprint, raising DeltaError if anything it touched is not as before.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import _st
from ._st import tensor_bytes
from .backbone import (
    BackboneSpec,
    backbone_fingerprint,
    backbone_name,
    create_backbone,
    head_module_paths,
    head_parameter_names,
    unwrap,
)
from .eligibility import dense_eligible_parameters, eligible_parameters
from .sparse import remove_sparse_training, sparse_modules

__all__ = [
    "FORMAT_VERSION",
    "DENSE_FORMAT_VERSION",
    "REQUIRED_METADATA",
    "DeltaError",
    "TaskDelta",
    "DeltaHandle",
    "check_backbone_name",
    "MAX_NUM_CLASSES",
    "check_delta",
    "validate_delta",
    "extract_delta",
    "save_delta",
    "load_delta",
    "apply_delta",
    "merge_delta",
    "create_model_for_delta",
]

FORMAT_VERSION = "1"
DENSE_FORMAT_VERSION = "2"  # the format of a delta with dense tensors; "1" files have none
READABLE_FORMATS = (FORMAT_VERSION, DENSE_FORMAT_VERSION)
DENSE_SUFFIX = ".dense"
REQUIRED_METADATA = (
    "shpeft_format", "backbone", "backbone_source", "backbone_kwargs", "backbone_fingerprint",
    "num_classes", "class_names", "density", "alpha", "estimator", "importance_key", "task",
)
_CALLER_KEYS = ("alpha", "estimator", "importance_key", "task")
# ImageNet-21k has 21,843 classes; a head past this is a crafted file, not a task (and would make a
# server build that many class names and logits per request).
MAX_NUM_CLASSES = 100_000
# Every Linear / groups=1 Conv2d weight outside the head: what a sparse delta may change, whatever
# selection rules it was trained with.
_ANY_MODULE = (r".+",)


class DeltaError(ValueError):
    """A delta that is malformed or does not fit the model it is applied to."""


@dataclass
class TaskDelta:
    indices: dict[str, Tensor]  # param name -> int32 flat row-major indices
    values: dict[str, Tensor]  # param name -> float32 values added at those indices
    head: dict[str, Tensor]  # head tensors under their timm names
    metadata: dict[str, str] = field(default_factory=dict)
    dense: dict[str, Tensor] = field(default_factory=dict)  # whole trained tensors (biases), by parameter name

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
        out.update({n + DENSE_SUFFIX: t for n, t in self.dense.items()})
        out.update(self.head)
        return out


def _as_str(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def extract_delta(model: nn.Module, *, metadata: dict[str, str], dense: dict[str, Tensor] | None = None) -> TaskDelta:
    """The delta of a model after apply_sparse_training (+ fit). ``dense`` maps whole parameters (biases)
    it trained besides to their values before training: they are stored as they are now, and the base
    fingerprint is taken with the values before.

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
    dense_tensors = {n: params[n].detach().cpu().clone() for n in (dense or {})}
    num_classes = int(head[head_names[0]].shape[0])
    with torch.no_grad():  # the base's fingerprint: the dense parameters at their values before training
        for n, before in (dense or {}).items():
            params[n].copy_(before)
        fingerprint = backbone_fingerprint(m)
        for n, t in dense_tensors.items():
            params[n].copy_(t)
    spec = getattr(m, "shpeft_spec", None) or {}
    eligible_total = sum(p.numel() for p in eligible_parameters(m).values())
    k = sum(v.numel() for v in values.values())
    meta = {
        "shpeft_format": DENSE_FORMAT_VERSION if dense_tensors else FORMAT_VERSION,
        "backbone": backbone_name(m),
        "backbone_source": spec.get("source", ""),
        "backbone_kwargs": json.dumps(spec.get("kwargs", {}), sort_keys=True),
        "backbone_fingerprint": fingerprint,
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
    return TaskDelta(indices=indices, values=values, head=head, metadata=meta, dense=dense_tensors)


def check_delta(delta: TaskDelta, where: str = "delta") -> None:
    """The delta's structure, without a model: DeltaError naming ``where`` and the tensor or field."""
    meta = delta.metadata
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise DeltaError(f"{where}: metadata lacks {missing}")
    if meta["shpeft_format"] not in READABLE_FORMATS:
        raise DeltaError(f"{where}: shpeft_format {meta['shpeft_format']!r}, this reader knows {READABLE_FORMATS}")
    if delta.dense and meta["shpeft_format"] != DENSE_FORMAT_VERSION:
        raise DeltaError(f"{where}: dense tensors in a format {meta['shpeft_format']!r} delta (they need format "
                         f"{DENSE_FORMAT_VERSION!r})")
    try:
        num_classes = int(meta["num_classes"])
        names = json.loads(meta["class_names"])
        kwargs = json.loads(meta["backbone_kwargs"])
    except (ValueError, json.JSONDecodeError) as exc:
        raise DeltaError(f"{where}: malformed metadata (num_classes, class_names or backbone_kwargs): {exc}") from exc
    if not 1 <= num_classes <= MAX_NUM_CLASSES:
        raise DeltaError(f"{where}: num_classes={num_classes} is outside 1..{MAX_NUM_CLASSES}")
    if not isinstance(names, list) or len(names) != num_classes or not all(isinstance(n, str) for n in names):
        raise DeltaError(f"{where}: class_names must be a JSON list of num_classes={num_classes} strings")
    if not isinstance(kwargs, dict):
        raise DeltaError(f"{where}: backbone_kwargs must be a JSON object")
    for n, idx in delta.indices.items():
        if n not in delta.values:
            raise DeltaError(f"{where}: {n}.indices without {n}.values")
        if idx.dtype != torch.int32 or idx.dim() != 1:
            raise DeltaError(f"{where}: {n}.indices must be 1-D int32, got {idx.dtype} {tuple(idx.shape)}")
        vals = delta.values[n]
        if vals.shape != idx.shape:
            raise DeltaError(f"{where}: {n}.values has {tuple(vals.shape)} entries, indices {tuple(idx.shape)}")
        if vals.dtype not in (torch.float32, torch.float64):
            raise DeltaError(f"{where}: {n}.values must be float32 (or float64), got {vals.dtype}")
        if idx.numel() and (int(idx[0]) < 0 or not bool((idx[1:] > idx[:-1]).all())):
            raise DeltaError(f"{where}: {n}.indices must be non-negative, sorted and unique")
        if not bool(torch.isfinite(vals).all()):
            raise DeltaError(f"{where}: {n}.values holds NaN or infinite values")
    extra = set(delta.values) - set(delta.indices)
    if extra:
        raise DeltaError(f"{where}: values without indices: {sorted(extra)[:5]}")
    for n, t in delta.dense.items():
        if n in delta.indices or n in delta.head:
            raise DeltaError(f"{where}: {n!r} is a dense tensor and also a sparse parameter or head tensor")
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise DeltaError(f"{where}: dense tensor {n!r} must hold finite floats, got {t.dtype}")
    if not delta.head:
        raise DeltaError(f"{where}: no head tensors")
    for n, t in delta.head.items():
        if n in delta.indices:
            raise DeltaError(f"{where}: {n!r} is both a sparse parameter and a head tensor")
        if not t.is_floating_point():
            raise DeltaError(f"{where}: head tensor {n!r} has dtype {t.dtype}, expected a float")
        if t.dim() < 1 or t.shape[0] != num_classes:
            raise DeltaError(f"{where}: head tensor {n!r} has shape {tuple(t.shape)}; its first dimension must be "
                             f"num_classes={num_classes}")
        if not bool(torch.isfinite(t).all()):
            raise DeltaError(f"{where}: head tensor {n!r} holds NaN or infinite values")


def validate_delta(model: nn.Module, delta: TaskDelta, *, where: str = "delta") -> None:
    """Refuse, before anything is applied, a delta that would touch more of ``model`` than its kind may.

    Sparse values only at weights a sparse delta may change (Linear / groups=1 Conv2d weights outside
    the head), with indices inside them; head tensors exactly the model's head parameters, shaped for
    the delta's num_classes (the head may be rebuilt to that size, nothing else). DeltaError naming
    ``where`` and the tensor otherwise. Does not hash the backbone (``apply_delta`` checks the fingerprint).
    """
    check_delta(delta, where)
    m = unwrap(model)
    targets = eligible_parameters(m, _ANY_MODULE)
    shapes = json.loads(delta.metadata.get("parameter_shapes") or "{}")
    if not isinstance(shapes, dict):
        raise DeltaError(f"{where}: parameter_shapes must be a JSON object")
    for n, idx in delta.indices.items():
        p = targets.get(n)
        if p is None:
            raise DeltaError(f"{where}: sparse parameter {n!r} is not a weight a delta may change in the "
                             f"{backbone_name(m) or 'given'} model (Linear / Conv2d weights outside the head)")
        if n in shapes and list(p.shape) != list(shapes[n]):
            raise DeltaError(f"{where}: parameter {n!r}: shape {tuple(shapes[n])} vs model {tuple(p.shape)}")
        if idx.numel() and int(idx[-1]) >= p.numel():
            raise DeltaError(f"{where}: parameter {n!r}: indices out of range for shape {tuple(p.shape)}")
        if not p.is_contiguous():
            raise DeltaError(f"model parameter {n!r} is not contiguous")
    params = dict(m.named_parameters())
    dense_ok = dense_eligible_parameters(m) if delta.dense else {}
    for n, t in delta.dense.items():
        if n not in dense_ok:
            raise DeltaError(f"{where}: dense tensor {n!r} is not a parameter a delta may replace in the "
                             f"{backbone_name(m) or 'given'} model (biases and layer-scale gammas outside norms and the head)")
        if tuple(t.shape) != tuple(dense_ok[n].shape):
            raise DeltaError(f"{where}: dense tensor {n!r}: shape {tuple(t.shape)} vs model {tuple(dense_ok[n].shape)}")
    head_names = head_parameter_names(m)
    if not head_names:
        raise DeltaError("model has no classifier head")
    if set(delta.head) != set(head_names):
        unknown, absent = sorted(set(delta.head) - set(head_names)), sorted(set(head_names) - set(delta.head))
        raise DeltaError(f"{where}: head tensors must be exactly the model's head parameters {sorted(head_names)}"
                         + (f"; not head parameters: {unknown[:5]}" if unknown else "")
                         + (f"; missing: {absent[:5]}" if absent else ""))
    for n in head_names:
        want = (delta.num_classes, *params[n].shape[1:])
        if tuple(delta.head[n].shape) != want:
            raise DeltaError(f"{where}: head tensor {n!r}: shape {tuple(delta.head[n].shape)}, the model's head "
                             f"for {delta.num_classes} classes has {want}")


def save_delta(delta: TaskDelta, uri: str) -> dict:
    """Atomic write through fsspec; returns {"sha256", "bytes"}."""
    check_delta(delta, uri)
    sha, size = _st.write(uri, delta.tensors(), delta.metadata)
    return {"sha256": sha, "bytes": size}


def load_delta(uri: str, *, max_bytes: int | None = None, timeout_s: float | None = None) -> TaskDelta:
    """Read a delta (safetensors only; nothing is unpickled) and check its structure (``check_delta``).

    Only a regular file is read (a FIFO, device or socket is refused), at most ``max_bytes``, within
    ``timeout_s`` seconds (TimeoutError after); DeltaError for anything that is not a valid delta."""
    from .io import StorageError

    try:
        tensors, meta = _st.read(uri, max_bytes=max_bytes, timeout_s=timeout_s)
    except (_st.SafetensorsError, StorageError) as exc:
        raise DeltaError(str(exc)) from exc
    if "shpeft_format" not in meta:
        raise DeltaError(f"{uri}: not an shpeft task delta (metadata shpeft_format missing)")
    indices, values, head, dense = {}, {}, {}, {}
    for key, t in tensors.items():
        if key.endswith(DENSE_SUFFIX):
            dense[key[: -len(DENSE_SUFFIX)]] = t
        elif key.endswith(".indices"):
            indices[key[: -len(".indices")]] = t
        elif key.endswith(".values"):
            values[key[: -len(".values")]] = t
        else:
            head[key] = t
    delta = TaskDelta(indices=indices, values=values, head=head, metadata=meta, dense=dense)
    check_delta(delta, uri)
    return delta


class DeltaHandle:
    """Undo record of apply_delta: ``remove()`` restores the model bit-exactly, then checks it.

    Every tensor apply_delta writes has an entry (the entries at the delta's indices; every head parameter,
    and the replaced classifier modules when the head was rebuilt). ``fingerprint`` is a sha256 of what
    the delta touches (those entries and the head), taken before applying; ``remove()`` recomputes it
    after restoring and raises DeltaError when it differs (cost: the k entries and the head, not the model).
    """

    def __init__(self, model: nn.Module, where: str = "delta"):
        self._model = model
        self._where = where
        self._sparse: list[tuple[str, Tensor, Tensor]] = []  # (name, flat weight view, int64 indices)
        self._entries: list[tuple[Tensor, Tensor, Tensor]] = []  # (flat, indices, original values)
        self._dense: list[tuple[Tensor, Tensor]] = []  # (parameter, original copy)
        self._old_classifier: tuple[list[tuple[str, nn.Module]], int | None] | None = None
        self._dense_names: list[str] = []  # the delta's dense tensors: fingerprinted with the head
        self.fingerprint: str | None = None
        self.active = True

    def touched_fingerprint(self) -> str:
        """sha256 over the entries at the delta's indices and the model's head parameters, as they are now."""
        h = hashlib.sha256()
        with torch.no_grad():
            for name, flat, idx in self._sparse:
                h.update(f"{name}|{flat.dtype}|{idx.numel()}\n".encode())
                h.update(tensor_bytes(flat[idx]))
            params = dict(self._model.named_parameters())
            for name in [*self._dense_names, *head_parameter_names(self._model)]:
                t = params[name]
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
                h.update(tensor_bytes(t))
        return h.hexdigest()

    def remove(self) -> None:
        if not self.active:
            return
        self.active = False
        with torch.no_grad():
            for param, orig in reversed(self._dense):
                param.copy_(orig)
            for flat, idx, orig in reversed(self._entries):
                flat[idx] = orig
        if self._old_classifier is not None:
            modules, num_classes = self._old_classifier
            for path, mod in modules:
                parent, _, leaf = path.rpartition(".")
                setattr(self._model.get_submodule(parent) if parent else self._model, leaf, mod)
            if num_classes is not None:
                self._model.num_classes = num_classes
        if self.fingerprint is not None and self.touched_fingerprint() != self.fingerprint:
            raise DeltaError(f"{self._where}: after removing it, the weights it touched differ from before "
                             "(the model is no longer its base; rebuild it)")

    def __enter__(self) -> "DeltaHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def check_backbone_name(model: nn.Module, delta: TaskDelta, where: str = "delta") -> None:
    """DeltaError when the delta names another timm architecture than ``model``'s."""
    want = delta.metadata.get("backbone", "")
    have = backbone_name(unwrap(model))
    if want and have and want != have:
        raise DeltaError(f"{where} is for backbone {want!r}, model is {have!r}")


def _check_fingerprint(m: nn.Module, delta: TaskDelta) -> None:
    fp = backbone_fingerprint(m)
    if fp != delta.metadata["backbone_fingerprint"]:
        raise DeltaError(
            f"backbone weights differ from the delta's base (fingerprint {fp[:12]} vs "
            f"{delta.metadata['backbone_fingerprint'][:12]}); is another delta still applied?"
        )


def apply_delta(model: nn.Module, delta: TaskDelta, *, check_fingerprint: bool = True,
                where: str = "delta") -> DeltaHandle:
    """Add the delta's values into the weights and install its head, in place.

    ``validate_delta`` runs first: nothing is written for a delta that names more than its kind may
    touch. The classifier is rebuilt when its size differs from the delta's. Returns a handle whose
    ``remove()`` (or ``with`` exit) restores the original weights and head bit-exactly and checks that
    they are (see DeltaHandle).
    """
    m = unwrap(model)
    if sparse_modules(m):
        raise DeltaError("model is under sparse training: apply deltas to a plain model (or use merge_delta)")
    check_backbone_name(m, delta, where)
    validate_delta(m, delta, where=where)
    if check_fingerprint:
        _check_fingerprint(m, delta)
    handle = DeltaHandle(m, where)
    params = dict(m.named_parameters())
    for n in sorted(delta.indices):
        p = params[n]
        handle._sparse.append((n, p.data.view(-1), delta.indices[n].to(device=p.device, dtype=torch.int64)))
    handle._dense_names = sorted(delta.dense)
    handle.fingerprint = handle.touched_fingerprint()
    try:
        _write_delta(m, delta, handle, params)
    except BaseException:
        handle.remove()
        raise
    return handle


def _write_delta(m: nn.Module, delta: TaskDelta, handle: DeltaHandle, params: dict) -> None:
    head_paths = head_module_paths(m)
    if any(tuple(params[n].shape) != tuple(t.shape) for n, t in delta.head.items()):
        # Another head size: build the delta's, keep the old modules for remove().
        old = [(p, m.get_submodule(p)) for p in head_paths]
        ref = next(iter(old[0][1].parameters()))
        handle._old_classifier = (old, getattr(m, "num_classes", None))
        m.reset_classifier(delta.num_classes)
        for p in head_module_paths(m):
            m.get_submodule(p).to(device=ref.device, dtype=ref.dtype)
        params = dict(m.named_parameters())
        if set(head_parameter_names(m)) != set(delta.head) or any(
                tuple(params[n].shape) != tuple(t.shape) for n, t in delta.head.items()):
            raise DeltaError(f"{handle._where}: the rebuilt classifier of {backbone_name(m)!r} does not take the "
                             "delta's head tensors")
    with torch.no_grad():
        for name, flat, i in handle._sparse:
            orig = flat[i].clone()
            handle._entries.append((flat, i, orig))
            # Same arithmetic as the sparse forward (base + float32 value cast to the weight dtype):
            # bit-identical logits.
            flat[i] = orig + delta.values[name].to(device=flat.device, dtype=flat.dtype)
        for n, t in [*sorted(delta.dense.items()), *delta.head.items()]:
            p = params[n]
            handle._dense.append((p, p.detach().clone()))
            p.copy_(t.to(device=p.device, dtype=p.dtype))


def create_model_for_delta(delta: TaskDelta, backbone_source: str | None = None) -> nn.Module:
    """The delta's backbone (from its metadata, or ``backbone_source``) with a head of its size."""
    check_delta(delta, "delta")
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
